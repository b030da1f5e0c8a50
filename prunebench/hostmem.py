"""Host memory: glibc's malloc told to keep freed memory, as a CPU inference deployment keeps it.

By default glibc hands a large freed block (a batch's activations: megabytes each) back to the kernel and
takes it back, page by page and zero-filled, at the next allocation. Eager PyTorch allocates every
activation anew, so on the CPU a forward pass of a CIFAR ResNet at batch 128 spends about a third of its
time in page faults. That cost follows the activations' size, which pruning the inside of residual
blocks barely changes: it would hide part of every method's speedup, and slow training too. Deployments
avoid it with an arena (ONNX Runtime's, jemalloc, tcmalloc); :func:`keep_freed_memory` does the same
with glibc's own switches. See docs/fairness.md ("Speed").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # never give the heap's top back
USER_SETTINGS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_state: str | None = None


def keep_freed_memory() -> str:
    """Keep freed blocks of up to 32 MiB in the process (glibc: ``mallopt``), once per process.

    Returns what the allocator does now, for reports: ``glibc <version>: freed memory kept`` or why it
    was left alone (not glibc, or the user chose an allocator or glibc tunables through the environment,
    which is kept). The price is that the process's resident memory stays at its peak.
    """
    global _state
    if _state is None:
        _state = _configure()
        logger.debug("host allocator: %s", _state)
    return _state


def allocator_state() -> str:
    """What :func:`keep_freed_memory` did in this process, or ``system default`` when it was not called."""
    return _state or "system default"


def _configure() -> str:
    chosen = [name for name in USER_SETTINGS if os.environ.get(name)]
    if chosen:
        return "left as set by " + ", ".join(chosen)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system default (not glibc)"
    version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Both are needed: setting either turns off glibc's adaptive threshold, so the mmap threshold alone
    # would leave the heap trimmed, and the trim threshold alone would send every large block to mmap.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "system default (mallopt refused)"
    return f"glibc {version().decode()}: freed memory kept (mmap threshold 32 MiB, no trim)"
