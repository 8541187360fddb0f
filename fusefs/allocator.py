"""Keep the daemon's resident memory near its live data while chunks stream through it.

Chunks are fetched, decoded and hashed in buffers of up to a few MiB, on the trio thread and in
worker threads. glibc serves such buffers with mmap at first, but raises its mmap threshold to
the size of each one freed, so later buffers come from the (per-thread) heaps and stay resident
after they are freed: reading one 128 MiB file lazily peaked lazysnapd at ~110 MiB RSS, ~92 MiB
with the threshold fixed at 2 MiB (docs/benchmarks.md, "read path"). :func:`bound_large_allocations`
fixes the threshold, as ``MALLOC_MMAP_THRESHOLD_`` would, so chunk-sized buffers go back to the
kernel when freed. Not lower: at 256 KiB every 1 MiB FUSE read became an mmap + page faults and
warm reads ran ~40% slower. Process-wide: the daemon's composition root calls it once at start.

:func:`release_free_memory` hands the free pages inside glibc's heaps back to the kernel
(``malloc_trim(0)``): after a burst of small allocations such as a TOC index build, the freed
memory is scattered between live blocks, and glibc returns only a heap's free top on its own.
:func:`release_while_busy` does that a few times a second while chunks are being fetched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD = 2 << 20  # above a FUSE read (1 MiB): those stay on the fast heap path


_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"))
        except (OSError, TypeError):
            return None
    return _libc


def release_free_memory() -> bool:
    """Return the free memory of every malloc arena to the kernel; False if not glibc.

    Costs a walk over the heaps (milliseconds): call it after a large transient, not per read.
    Never raises.
    """
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def bound_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more with mmap, always; False if not glibc.

    Also turns off glibc's dynamic threshold. Call from any thread, ideally before the first
    large allocation. Never raises.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no glibc mallopt here: the allocator keeps its defaults")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


async def release_while_busy(activity: Callable[[], int], stopped: trio.Event, interval: float,
                             release: Callable[[], bool] = release_free_memory) -> None:
    """Every ``interval`` seconds in which ``activity()`` changed, :func:`release_free_memory`;
    return once ``stopped`` is set. A trim costs well under a millisecond, an idle daemon none.
    """
    seen = activity()
    while not stopped.is_set():
        with trio.move_on_after(interval):
            await stopped.wait()
        now = activity()
        if now != seen:
            seen = now
            release()
