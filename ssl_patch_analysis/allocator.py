"""How this process's ``malloc`` treats the large buffers a CPU forward and backward pass allocates and frees.

A ResNet-18 step on 100 images x 20 patches allocates activations of hundreds of MB and frees them again, every
step. glibc's ``malloc`` serves any block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives
it back to the kernel with ``munmap`` when it is freed, so each step the kernel maps and zeroes those pages again,
4 KiB at a time: millions of page faults per step, a large part of a CPU step's time (how large, and what keeping
the memory costs in peak memory: ``benchmarks/allocator.py``, its table in ``benchmarks/RESULTS.md``).

:func:`keep_freed_memory` tells glibc to keep freed memory for the next allocation (``mallopt``: no ``mmap`` for
large blocks, and a 2 GiB threshold before the top of the heap is given back). The process then holds on to its
peak memory until it ends, and that peak is higher (glibc cannot place an aligned block in the hole of a freed one
of the same size, so the heap grows until freed neighbours merge), which suits a command-line run on a machine with
the memory to spare; ``python -m ssl_patch_analysis.train`` calls it when it trains on the CPU. Under jemalloc or
tcmalloc (``LD_PRELOAD``) and on a C library other than glibc it changes nothing and says so.
``SSL_PATCH_ANALYSIS_MALLOC=default`` turns it off (glibc's own behaviour, for comparison).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

MALLOC_ENV = "SSL_PATCH_ANALYSIS_MALLOC"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1   # bytes free at the top of the heap before glibc gives them back (mallopt takes an int)

KEPT = "glibc malloc, freed memory kept (no mmap for large blocks, trim threshold 2 GiB)"
_kept: str | None = None   # what keep_freed_memory did in this process


def preloaded_allocator() -> str | None:
    """``jemalloc`` or ``tcmalloc`` when one is loaded into this process (``LD_PRELOAD``), else ``None``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return None


def keep_freed_memory() -> str:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process; returns what was done, in words.

    Raises ``OSError`` when glibc refuses a setting (which it does not for these values)."""
    global _kept
    if _kept is not None:
        return _kept
    if preloaded_allocator() is not None or platform.libc_ver()[0] != "glibc":
        _kept = malloc_description()
    elif os.environ.get(MALLOC_ENV, "").lower() == "default":
        _kept = f"glibc malloc, unchanged ({MALLOC_ENV}=default)"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for option, value, name in ((_M_MMAP_MAX, 0, "M_MMAP_MAX"), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD,
                                                                         "M_TRIM_THRESHOLD")):
            if libc.mallopt(option, value) != 1:
                raise OSError(f"glibc's mallopt refused {name}={value}; set {MALLOC_ENV}=default to run without it")
        _kept = KEPT
    return _kept


def malloc_description() -> str:
    """What :func:`keep_freed_memory` did in this process, or which allocator runs, left as it was."""
    if _kept is not None:
        return _kept
    other = preloaded_allocator()
    if other is not None:
        return f"{other} (preloaded), unchanged"
    return f"{'glibc' if platform.libc_ver()[0] == 'glibc' else 'system'} malloc, unchanged"


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.allocator says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
