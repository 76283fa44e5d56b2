"""How the process's C heap (glibc) is kept, set once where the ``nag`` process starts
(``commands/main.py``), and this process's resident set. No-ops where glibc is not the C library."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 256 << 20


def launcher_chose() -> bool:
    """Whether the launcher set what ``tune_heap`` would (glibc reads these at start-up): then its
    choice stands. Other ``MALLOC_*`` settings (``MALLOC_ARENA_MAX``, common in containers) do not
    turn the tuning off."""
    chosen = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    return any(name in os.environ for name in chosen) or "malloc." in os.environ.get("GLIBC_TUNABLES", "")


def tune_heap() -> bool:
    """Keep large blocks on the heap instead of mapping each afresh, and hand freed memory back
    only past 256 MB at the heap's top; whether it was set.

    Measured on the quickstart (2-core Zen 5 VM, bf16, 2026-12-04), ``nag bench`` tokens/s and
    page faults per step, two runs each: glibc's defaults 6,305 and 6,330 / 84-92k (above its mmap threshold
    each large tensor is mapped and faulted anew: the LM head's logits every step); this 8,471 and
    8,391 / 1; no trimming at all 8,950 and 8,163 / 1. A 60-step fit with two 60-batch validations
    peaked at 1.25 and 1.17 GB resident with this, 2.11 and 1.85 GB without trimming (validation's
    freed blocks stayed), 1.26 and 1.34 GB with the per-validation ``malloc_trim`` calls this
    replaces (docs/results/heap.md).
    """
    if launcher_chose():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mapped, trimmed = mallopt(m_mmap_threshold, MMAP_THRESHOLD), mallopt(m_trim_threshold, TRIM_THRESHOLD)
    return bool(mapped) and bool(trimmed)


def resident_mb() -> float | None:
    """This process's resident set in MB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None
