"""glibc malloc settings for CPU training and serving processes."""

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt(3) parameters, from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit hosts (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


def configure_cpu_allocator() -> bool:
    """Makes glibc keep freed tensor memory in the process for the next allocation.

    PyTorch's CPU tensors come straight from ``malloc``. glibc serves every block above its mmap
    threshold (128 KiB at start) with fresh pages from the kernel and unmaps them on ``free``, so
    each intermediate tensor of a layer (a few MB at thousands of events) is page-faulted in
    again on every step. On small VMs those faults can cost more than the arithmetic
    (the README's "CPU processes" gives the measured effect; it is why PyTorch's CPU tuning guides
    recommend jemalloc or tcmalloc; this needs neither). Freed memory then stays resident,
    so the process's RSS holds at its peak rather than falling back between steps.

    Call it once at process start-up; the training entry point does so for CPU processes. A host
    without glibc keeps its allocator unchanged.

    Returns:
        Whether the settings were applied.

    Example::

        from torchrec_hytrec.training import configure_cpu_allocator

        configure_cpu_allocator()  # before the first training step of a CPU job
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only: musl and others lack it
        applied = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        applied = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
    except (OSError, AttributeError, TypeError):
        applied = False
    if not applied:
        logger.info("configure_cpu_allocator: no glibc mallopt here (%s); allocator unchanged", name)
    return applied
