"""Bandwidth probe and calibration, measured once and cached per machine.

The probe measures what bounds streaming: host memcpy from the page cache (what a
read of a cached shard costs), storage reads, and on CUDA pinned host-to-device
copies (timed with events on the device). The device's rates are cached per machine
and device, the read rate per machine and file system. A calibration is one real call
of the model with every block timed; it is cached per machine, checkpoint, dtype and
device.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROBE_BYTES = 64 * 2**20


def cache_dir() -> Path:
    root = os.environ.get("LAZYSTREAM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lazystream"
    return Path(root)


@dataclass(frozen=True)
class Bandwidth:
    """Bytes per second of each path a streamed byte can take."""

    memcpy: float  # page cache / host memory -> host buffer
    read: float  # storage -> host (the checkpoint's shards, as cached or not)
    h2d: float | None  # pinned host -> device (CUDA only)

    def stream(self, device_type: str) -> float:
        """Bytes per second a streamed block moves at: the slowest stage."""
        stages = [self.memcpy, self.read] + ([self.h2d] if device_type == "cuda" and self.h2d else [])
        return min(stages)

    def bound(self, device_type: str) -> str:
        if device_type == "cuda" and self.h2d and self.h2d <= min(self.memcpy, self.read):
            return "pcie"
        return "disk" if self.read < 0.9 * self.memcpy else "memcpy"


def _median_rate(fn, nbytes: int, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / max(statistics.median(times), 1e-9)


def measure_device(device: torch.device) -> dict[str, float | None]:
    """Host memcpy and, on CUDA, pinned host-to-device bytes per second (about a second)."""
    src = torch.randint(0, 255, (PROBE_BYTES,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    memcpy = _median_rate(lambda: dst.copy_(src), PROBE_BYTES)
    h2d = PROBE_BYTES / statistics.median(h2d_seconds(device, PROBE_BYTES)) if device.type == "cuda" else None
    return {"memcpy": memcpy, "h2d": h2d}


def measure_read(shard: Path) -> float:
    """Bytes per second of the path streamed bytes take: a copy out of the shard's mapping
    (page cache, or the disk where the pages are not cached)."""
    import numpy as np

    size = min(shard.stat().st_size, PROBE_BYTES)
    mapped = torch.from_numpy(np.memmap(shard, dtype=np.uint8, mode="c", shape=(size,)))
    dst = torch.empty(size, dtype=torch.uint8)
    return _median_rate(lambda: dst.copy_(mapped), size, repeat=3)


def h2d_seconds(device: torch.device, nbytes: int, repeat: int = 5) -> list[float]:
    """Device seconds of ``repeat`` copies of one pinned host buffer of ``nbytes`` into
    device memory (after one warm-up), each timed by events on a stream of its own around
    the copy: the copy engine's time, not the host's."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream(device)
    # The side stream first waits for the caller's stream; then the destination is allocated
    # on the side stream itself. Allocated on the caller's stream instead, it could be a block
    # that stream's pending kernels still read (the caching allocator reuses a freed block at
    # once for the stream that freed it), and the copies here would overwrite it under them.
    stream.wait_stream(torch.cuda.current_stream(device))
    seconds = []
    with torch.cuda.device(device), torch.cuda.stream(stream):
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        for i in range(repeat + 1):
            start = torch.cuda.Event(enable_timing=True, blocking=True)
            end = torch.cuda.Event(enable_timing=True, blocking=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()  # also: dst and src are freed at return with no copy in flight
            if i:
                seconds.append(start.elapsed_time(end) / 1e3)
    return seconds


def bandwidth(device: torch.device, shard: Path | None = None, *, refresh: bool = False) -> Bandwidth:
    """The cached probe for this machine and device, measured on first use.

    The device's rates are one measurement under one key, whoever asks first: the planner
    (with ``shard``) or the loader sizing its staging ring (without). The read rate of
    ``shard`` is cached apart, per file system it lives on; without a shard (or for one
    under 1 MiB) it is taken as the memcpy rate.
    """
    key = _machine_key(device)
    rates = _cached(cache_dir() / "probe" / f"{key}.json", lambda: measure_device(device), refresh,
                    ("memcpy", "h2d"))
    read = rates["memcpy"]
    if shard is not None and shard.stat().st_size >= 2**20:
        storage = f"{key}-read-{shard.stat().st_dev:x}"
        read = _cached(cache_dir() / "probe" / f"{storage}.json", lambda: {"read": measure_read(shard)}, refresh,
                       ("read",))["read"]
    return Bandwidth(memcpy=rates["memcpy"], read=read, h2d=rates["h2d"])


def _cached(path: Path, measure: Callable[[], dict], refresh: bool, keys: tuple[str, ...]) -> dict:
    if not refresh and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, dict) and all(k in cached for k in keys):
                return cached
        except ValueError:
            pass
    result = measure()  # none cached, or unreadable: measured again
    _write_json(path, result)
    return result


@dataclass(frozen=True)
class Calibration:
    """Measured on one real call: seconds per block (registration order), outside the
    blocks, and the device memory the call's activations took."""

    block_compute: tuple[float, ...]
    other_compute: float
    activation_bytes: int


def calibration_path(device: torch.device, checkpoint_id: str, dtype: torch.dtype) -> Path:
    digest = hashlib.sha1(f"{checkpoint_id}|{dtype}".encode()).hexdigest()[:16]
    return cache_dir() / "calibration" / f"{_machine_key(device)}-{digest}.json"


def load_calibration(path: Path) -> Calibration | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
        return Calibration(tuple(obj["block_compute"]), obj["other_compute"], obj["activation_bytes"])
    except (ValueError, KeyError, TypeError):
        return None


def save_calibration(path: Path, calibration: Calibration) -> None:
    _write_json(path, asdict(calibration))


def _machine_key(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    raw = f"{platform.node()}|{name}|{device.type}"
    return f"{device.type}-{hashlib.sha1(raw.encode()).hexdigest()[:12]}"


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
