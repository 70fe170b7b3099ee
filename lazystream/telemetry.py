"""Counters of what streaming cost: bytes, blocks, exposed stalls, fill and device copy
rates; host memory; per-block compute times for the calibration call."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

_SUMMED = ("bytes_streamed", "blocks_streamed", "on_demand_loads", "stall_seconds", "fill_bytes", "fill_seconds",
           "h2d_bytes", "h2d_seconds", "seconds")


@dataclass
class CallStats:
    """What one call (or, summed, every call) of the model streamed and waited for.

    Three separate figures, so that a slow stage can be told from another:
    ``stall_seconds`` is the exposed stall (host time the blocks' forwards waited for
    their bytes); ``fill_gb_per_s`` the rate of the host reading those bytes into
    staging; ``h2d_gb_per_s`` the rate of the device copies themselves, timed by events
    on the copy stream (on the CPU device: the copy into the slot, timed on the host).
    """

    bytes_streamed: int = 0  # bytes of the streamed blocks bound during the call
    blocks_streamed: int = 0
    on_demand_loads: int = 0  # blocks that had not been prefetched, loaded when their forward began
    stall_seconds: float = 0.0  # host time the blocks' forwards waited for their bytes
    fill_bytes: int = 0  # bytes read into staging (0 where nothing is staged)
    fill_seconds: float = 0.0  # wall time some reader thread was filling them
    h2d_bytes: int = 0  # bytes whose device copies have been timed
    h2d_seconds: float = 0.0  # device time of those copies (the copy engine busy)
    seconds: float = 0.0  # wall time of the call
    _pending: list = field(default_factory=list, repr=False, compare=False)  # tickets not yet timed

    @property
    def stalls(self) -> int:
        """The older name of ``on_demand_loads``."""
        return self.on_demand_loads

    @property
    def h2d_gb_per_s(self) -> float:
        """Device copy bandwidth (GB/s, 1e9 bytes) while copying, from copy-stream events."""
        return self.h2d_bytes / self.h2d_seconds / 1e9 if self.h2d_seconds else 0.0

    @property
    def fill_gb_per_s(self) -> float:
        """Host read bandwidth into staging (GB/s) while some reader was filling."""
        return self.fill_bytes / self.fill_seconds / 1e9 if self.fill_seconds else 0.0

    def add_block(self, nbytes: int, *, on_demand: bool, waited: float, ticket) -> None:
        """Count one streamed block bound for a forward: ``waited`` seconds on the host for
        its bytes, which ``ticket`` (a lazystream.io.Ticket) brought."""
        self.bytes_streamed += nbytes
        self.blocks_streamed += 1
        self.on_demand_loads += on_demand
        self.stall_seconds += waited
        self.fill_bytes += ticket.fill_bytes
        self.fill_seconds += ticket.fill_seconds
        self._pending.append(ticket)
        self.settle(wait=False)

    def settle(self, *, wait: bool) -> None:
        """Add the device copy times of the blocks whose copies have finished (all of them,
        waiting on the host, with ``wait``). Never waits in the hot path: only stats() does."""
        pending = []
        for ticket in self._pending:
            timed = ticket.copy_time(wait=wait)
            if timed is None:
                pending.append(ticket)
            else:
                self.h2d_bytes += timed[0]
                self.h2d_seconds += timed[1]
        self._pending = pending

    def add(self, other: CallStats) -> None:
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._pending += other._pending  # each ticket caches its time: timing it twice is free
        self.settle(wait=False)

    def copy(self) -> CallStats:
        """A snapshot with every device copy timed (waits for the copies still running)."""
        self.settle(wait=True)
        return replace(self, _pending=[])


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
            f"{_rates(c)}, {c.seconds * 1e3:.1f} ms",
            f"total: {t.bytes_streamed / mib:.1f} MiB streamed, {_rates(t)}",
            f"device {self.device_bytes / mib:.1f} MiB = resident {self.resident_bytes / mib:.1f} + buffers "
            f"{self.kept_bytes / mib:.1f} + slots {self.slot_bytes / mib:.1f} + scratch {self.scratch_bytes / mib:.1f}; "
            f"host staging {self.staging_bytes / mib:.1f} MiB",
        ])


def _rates(c: CallStats) -> str:
    # Unstaged (the CPU device's default) nothing is filled: no fill rate to show.
    fill = f", fill {c.fill_gb_per_s:.2f} GB/s" if c.fill_bytes else ""
    return (f"waited {c.stall_seconds * 1e3:.1f} ms for bytes (on-demand loads {c.on_demand_loads}), "
            f"device copy {c.h2d_gb_per_s:.2f} GB/s{fill}")


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
    """Times one call of a model: each block's compute and the whole call, and on CUDA the
    peak device memory its activations took. Used for the calibration call only.

    Three marks per block: when its forward is entered (before any hook, so before the
    streamer waits for the block's bytes), when its compute starts (after the streamer's
    hook, and on CUDA after the compute stream's wait for the copy) and when it ends. A
    block's compute is start to end; the time from entering to start is a stall, on the
    host or on the device, and counts neither as the block's compute nor as the compute
    outside the blocks. On CUDA the marks are events on the model device's current stream,
    the stream the forward's kernels run on.
    """

    def __init__(self, modules: list, device):
        import torch

        self._torch, self.device = torch, device
        self._cuda = device.type == "cuda"
        self._marks: list[list] = [[None, None, None] for _ in modules]
        self._handles = []
        for i, module in enumerate(modules):
            self._handles.append(module.register_forward_pre_hook(self._marker(i, 0), prepend=True))
            self._handles.append(module.register_forward_pre_hook(self._marker(i, 1)))
            self._handles.append(module.register_forward_hook(self._marker(i, 2), always_call=True))
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(device)  # calibration only: the peak of this call
            self._base = torch.cuda.memory_allocated(device)
        self._start = self._now()

    def _now(self):
        from .devices import timing_mark

        return timing_mark(self.device)

    def _marker(self, index: int, which: int):
        def hook(*args):
            marks = self._marks[index]
            if marks[which] is None and (which == 0 or marks[0] is not None):  # the first run counts
                marks[which] = self._now()
        return hook

    def _seconds(self, start, end) -> float:
        from .devices import elapsed_seconds

        if start is None or end is None:
            return 0.0
        return elapsed_seconds(start, end, wait=True)

    def finish(self):
        """Remove the hooks; return a probe.Calibration."""
        from .probe import Calibration

        end = self._now()
        for handle in self._handles:
            handle.remove()
        if self._cuda:
            self._torch.cuda.synchronize(self.device)  # calibration only: read the events
            activation = self._torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            activation = 0
        blocks = tuple(self._seconds(start, stop) for _, start, stop in self._marks)
        inside = sum(self._seconds(enter, stop) for enter, _, stop in self._marks)
        other = max(0.0, self._seconds(self._start, end) - inside)
        return Calibration(block_compute=blocks, other_compute=other, activation_bytes=max(activation, 0))
