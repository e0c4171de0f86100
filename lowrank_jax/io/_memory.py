"""Returning freed heap memory to the operating system after a checkpoint load."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> bool:
    """Asks glibc to give freed heap pages back to the OS (``malloc_trim(0)``); ``False`` where there is none.

    Loading a checkpoint frees many multi-megabyte temporaries (dequantised GGUF tensors,
    per-layer arrays before stacking). glibc raises its mmap threshold after such frees, so the
    later ones land in the heap and stay resident although free: on SmolLM2-135M about 410 MB
    of RSS, which the training step's buffers (allocated separately) cannot reuse.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
