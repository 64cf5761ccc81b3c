"""eventcoder's CPU kernels (eventcoder/kernels/*.cpp): built once per machine with the local C++
compiler into one library, cached, and registered as torch operators:

- `eventcoder::varlen_attention` (kernels/varlen_attention.cpp): attention over packed sentences;
- `eventcoder::linear_gelu` and `eventcoder::pack_linear_weight` (kernels/linear_gelu.cpp): the
  feed-forward up-projection and its GELU in one pass on the AMX tile unit.

The build needs the same compiler torch.compile needs (`c++`, or $CXX) and takes about twenty
seconds (19 s of CPU for both sources); the library is cached under $EVENTCODER_KERNEL_CACHE (default
~/.cache/eventcoder/kernels), keyed by the sources, the flags, torch's version and the CPU's feature
flags, because `-march=native` code must not run on a different CPU sharing the same home folder.
Where the library cannot be built, `load_kernel` says why and inference keeps the padded path.
"""

import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = sorted(KERNELS.glob("*.cpp"))
HEADERS = sorted(KERNELS.glob("*.h"))
HEAD_SIZES = (16, 32, 64, 128)  # the head sizes the kernel is instantiated for


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-std=c++20"]
    if platform.machine().lower() in {"x86_64", "amd64"}:
        # GCC prefers 256-bit vectors on Intel by default; the kernel's blocks are 16 floats wide.
        flags.append("-mprefer-vector-width=512")
    return flags


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line for line in handle if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    if "EVENTCODER_KERNEL_CACHE" in os.environ:
        return Path(os.environ["EVENTCODER_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eventcoder" / "kernels"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def kernel_path() -> Path:
    """Where the library for these sources, compiler, flags, torch and CPU is (or will be) cached."""
    texts = [path.read_text(encoding="utf-8") for path in SOURCES + HEADERS]
    parts = [*texts, _compiler(), *_flags(), torch.__version__, _cpu_signature()]
    return cache_dir() / f"eventcoder-kernels-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"


def build_kernel() -> Path:
    """The kernels' shared library, compiled now unless a matching one is cached. Raises
    RuntimeError with a one-line reason when it cannot be built."""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler, target = _compiler(), kernel_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    torch_lib = library_paths()[0]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    log.info("building eventcoder's CPU kernels into %s (once per machine)", target.parent)
    # Written under a temporary name and renamed: concurrent workers never load a half-written file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = [
        compiler,
        *_flags(),
        abi,
        "-shared",
        "-fPIC",
        *(f"-I{path}" for path in include_paths()),
        *(str(path) for path in SOURCES),
        f"-L{torch_lib}",
        f"-Wl,-rpath,{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        "-o",
        partial,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        os.unlink(partial)
        raise RuntimeError(f"no C++ compiler {compiler!r} (set CXX)") from None
    if result.returncode != 0:
        os.unlink(partial)
        first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
        raise RuntimeError(f"{compiler} failed on {KERNELS}: {first_error[:300]}")
    os.replace(partial, target)
    return target


@functools.cache
def load_kernel() -> str | None:
    """Register the operators in this process. None when they are ready, else why they are not."""
    if platform.system() != "Linux":
        return f"the kernels are built for Linux only, not {platform.system()}"
    try:
        torch.ops.load_library(str(build_kernel()))
    except (RuntimeError, OSError) as error:  # OSError: a read-only cache folder, a library that will not load
        return str(error).splitlines()[0]

    # What torch.compile traces: the shapes.
    @torch.library.register_fake("eventcoder::varlen_attention")
    def _attention_shape(q, k, v, cu_seqlens, num_heads, scale, use_amx=True):
        return q.new_empty(q.shape)

    @torch.library.register_fake("eventcoder::linear_gelu")
    def _linear_gelu_shape(x, packed_weight, bias):
        return x.new_empty((x.shape[0], packed_weight.shape[0] * 16))

    return None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_heads: int,
    scale: float,
    use_amx: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale) v per sentence and head; q, k, v are [tokens, num_heads * head_size]
    with sentence b on rows cu_seqlens[b]:cu_seqlens[b + 1]. bf16 runs on the AMX tile unit where
    the CPU has one, unless `use_amx` is False (vector code). Call load_kernel() first."""
    return torch.ops.eventcoder.varlen_attention(q, k, v, cu_seqlens, num_heads, scale, use_amx)


def amx_available() -> bool:
    """Whether the kernels' bf16 paths (attention, linear_gelu) run on the AMX tile unit here: the
    library was built for a CPU with AMX and Linux granted this process the tile state. Call
    load_kernel() first."""
    return bool(torch.ops.eventcoder.amx_available())


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [outputs, inputs] weight (both multiples of 32) in the layout linear_gelu reads."""
    return torch.ops.eventcoder.pack_linear_weight(weight)


def linear_gelu(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x weight^T + bias), exact (erf) GELU, for bf16 x [rows, inputs] and an fp32 bias, on the
    AMX tile unit (where amx_available()). Call load_kernel() first."""
    return torch.ops.eventcoder.linear_gelu(x, packed_weight, bias)
