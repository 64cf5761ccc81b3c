"""Process-wide runtime settings."""

import os
import platform
import subprocess
import sys

import pytest

from eventcoder.runtime import available_cores

# Three 6 MB buffers per "batch", as a packed forward pass allocates and frees them per layer; the
# page faults of ten batches after a first one are printed.
FAULTS_PER_BATCH = """
import resource, sys
from eventcoder.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def batch():
    buffers = [bytearray(b"x") * (6 << 20) for _ in range(3)]
    del buffers
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_BATCH, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    pages_per_batch = 3 * (6 << 20) // 4096
    assert _page_faults("default") > 5 * pages_per_batch  # glibc hands the buffers back each time
    assert _page_faults("keep") < pages_per_batch // 10


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
def test_available_cores_follows_the_affinity_mask():
    """A job scheduler or `taskset` that gives the process one core gets one worker, not one per
    core of the machine."""
    script = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    script += "from eventcoder.runtime import available_cores; print(available_cores())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1"
    assert available_cores() == len(os.sched_getaffinity(0))
