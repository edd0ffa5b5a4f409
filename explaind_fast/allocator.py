"""glibc's heap on the CPU: the two process-wide calls explaind_fast makes (docs/design.md §10).

* :func:`malloc_trim` — hand freed heap memory back to the kernel now (the train side after each
  step, so that its freed per-sample gradients do not add to the next contraction's peak).
* :func:`keep_freed_memory` — the opposite policy for a whole process: keep freed blocks for
  reuse instead of returning them and faulting them in again. ``python -m explaind_fast`` calls
  it; the library never does on its own (it is process-wide). Call it first thing in a script or
  notebook whose training loop makes and frees large activations every step, or set
  ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` before Python starts (README,
  "Memory handed back to the kernel").

Both are no-ops where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import functools
import os

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: environment settings of the user's that keep_freed_memory leaves alone
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def malloc_trim() -> bool:
    """Return the heap's free memory to the kernel (glibc ``malloc_trim(0)``); False where there is
    no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc serve blocks below ``mmap_threshold`` bytes from its heap and keep up to
    ``trim_threshold`` bytes of freed memory, unless the user tuned malloc in the environment
    (:data:`MALLOC_ENV`). Both are set together: fixing one disables glibc's adaptation of the
    other. Full-batch training makes and frees the same tens of MB of activations every step;
    with glibc's default thresholds the grokking demo's training spent 13.7 % of its user time in
    the kernel zeroing them again, 1.7 % with these (README). The cost: the process keeps its
    high-water mark. Returns whether the setting was applied (glibc only)."""
    if any(k in os.environ for k in MALLOC_ENV):
        return False
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
