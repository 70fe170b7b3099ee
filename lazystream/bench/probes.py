"""The hardware floor's inputs, measured on the benchmark's own checkpoint in the same run
by probes independent of lazystream's loader (a floor built from the loader's own copy
would let a slow design look close to its limit):

- page-cache read: the cached shards copied out of their mappings into page-locked
  (CUDA) or plain host buffers by 1, 2, 4, ... threads at once, each ``numpy.copyto``
  of 16 MiB pieces into a buffer of its own (the GIL released), the best thread count;
- pinned H2D: one page-locked buffer of the checkpoint's largest block copied to the
  device, timed by CUDA events around the copy on a stream of its own;
- cold reads: the checkpoint's pages evicted, then read with O_DIRECT at queue depths 8
  and 16 (as many threads, each with one 4 MiB request in flight), and through the
  mapping (page faults and the kernel's readahead).

Each figure is the best of a few passes: the floor is what the hardware allows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..devices import device_ops
from ..io import DIRECT_ALIGN, AlignedRead, DirectReader, usable_cores
from ..probe import h2d_seconds
from .pagecache import cached_fraction, evict, unmap_pages

WINDOW_BYTES = 64 * 2**20  # one batch of O_DIRECT reads: 16 requests of 4 MiB
PIECE_BYTES = 16 * 2**20  # one reader's copy out of the page cache
DIRECT_DEPTHS = (8, 16)


@dataclass(frozen=True)
class Probes:
    """Bandwidths in GB/s (1e9 bytes per second), and how each was measured."""

    cache_read: float  # cached pages -> page-locked (CUDA) or host buffers, the best thread count
    cache_read_by_threads: dict[str, float]
    direct_cold: float  # evicted checkpoint, O_DIRECT, the better queue depth
    direct_cold_by_depth: dict[str, float]
    mapped_cold: float  # evicted checkpoint, copied out of its mapping (page faults, readahead)
    h2d: float | None  # one pinned block-sized buffer -> device, event-timed; CUDA only
    h2d_bytes: int  # the size of that buffer: the checkpoint's largest block
    cached_after_evict: float  # fraction of the checkpoint still cached after eviction
    checkpoint_bytes: int
    torch_threads: int

    def read(self, cold: bool) -> float:
        """B_read of the floor: the disk for cold runs, the page cache otherwise."""
        return self.direct_cold if cold else self.cache_read

    def transfer(self, cold: bool) -> float:
        """min(B_read, B_h2d): what one streamed byte can move at, at best."""
        return min(self.read(cold), self.h2d) if self.h2d else self.read(cold)

    def describe(self) -> list[str]:
        """One line per probe: what it measured, how, and its figure."""
        threads = ", ".join(f"{k}: {v:.2f}" for k, v in self.cache_read_by_threads.items())
        depths = ", ".join(f"QD {k}: {v:.2f}" for k, v in self.direct_cold_by_depth.items())
        buffers = "page-locked" if self.h2d else "host"
        lines = [f"page-cache read into {buffers} buffers, numpy copies of {PIECE_BYTES // 2**20} MiB pieces by "
                 f"several threads: {self.cache_read:.2f} GB/s (by threads {threads})",
                 f"cold read with O_DIRECT, 4 MiB requests: {self.direct_cold:.2f} GB/s ({depths}; "
                 f"{self.cached_after_evict:.0%} of the checkpoint still cached after eviction)",
                 f"cold read through the mapping (page faults, readahead): {self.mapped_cold:.2f} GB/s"]
        if self.h2d:
            lines.append(f"pinned host-to-device copy of one {self.h2d_bytes / 2**20:.0f} MiB block, timed by CUDA "
                         f"events: {self.h2d:.1f} GB/s")
        return lines


def _best_rate(nbytes: int, fn: Callable[[], None], passes: int, before: Callable[[], None] = lambda: None) -> float:
    best = 0.0
    for _ in range(passes):
        before()
        start = time.perf_counter()
        fn()
        best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
    return best


def thread_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to the cores (and the cores themselves)."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


def measure_probes(checkpoint: str, device: str, block_bytes: int | None = None) -> Probes:
    """Every probe on ``checkpoint``; ``block_bytes``: the H2D probe's buffer, one block
    (default: the largest shard, at most 256 MiB)."""
    dev = torch.device(device)
    ops = device_ops(dev)
    with Checkpoint.open(checkpoint) as ckpt:
        paths = ckpt.shard_paths
        shards = [ckpt.shard(p).bytes for p in paths]
        nbytes = sum(s.numel() for s in shards)
        pieces = [(src, at) for src in shards for at in range(0, src.numel(), PIECE_BYTES)]

        def evict_all() -> None:
            for src in shards:
                unmap_pages(src)
            evict(paths)

        def copy_mapped_by(threads: int) -> Callable[[], None]:
            buffers = [ops.staging(PIECE_BYTES).fill_(0).numpy() for _ in range(threads)]  # touched: no page faults

            def copy_share(k: int) -> None:
                for src, at in pieces[k::threads]:
                    piece = src[at:at + PIECE_BYTES].numpy()
                    np.copyto(buffers[k][:piece.size], piece)

            def copy_all() -> None:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(copy_share, range(threads)))

            return copy_all

        copy_mapped_by(1)()  # warm: every page cached and mapped
        by_threads = {str(t): _best_rate(nbytes, copy_mapped_by(t), passes=3) for t in thread_counts(usable_cores())}
        mapped_cold = _best_rate(nbytes, copy_mapped_by(1), passes=1, before=evict_all)
        evict_all()
        cached_after_evict = cached_fraction(paths)
        direct = {}
        into = _aligned_buffer(WINDOW_BYTES)
        for depth in DIRECT_DEPTHS:
            reader = DirectReader(paths, depth)
            try:
                direct[str(depth)] = _best_rate(nbytes, lambda: _read_direct(reader, paths, into), passes=1,
                                                before=evict_all)
            finally:
                reader.close()
    h2d = None
    block = block_bytes or min(256 * 2**20, max(s.numel() for s in shards))
    if dev.type == "cuda":
        h2d = block / min(h2d_seconds(dev, block)) / 1e9
    return Probes(cache_read=max(by_threads.values()), cache_read_by_threads=by_threads,
                  direct_cold=max(direct.values()), direct_cold_by_depth=direct, mapped_cold=mapped_cold, h2d=h2d,
                  h2d_bytes=block, cached_after_evict=cached_after_evict, checkpoint_bytes=nbytes,
                  torch_threads=torch.get_num_threads())


def _read_direct(reader: DirectReader, paths: list[Path], into: torch.Tensor) -> None:
    for path in paths:
        size = path.stat().st_size
        for at in range(0, size, into.numel()):
            need = min(into.numel(), size - at)
            reader.read([AlignedRead(path, at, -(-need // DIRECT_ALIGN) * DIRECT_ALIGN, 0, need)], into)


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    raw = torch.zeros(nbytes + DIRECT_ALIGN, dtype=torch.uint8)  # touched: its page faults are not timed
    shift = -raw.data_ptr() % DIRECT_ALIGN
    return raw[shift:shift + nbytes]
