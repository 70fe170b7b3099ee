"""Moving bytes from the mapped shards into device buffers.

A job is a list of copy runs into one destination buffer. Jobs run in submission order
on one worker thread (or inline). Staged jobs go through a small ring of pinned host
buffers: the worker fills one from the mapped shards while the copy engine drains the
other into the device. Direct jobs (host destinations only) copy from the map straight
into the destination.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, CopyRun
from .devices import CudaDevice, HostDevice


@dataclass(frozen=True)
class IOConfig:
    """How bytes travel. Defaults suit both devices; tests flip them to cover every path.

    Args:
        threaded: run jobs on a worker thread, overlapped with compute (else inline).
        staged: go through the pinned staging ring; None means "on CUDA only".
        staging_bytes: size of each staging buffer.
        staging_buffers: buffers in the ring (2 lets the fill and the device copy overlap).
    """

    threaded: bool = True
    staged: bool | None = None
    staging_bytes: int = 64 * 2**20
    staging_buffers: int = 2

    def __post_init__(self) -> None:
        if self.staging_bytes < 4096 or self.staging_buffers < 1:
            raise ValueError(f"staging needs >= 1 buffer of >= 4096 bytes, got {self.staging_buffers} x {self.staging_bytes}")


@dataclass
class Ticket:
    """A submitted job. ``wait()`` on the host, then order compute after ``ready``."""

    nbytes: int
    done: threading.Event = field(default_factory=threading.Event)
    ready: object = None  # device marker after the job's last copy
    error: BaseException | None = None
    seconds: float = 0.0  # worker time spent copying

    def wait(self) -> float:
        """Block until the job's copies are issued; return the seconds waited."""
        start = time.perf_counter()
        self.done.wait()
        waited = time.perf_counter() - start
        if self.error is not None:
            raise self.error
        return waited


class Loader:
    """Runs copy jobs from one checkpoint into device buffers, in submission order."""

    def __init__(self, ckpt: Checkpoint, ops: HostDevice | CudaDevice, config: IOConfig):
        self.ckpt = ckpt
        self.ops = ops
        self.config = config
        self.staged = ops.is_cuda if config.staged is None else config.staged
        if ops.is_cuda and not self.staged:
            raise ValueError("on CUDA, bytes must go through the pinned staging ring (IOConfig.staged)")
        self._ring: list[tuple[torch.Tensor, object]] | None = None
        self._ring_next = 0
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self.bytes_read = 0

    @property
    def staging_bytes(self) -> int:
        return 0 if self._ring is None else sum(buf.numel() for buf, _ in self._ring)

    def submit(self, runs: list[CopyRun], dest: torch.Tensor, after: object = None) -> Ticket:
        """Copy ``runs`` into ``dest`` (a 1-D uint8 buffer) after device marker ``after``."""
        ticket = Ticket(nbytes=sum(r.nbytes for r in runs))
        if not self.config.threaded:
            self._run(runs, dest, after, ticket)
            return ticket
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._work, name="lazystream-io", daemon=True)
            self._thread.start()
        self._queue.put((runs, dest, after, ticket))
        return ticket

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._run(*job)

    def _run(self, runs: list[CopyRun], dest: torch.Tensor, after: object, ticket: Ticket) -> None:
        start = time.perf_counter()
        try:
            for path in {r.file for r in runs}:
                self.ckpt.shard(path).check_unchanged()
            if self.staged:
                self._run_staged(runs, dest, after, ticket)
            else:
                for run in runs:
                    self.ckpt.copy_run(run, dest)
            self.bytes_read += ticket.nbytes
        except BaseException as exc:  # handed to the waiting thread, which re-raises it
            ticket.error = exc
        finally:
            ticket.seconds = time.perf_counter() - start
            ticket.done.set()

    def _run_staged(self, runs: list[CopyRun], dest: torch.Tensor, after: object, ticket: Ticket) -> None:
        ring = self._staging_ring()
        size = ring[0][0].numel()
        self.ops.copy_waits_for(after)
        for seg_start, seg_end, seg_runs in _segments(runs, size):
            index = self._ring_next
            self._ring_next = (index + 1) % len(ring)
            buf, in_flight = ring[index]
            self.ops.host_waits_for(in_flight)
            for run in seg_runs:
                self.ckpt.copy_run(CopyRun(run.file, run.offset, run.dest_offset - seg_start, run.nbytes), buf)
            self.ops.copy_in(dest[seg_start:seg_end], buf[: seg_end - seg_start])
            ring[index] = (buf, self.ops.copy_done())
        ticket.ready = self.ops.copy_done()

    def _staging_ring(self) -> list[tuple[torch.Tensor, object]]:
        if self._ring is None:
            n, size = self.config.staging_buffers, self.config.staging_bytes
            self._ring = [(self.ops.staging(size), None) for _ in range(n)]
        return self._ring

    def drain(self) -> None:
        """Wait until every submitted job has finished, on the host and on the device."""
        if self._thread is not None:
            flushed = Ticket(nbytes=0)
            self._queue.put(([], None, None, flushed))
            flushed.done.wait()
        for _, marker in self._ring or []:
            self.ops.host_waits_for(marker)

    def close(self) -> None:
        """Finish pending jobs, stop the worker, free the staging ring. Idempotent."""
        if self._thread is threading.current_thread():
            # Garbage collection ran the finalizer on the worker itself: it cannot wait for
            # its own queue. Stop it after the jobs already queued.
            self._queue.put(None)
            self._thread = None
            return
        if self._thread is not None:
            self.drain()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.drain()
        self._ring = None


def _segments(runs: list[CopyRun], size: int):
    """Group runs (by destination) into spans of at most ``size`` destination bytes.

    Yields (start, end, runs) with each run inside [start, end). A run longer than
    ``size`` is split. Gaps between runs inside a span are copied as they are (garbage
    padding that nothing reads), so each span reaches the device in one copy.
    """
    pending: list[CopyRun] = []
    start = end = 0
    for run in sorted(runs, key=lambda r: r.dest_offset):
        offset, dest, left = run.offset, run.dest_offset, run.nbytes
        while left:
            if pending and dest - start >= size:
                yield start, end, pending
                pending = []
            if not pending:
                start = dest
            take = min(left, start + size - dest)
            pending.append(CopyRun(run.file, offset, dest, take))
            end = dest + take
            offset, dest, left = offset + take, dest + take, left - take
    if pending:
        yield start, end, pending
