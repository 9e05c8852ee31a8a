"""Keep freed host memory mapped, so that the cascade's large temporaries are not page-faulted
in afresh on every operation.

glibc's ``malloc`` serves blocks over 32 MB with their own ``mmap`` and returns them to the
kernel on ``free``. One 175^3 U-Net allocates and frees a few hundred such blocks (activations of
64 to 300 MB each), and each fresh block costs a page fault per 4 KiB page when it is first
written: on a 2-core machine that was about 30 % of the inference wall time, all in the kernel
(``sys``). Serving every block from the heap and keeping freed memory there lets the next block
reuse pages that are already mapped (network 14.2 s -> 9.9 s for both directions at 175^3).

The price is fragmentation: the heap only shrinks from its top, so its high-water mark sits a
little above the live data. For inference that is ~0.1 GB; for instance optimisation, whose
autograd graph allocates many differently sized blocks, the peak grew from 5.9 to 9.2 GB for a
6 % gain in speed. So the :class:`~ugi_bids.engine.registrar.Registrar` retains freed memory for
inference only and hands it back (glibc's defaults, then ``malloc_trim``) before instance
optimisation. Between registrations the retained memory stays with the process (its RSS stays
near the inference peak, ~2 GB at 175^3): the next pair of a cohort reuses it, and a worker
process that ends returns it.

Only glibc (Linux) has these knobs; elsewhere both functions are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h) and glibc's documented defaults.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024), (_M_TOP_PAD, 128 * 1024))

#: Grow the heap in 64 MiB steps: fewer brk calls; pages are only resident once written.
_TOP_PAD_BYTES = 64 << 20
#: Largest value mallopt accepts for the trim threshold (an int): "never trim" in practice.
_NEVER_TRIM_BYTES = 2**31 - 1
_RETAIN = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES), (_M_TOP_PAD, _TOP_PAD_BYTES))

_retaining = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and keep freed memory for reuse
    (process-wide); returns whether the allocator now does so (False off glibc or when
    ``mallopt`` refuses)."""
    global _retaining
    if _retaining:
        return True
    libc = _libc()
    if libc is None:
        return False
    _retaining = all(libc.mallopt(option, value) == 1 for option, value in _RETAIN)
    return _retaining


def release_freed_memory() -> None:
    """Undo :func:`retain_freed_memory`: glibc's default thresholds again, and the freed heap
    returned to the system (``malloc_trim``)."""
    global _retaining
    if not _retaining:
        return
    libc = _libc()
    if libc is None:
        return
    for option, value in _DEFAULTS:
        libc.mallopt(option, value)
    libc.malloc_trim(0)
    _retaining = False
