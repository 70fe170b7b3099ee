"""Counters of what streaming cost: bytes, blocks, stalls, copy time."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class CallStats:
    """What one call (or, summed, every call) of the model streamed and waited for."""

    bytes_streamed: int = 0  # bytes of the streamed blocks bound during the call
    blocks_streamed: int = 0
    stalls: int = 0  # blocks that had not been prefetched and were loaded on demand
    stall_seconds: float = 0.0  # host time a block's forward waited for its bytes
    copy_seconds: float = 0.0  # worker time spent copying those blocks' bytes
    seconds: float = 0.0  # wall time of the call

    @property
    def gb_per_s(self) -> float:
        """Achieved copy bandwidth (GB/s, 1e9 bytes) of the streamed bytes."""
        return self.bytes_streamed / self.copy_seconds / 1e9 if self.copy_seconds else 0.0

    def add(self, other: CallStats) -> None:
        for name in ("bytes_streamed", "blocks_streamed", "stalls", "stall_seconds", "copy_seconds", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def copy(self) -> CallStats:
        return replace(self)


@dataclass(frozen=True)
class Stats:
    """A snapshot from ``streamer_of(model).stats()``."""

    calls: int
    last_call: CallStats
    total: CallStats
    resident_bytes: int  # arena of non-block tensors and resident blocks
    kept_bytes: int  # buffers and checkpoint-less parameters
    slot_bytes: int  # all slots together
    scratch_bytes: int
    staging_bytes: int  # pinned (CUDA) or plain host staging ring
    bytes_read: int  # every byte the loader copied, resident set and wasted prefetches included

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.kept_bytes + self.slot_bytes + self.scratch_bytes

    def __str__(self) -> str:
        mib, t, c = 2**20, self.total, self.last_call
        return "\n".join([
            f"calls {self.calls}; last call: {c.bytes_streamed / mib:.1f} MiB in {c.blocks_streamed} blocks, "
            f"{c.stalls} stalls ({c.stall_seconds * 1e3:.1f} ms), copy {c.gb_per_s:.2f} GB/s, {c.seconds * 1e3:.1f} ms",
            f"total: {t.bytes_streamed / mib:.1f} MiB streamed, {t.stalls} stalls ({t.stall_seconds:.3f} s), "
            f"copy {t.gb_per_s:.2f} GB/s",
            f"device {self.device_bytes / mib:.1f} MiB = resident {self.resident_bytes / mib:.1f} + buffers "
            f"{self.kept_bytes / mib:.1f} + slots {self.slot_bytes / mib:.1f} + scratch {self.scratch_bytes / mib:.1f}; "
            f"host staging {self.staging_bytes / mib:.1f} MiB",
        ])


def rss_anon() -> int:
    """This process's resident anonymous memory in bytes (Linux; 0 elsewhere).

    Pages of the mapped shards are file-backed and not counted: this is the memory a copy
    of the model would take.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRssAnon:
    """Context manager sampling :func:`rss_anon` on a thread; ``.growth`` is the peak
    over the block minus the value on entry."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.base = self.peak = 0

    def __enter__(self) -> PeakRssAnon:
        import threading

        self.base = self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def growth(self) -> int:
        return self.peak - self.base


class BlockTimer:
    """Times one call of a model: each block's forward and the whole call, and on CUDA
    the peak device memory its activations took. Used for the calibration call only."""

    def __init__(self, modules: list, device):
        import time

        import torch

        self._torch, self._time, self.device = torch, time, device
        self._cuda = device.type == "cuda"
        self._marks: list[list] = [[None, None] for _ in modules]
        self._handles = []
        for i, module in enumerate(modules):
            self._handles.append(module.register_forward_pre_hook(self._marker(i, 0)))
            self._handles.append(module.register_forward_hook(self._marker(i, 1), always_call=True))
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(device)  # calibration only: the peak of this call
            self._base = torch.cuda.memory_allocated(device)
        self._start = self._now()

    def _now(self):
        if self._cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self._time.perf_counter()

    def _marker(self, index: int, end: int):
        def hook(*args):
            if self._marks[index][end] is None:  # the first run of the block counts
                self._marks[index][end] = self._now()
        return hook

    def _seconds(self, start, end) -> float:
        if start is None or end is None:
            return 0.0
        return start.elapsed_time(end) / 1e3 if self._cuda else end - start

    def finish(self, waited_seconds: float):
        """Remove the hooks; return a probe.Calibration. ``waited_seconds``: time the
        call spent waiting for streamed bytes, which is not compute."""
        from .probe import Calibration

        end = self._now()
        for handle in self._handles:
            handle.remove()
        if self._cuda:
            self._torch.cuda.synchronize(self.device)  # calibration only: read the events
            activation = self._torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            activation = 0
        blocks = tuple(self._seconds(s, e) for s, e in self._marks)
        other = max(0.0, self._seconds(self._start, end) - sum(blocks) - waited_seconds)
        return Calibration(block_compute=blocks, other_compute=other, activation_bytes=max(activation, 0))
