"""What one benchmark run is (a method and its settings) and which runs a benchmark makes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..io import IOConfig

METHODS = ("resident", "lazystream", "group_offload", "cpu_offload", "device_map", "first_n_sequential")


# lazystream's ``io`` settings by label. "staged" runs the staging ring on the CPU device
# too (on CUDA it is what "mmap" does); "staged-1thread" is the ring this project had
# before the multi-threaded one: one reader, two buffers of 64 MiB.
IO_CONFIGS = {
    "mmap": IOConfig(),
    "direct": IOConfig(mode="direct"),
    "register": IOConfig(mode="register"),
    "staged": IOConfig(staged=True),
    "staged-1thread": IOConfig(staged=True, read_threads=1, staging_buffers=2, staging_bytes=64 * 2**20),
}


@dataclass(frozen=True)
class Run:
    """One method at one setting.

    ``keep``: blocks kept on the device (lazystream, device_map, first_n_sequential);
    ``placement`` and ``io``: lazystream's options; ``offload_type``, ``use_stream`` and
    ``disk``: diffusers group offloading's; ``offload``: where device_map puts the
    other blocks ("cpu" or "disk"); ``cold``: evict the checkpoint's pages from the
    page cache before every call.
    """

    method: str
    keep: int | None = None
    placement: str | None = None
    io: str | None = None
    offload_type: str | None = None
    use_stream: bool = False
    disk: bool = False
    offload: str | None = None
    cold: bool = False

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.keep is not None:
            parts.append(f"keep={self.keep}")
        parts += [p for p in (self.placement, self.io, self.offload_type) if p]
        if self.use_stream:
            parts.append("stream")
        if self.disk:
            parts.append("disk")
        if self.offload:
            parts.append(f"rest on {self.offload}")
        if self.cold:
            parts.append("cold")
        return " ".join(parts)

    @property
    def needs_cuda(self) -> bool:
        """Whether the method means anything only with a separate device: on the CPU
        device, moving weights "to the device" is a no-op, and streams need CUDA."""
        if self.method in ("cpu_offload", "first_n_sequential") or self.use_stream or self.io == "register":
            return True
        if self.method == "group_offload":
            return not self.disk
        return self.method == "device_map" and self.offload == "cpu"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, obj: dict) -> Run:
        return cls(**obj)


def keep_fractions(n_blocks: int) -> list[int]:
    """0, 1/4, 1/2 and 3/4 of the blocks (distinct values only)."""
    return sorted({0, n_blocks // 4, n_blocks // 2, 3 * n_blocks // 4})


def plan_runs(n_blocks: int, *, cuda: bool, quick: bool = False) -> list[Run]:
    """Every run of a benchmark, resident first (its output is the reference).

    ``quick``: a smoke run (lazystream at 0 and 1/2 of the blocks, spread only; one run
    of each peer that the device can run). Besides the grid: lazystream at 0 with the
    shard mappings registered (CUDA), with the staging ring on the CPU device, and with
    the single-thread ring it replaced.
    """
    keeps = [0, n_blocks // 2] if quick else keep_fractions(n_blocks)
    placements = ("spread",) if quick else ("first", "spread")
    runs = [Run("resident"), Run("lazystream", keep=n_blocks, placement="spread", io="mmap")]
    for keep in keeps:
        for placement in placements if keep else ("spread",):  # nothing resident: no placement
            for io in ("mmap", "direct"):
                runs.append(Run("lazystream", keep=keep, placement=placement, io=io))
    runs += [Run("lazystream", keep=0, placement="spread", io=io, cold=True) for io in ("mmap", "direct")]
    ring_variants = ("register", "staged-1thread") if cuda else ("staged", "staged-1thread")
    runs += [Run("lazystream", keep=0, placement="spread", io=io) for io in ring_variants]

    partial = [k for k in keeps if 0 < k < n_blocks] or [0]
    runs += [Run("device_map", keep=k, offload="cpu") for k in partial]
    runs += [Run("device_map", keep=k, offload="disk") for k in ([0] if quick else [0, n_blocks // 2])]
    runs.append(Run("device_map", keep=0, offload="disk", cold=True))
    runs.append(Run("cpu_offload"))
    for offload_type in ("block_level", "leaf_level"):
        for use_stream in (False, True):
            runs.append(Run("group_offload", offload_type=offload_type, use_stream=use_stream))
    # Disk mode: with streams where the device has them (as diffusers recommends).
    disk_types = ("block_level",) if quick else ("block_level", "leaf_level")
    runs += [Run("group_offload", offload_type=t, use_stream=cuda, disk=True) for t in disk_types]
    runs += [Run("first_n_sequential", keep=k) for k in partial]
    return runs
