"""Where and how tensors run: device, precision, threads, seeds and the distributed context."""

import contextlib
import ctypes
import logging
import os
import platform
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX, where bf16 autocast is faster, not slower."""
    capability = torch.backends.cpu.get_cpu_capability()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return amx or capability in {"AVX512_BF16", "AMX"}


def bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def resolve_precision(precision: str, device: torch.device) -> bool:
    """Return whether to autocast to bf16; 'bf16' on hardware without it falls back loudly."""
    available = bf16_available(device)
    if precision == "bf16" and not available:
        log.warning("precision=bf16 requested but %s has no fast bf16; using fp32", device)
    return precision in ("auto", "bf16") and available


def available_cores() -> int:
    """The cores this process may run on (its affinity mask under Linux, e.g. in a container or a
    job scheduler's cgroup), not every core of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)


def keep_freed_memory() -> None:
    """Have glibc keep freed memory in the process for reuse instead of handing it back to the
    kernel (elsewhere a no-op). A packed forward pass allocates and frees buffers of up to 6 MB
    per layer; by default glibc maps blocks that large freshly or trims the heap once they are
    freed, so every batch faults its pages in again and the kernel zeroes them. Costs nothing but
    keeping the peak heap: for a long `eventcoder predict` job, its working set anyway."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in malloc.h
    libc.mallopt(mmap_threshold, 32 << 20)  # glibc's largest allowed: blocks below it come from the heap
    libc.mallopt(trim_threshold, 1 << 30)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_runtime(precision: str, num_threads: int | None = None) -> Runtime:
    """Pick CUDA when present; join the process group when started by torchrun."""
    set_threads(num_threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, bf16=resolve_precision(precision, device), rank=rank, world_size=world_size)


@contextlib.contextmanager
def distributed_cleanup(runtime: Runtime) -> Iterator[None]:
    try:
        yield
    finally:
        if runtime.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
