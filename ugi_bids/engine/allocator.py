"""Keep freed host memory mapped, so that the cascade's large temporaries are not page-faulted
in afresh on every operation.

glibc's ``malloc`` serves blocks over 32 MB with their own ``mmap`` and returns them to the
kernel on ``free``. One 175^3 U-Net allocates and frees a few hundred such blocks (activations of
64 to 300 MB each), and each fresh block costs a page fault per 4 KiB page when it is first
written: on a 2-core machine that was about 30 % of the inference wall time, all in the kernel
(``sys``). Serving every block from the heap and keeping freed memory there lets the next block
reuse pages that are already mapped. The process's peak RSS moves little (the peak is set by
the blocks alive at one time), but freed memory is not handed back to the system until the
process ends, which is what a per-subject worker or a cohort run wants anyway.

Only glibc (Linux) has these knobs; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

#: Grow the heap in 64 MiB steps: fewer brk calls; pages are only resident once written.
_TOP_PAD_BYTES = 64 << 20
#: Largest value mallopt accepts for the trim threshold (an int): "never trim" in practice.
_NEVER_TRIM_BYTES = 2**31 - 1

_retaining = False


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (process-wide, once); returns whether the
    allocator now does so (False off glibc or when ``mallopt`` refuses)."""
    global _retaining
    if _retaining:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES),
                (_M_TOP_PAD, _TOP_PAD_BYTES))
    _retaining = all(mallopt(option, value) == 1 for option, value in settings)
    return _retaining
