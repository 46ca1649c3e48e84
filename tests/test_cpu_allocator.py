"""The CPU allocator settings: large tensors come from the heap once configured."""

import ctypes
import subprocess
import sys

import pytest

_PROBE = """
import ctypes
import torch
from torchrec_hytrec.training import configure_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_by(numel):
    before = libc.mallinfo2().hblkhd  # bytes held in mmap'd blocks
    x = torch.empty(numel)
    return libc.mallinfo2().hblkhd - before

size = 4 * 2**20  # 16 MiB of fp32: mmap'd by default, under the configured threshold
print(mapped_by(size), configure_cpu_allocator(), mapped_by(size))
"""


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="needs glibc >= 2.33"
)
def test_configured_allocator_serves_large_tensors_from_the_heap() -> None:
    # A fresh process: the settings are process-wide and glibc's default threshold adapts to
    # what was freed before.
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    default_mapped, applied, configured_mapped = out.stdout.split()
    assert applied == "True"
    assert int(default_mapped) >= 16 * 2**20
    assert int(configured_mapped) == 0
