"""The hardware floor's inputs, measured on the benchmark's own checkpoint in the same run:
page cache → host buffer copy bandwidth, cold read bandwidth of the disk (O_DIRECT, and
through the page cache), and on CUDA pinned host-to-device bandwidth.

Each figure is the best of a few passes: the floor is what the hardware allows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..devices import device_ops
from ..io import DIRECT_ALIGN, AlignedRead, DirectReader
from .pagecache import cached_fraction, evict, unmap_pages

WINDOW_BYTES = 64 * 2**20  # one copy or one batch of reads: the size of a staging buffer
H2D_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Probes:
    """Bandwidths in GB/s (1e9 bytes per second)."""

    memcpy: float  # cached checkpoint pages -> staging buffer (pinned on CUDA), torch copy
    direct_cold: float  # evicted checkpoint, O_DIRECT, the better of 4 and 8 reader threads
    direct_cold_by_threads: dict[str, float]
    mapped_cold: float  # evicted checkpoint, copied out of its mapping (page faults, readahead)
    h2d: float | None  # pinned host -> device, CUDA only
    cached_after_evict: float  # fraction of the checkpoint still cached after eviction
    checkpoint_bytes: int
    torch_threads: int

    def read(self, cold: bool) -> float:
        """B_read of the floor: the disk for cold runs, the page cache otherwise."""
        return self.direct_cold if cold else self.memcpy

    def transfer(self, cold: bool) -> float:
        """min(B_read, B_h2d): what one streamed byte can move at, at best."""
        return min(self.read(cold), self.h2d) if self.h2d else self.read(cold)


def _best_rate(nbytes: int, fn: Callable[[], None], passes: int, before: Callable[[], None] = lambda: None) -> float:
    best = 0.0
    for _ in range(passes):
        before()
        start = time.perf_counter()
        fn()
        best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
    return best


def measure_probes(checkpoint: str, device: str) -> Probes:
    dev = torch.device(device)
    ops = device_ops(dev)
    with Checkpoint.open(checkpoint) as ckpt:
        paths = ckpt.shard_paths
        shards = [ckpt.shard(p).bytes for p in paths]
        nbytes = sum(s.numel() for s in shards)
        staging = ops.staging(WINDOW_BYTES)
        staging.fill_(0)  # touched: page faults of the buffer are not timed

        def copy_mapped() -> None:
            for src in shards:
                for at in range(0, src.numel(), WINDOW_BYTES):
                    piece = src[at:at + WINDOW_BYTES]
                    staging[:piece.numel()].copy_(piece)

        def evict_all() -> None:
            for src in shards:
                unmap_pages(src)
            evict(paths)

        copy_mapped()  # warm: every page cached and mapped
        memcpy = _best_rate(nbytes, copy_mapped, passes=3)
        mapped_cold = _best_rate(nbytes, copy_mapped, passes=1, before=evict_all)
        evict_all()
        cached_after_evict = cached_fraction(paths)
        direct = {}
        into = _aligned_buffer(WINDOW_BYTES)
        for threads in (4, 8):
            reader = DirectReader(paths, threads)
            try:
                direct[str(threads)] = _best_rate(nbytes, lambda: _read_direct(reader, paths, into), passes=1,
                                                  before=evict_all)
            finally:
                reader.close()
    return Probes(memcpy=memcpy, direct_cold=max(direct.values()), direct_cold_by_threads=direct,
                  mapped_cold=mapped_cold, h2d=_h2d(dev) if dev.type == "cuda" else None,
                  cached_after_evict=cached_after_evict, checkpoint_bytes=nbytes, torch_threads=torch.get_num_threads())


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


def _h2d(dev: torch.device) -> float:
    src = torch.empty(H2D_BYTES, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(H2D_BYTES, dtype=torch.uint8, device=dev)

    def copy() -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)  # a probe, not the hot path: time the whole copy

    copy()
    return _best_rate(H2D_BYTES, copy, passes=5)
