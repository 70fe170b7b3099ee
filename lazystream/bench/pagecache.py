"""The page cache of the checkpoint's own files: how much of them it holds, and evicting
them (never the whole machine's caches) so that a "cold" call reads the disk.

Linux only; elsewhere eviction does nothing and residency reads as unknown (nan).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def evict(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (``posix_fadvise(DONTNEED)``).

    Pages that a process still maps are kept by the kernel: call :func:`unmap_pages` on
    this process's own mappings of the files first.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def unmap_pages(mapped: torch.Tensor) -> None:
    """Drop this process's page-table entries for a read-only file mapping (the bytes
    of a Checkpoint shard), so that :func:`evict` can drop the pages themselves. The
    next access faults them in again from the file."""
    if not hasattr(_libc, "madvise") or mapped.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = mapped.data_ptr() // page * page
    length = mapped.data_ptr() + mapped.numel() - start
    if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) of a shard mapping failed: {os.strerror(err)}")


def cached_fraction(paths: Iterable[Path]) -> float:
    """The fraction of the files' pages in the page cache now (``mincore``)."""
    if not hasattr(_libc, "mincore"):
        return math.nan
    cached = total = 0
    page = mmap.PAGESIZE
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
            pages = -(-size // page)
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return math.nan
            cached += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            total += pages
    return cached / total if total else 0.0
