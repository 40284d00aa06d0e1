"""Serve a step's table-sized buffers from the process heap, not from fresh ``mmap`` calls.

Every training step allocates dense gradients as large as the embedding tables (Gowalla: a
(40982, 256) float32 gradient is 42 MB) and frees them at the end of the step. glibc's malloc
serves blocks above its mmap threshold (at most 32 MB by default) with a fresh ``mmap`` and
gives them back with ``munmap``, so every step page-faults its gradients in again and the
kernel zeroes their pages. Measured on Gowalla's tables with bf16 matmuls
(benchmarks/README.md), the step took 78-81 ms with :func:`keep_freed_memory` and 97-105 ms
without; the table-sized ``fill_`` calls were most of the difference.

:func:`keep_freed_memory` raises glibc's mmap and trim thresholds (``mallopt``), the tuning
TCMalloc and jemalloc users get by default: blocks up to 1 GiB come from the heap and up to
1 GiB of freed heap is kept for the next step. Training holds that peak anyway. Where the C
library is not glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes: the mmap threshold and the free heap kept


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to :data:`THRESHOLD` for this process (once).

    Returns whether both settings took: False where the C library has no ``mallopt``.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
