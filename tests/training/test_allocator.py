"""keep_freed_memory: a table-sized buffer comes from the heap, where a freed one is reused,
instead of a fresh mmap that every step page-faults in again."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

# In a fresh interpreter: is a 48 MB tensor inside the heap (below the program break, which
# only brk-grown memory is) or an mmap'd block above it?
_SCRIPT = """
import ctypes, sys, torch
from pipeline.training.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "on" else None
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
x = torch.empty(12_000_000)
print(took, x.data_ptr() < libc.sbrk(0))
"""


def _run(mode: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


@pytest.mark.skipif(
    sys.platform != "linux" or "libc.so.6" not in str(ctypes.util.find_library("c")),
    reason="glibc only",
)
def test_table_sized_buffers_come_from_the_heap() -> None:
    assert _run("off") == ["None", "False"]  # glibc's default: an mmap of its own
    assert _run("on") == ["True", "True"]
