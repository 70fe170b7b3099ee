"""Moving bytes from the shards into device buffers.

A job is a list of copy runs into one destination buffer. Jobs run in submission order
on one worker thread (or inline). Staged jobs go through a small ring of pinned host
buffers: the worker fills one while the copy engine drains the other into the device.
Unstaged jobs (host destinations only) copy from the map straight into the destination.

Two ways to read the shards (``IOConfig.mode``):
  mmap    copy out of the memory-mapped shards: served by the page cache when the
          checkpoint is cached, else by page faults and the kernel's readahead;
  direct  ``preadv`` on ``O_DIRECT`` descriptors into an aligned staging buffer, aligned
          requests of up to READ_CHUNK_BYTES from several threads: the page cache is
          neither used nor filled, so a checkpoint larger than the RAM does not evict
          every other cached file on each call (and is never served from the cache).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CopyRun
from .devices import CudaDevice, HostDevice
from .errors import ShardChangedError

MODES = ("mmap", "direct")
# O_DIRECT needs the file offset, the length and the buffer address aligned to the
# device's logical block size (512 or 4096 bytes); 4096 satisfies both.
DIRECT_ALIGN = 4096
# One preadv of at most this many bytes per reader thread at a time: large enough for
# the disk's full bandwidth, small enough to spread one block over every thread.
READ_CHUNK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class IOConfig:
    """How bytes travel. Defaults suit both devices; tests flip them to cover every path.

    Args:
        threaded: run jobs on a worker thread, overlapped with compute (else inline).
        staged: go through the pinned staging ring; None means on CUDA, or in "direct" mode.
        staging_bytes: size of each staging buffer.
        staging_buffers: buffers in the ring (2 lets the fill and the device copy overlap).
        mode: "mmap" (copy out of the mapped shards, through the page cache) or "direct"
            (O_DIRECT reads that bypass it; always staged, on the CPU device too).
        read_threads: threads issuing the reads of one staging buffer in "direct" mode.

    Example:
        >>> LazyStreamModel.from_pretrained(repo, keep_gpu=8, io=IOConfig(mode="direct"))
    """

    threaded: bool = True
    staged: bool | None = None
    staging_bytes: int = 64 * 2**20
    staging_buffers: int = 2
    mode: str = "mmap"
    read_threads: int = 4

    def __post_init__(self) -> None:
        if self.staging_bytes < DIRECT_ALIGN or self.staging_buffers < 1:
            raise ValueError(f"staging needs >= 1 buffer of >= {DIRECT_ALIGN} bytes, "
                             f"got {self.staging_buffers} x {self.staging_bytes}")
        if self.mode not in MODES:
            raise ValueError(f"IOConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.read_threads < 1:
            raise ValueError(f"IOConfig.read_threads must be >= 1, got {self.read_threads}")
        if self.mode == "direct" and self.staged is False:
            raise ValueError("IOConfig(mode='direct') reads into the aligned staging ring: "
                             "leave staged at None or set True")


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
        direct = config.mode == "direct"
        self.staged = (ops.is_cuda or direct) if config.staged is None else config.staged
        if ops.is_cuda and not self.staged:
            raise ValueError("on CUDA, bytes must go through the pinned staging ring (IOConfig.staged)")
        self._reader = DirectReader(ckpt.shard_paths, config.read_threads) if direct else None
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
        if self._thread is None and self._reader is not None:
            # close() ran on this thread (see there): the jobs queued before it needed the
            # reader's descriptors; now that they are done, close them.
            self._reader.close()

    def _run(self, runs: list[CopyRun], dest: torch.Tensor, after: object, ticket: Ticket) -> None:
        start = time.perf_counter()
        try:
            for path in {r.file for r in runs}:
                self.ckpt.shard(path).check_unchanged()
            if self._reader is not None:
                self._run_direct(runs, dest, after, ticket)
            elif self.staged:
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

    def _run_direct(self, runs: list[CopyRun], dest: torch.Tensor, after: object, ticket: Ticket) -> None:
        ring = self._staging_ring()
        size = ring[0][0].numel()
        self.ops.copy_waits_for(after)
        for reads, places in _direct_segments(runs, size):
            index = self._ring_next
            self._ring_next = (index + 1) % len(ring)
            buf, in_flight = ring[index]
            self.ops.host_waits_for(in_flight)
            self._reader.read(reads, buf)
            for p in places:
                target = dest[p.dest_offset:p.dest_offset + p.nbytes]
                self.ops.copy_in(target, buf[p.buf_offset:p.buf_offset + p.nbytes])
            ring[index] = (buf, self.ops.copy_done())
        ticket.ready = self.ops.copy_done()

    def _staging_ring(self) -> list[tuple[torch.Tensor, object]]:
        if self._ring is None:
            n, size = self.config.staging_buffers, self.config.staging_bytes
            make = self._aligned_staging if self._reader is not None else self.ops.staging
            self._ring = [(make(size), None) for _ in range(n)]
        return self._ring

    def _aligned_staging(self, nbytes: int) -> torch.Tensor:
        """A staging buffer whose address O_DIRECT accepts. Pinned buffers are page-aligned
        already; a plain host buffer is only 64-byte aligned, so it gets a page more."""
        buf = self.ops.staging(nbytes)
        if buf.data_ptr() % DIRECT_ALIGN == 0:
            return buf
        raw = self.ops.staging(nbytes + DIRECT_ALIGN)
        shift = -raw.data_ptr() % DIRECT_ALIGN
        return raw[shift:shift + nbytes]

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
            # its own queue. Stop it after the jobs already queued; it closes the reader.
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
        if self._reader is not None:
            self._reader.close()


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


@dataclass(frozen=True)
class AlignedRead:
    """One O_DIRECT read: ``length`` bytes at ``offset`` of ``file`` into the staging
    buffer at ``buf_offset`` (all three DIRECT_ALIGN-aligned); the first ``need`` bytes
    must arrive, the rest is padding up to the alignment (past the end of file, say)."""

    file: Path
    offset: int
    length: int
    buf_offset: int
    need: int


@dataclass(frozen=True)
class Placement:
    """``nbytes`` of the staging buffer at ``buf_offset`` go to ``dest_offset``."""

    buf_offset: int
    dest_offset: int
    nbytes: int


def _direct_segments(runs: list[CopyRun], size: int) -> Iterator[tuple[list[AlignedRead], list[Placement]]]:
    """Lay ``runs`` into staging buffers of ``size`` bytes as aligned reads.

    Runs are taken in file order; a run whose aligned range starts inside (or right
    after) the previous read of the same file extends that read, so neighbours share
    their boundary blocks. A run that does not fit the buffer's rest is split at an
    aligned file offset. Yields, per buffer fill, the reads and where each run's bytes
    then sit in the buffer.
    """
    usable = size // DIRECT_ALIGN * DIRECT_ALIGN
    reads: list[AlignedRead] = []
    places: list[Placement] = []
    used = 0
    for run in sorted(runs, key=lambda r: (str(r.file), r.offset)):
        offset, dest, left = run.offset, run.dest_offset, run.nbytes
        while left:
            start = offset // DIRECT_ALIGN * DIRECT_ALIGN
            last = reads[-1] if reads else None
            if last is not None and last.file == run.file and last.offset <= start <= last.offset + last.length:
                end = min(_round_up(offset + left, DIRECT_ALIGN), last.offset + usable - last.buf_offset)
                if end <= offset:  # the buffer is full
                    yield reads, places
                    reads, places, used = [], [], 0
                    continue
                take = min(left, end - offset)
                length = max(last.length, end - last.offset)
                reads[-1] = AlignedRead(last.file, last.offset, length, last.buf_offset,
                                        max(last.need, offset + take - last.offset))
                at = last.buf_offset + offset - last.offset
                used = last.buf_offset + length
            else:
                if used == usable:
                    yield reads, places
                    reads, places, used = [], [], 0
                end = min(_round_up(offset + left, DIRECT_ALIGN), start + usable - used)
                take = min(left, end - offset)
                reads.append(AlignedRead(run.file, start, end - start, used, offset + take - start))
                at = used + offset - start
                used += end - start
            prev = places[-1] if places else None
            if prev is not None and prev.buf_offset + prev.nbytes == at and prev.dest_offset + prev.nbytes == dest:
                places[-1] = Placement(prev.buf_offset, prev.dest_offset, prev.nbytes + take)
            else:
                places.append(Placement(at, dest, take))
            offset, dest, left = offset + take, dest + take, left - take
    if reads:
        yield reads, places


class DirectReader:
    """Reads aligned byte ranges of the shards with O_DIRECT on a small thread pool.

    One descriptor per shard, opened here and kept until :meth:`close`. Where the
    filesystem refuses O_DIRECT (tmpfs, some network filesystems: EINVAL), that shard
    is read with a plain pread through the page cache instead, with one warning.
    """

    def __init__(self, paths: list[Path], threads: int):
        self._lock = threading.Lock()
        self._warned = False
        self._retired: list[int] = []
        self._fds: dict[Path, int] = {}
        self._direct: dict[Path, bool] = {}
        try:
            for path in paths:
                self._fds[path], self._direct[path] = self._open(path)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lazystream-read") if threads > 1 else None

    def _open(self, path: Path) -> tuple[int, bool]:
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            self._fall_back(path, "this platform has no O_DIRECT")
            return os.open(path, os.O_RDONLY), False
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fall_back(path, "the filesystem refused to open it with O_DIRECT (EINVAL)")
            return os.open(path, os.O_RDONLY), False

    def _fall_back(self, path: Path, reason: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{path}: {reason}; IOConfig(mode='direct') reads such shards with a plain pread through the page "
                "cache instead (use mode='mmap' to silence this)",
                RuntimeWarning,
                stacklevel=4,
            )

    def read(self, reads: list[AlignedRead], buf: torch.Tensor) -> None:
        """Fill ``buf`` (DIRECT_ALIGN-aligned) as ``reads`` say; return when every read is done."""
        view = memoryview(buf.numpy())
        chunks = []
        for r in reads:
            for at in range(0, r.length, READ_CHUNK_BYTES):
                n = min(READ_CHUNK_BYTES, r.length - at)
                need = min(n, r.need - at)
                if need > 0:
                    chunks.append((r.file, r.offset + at, view[r.buf_offset + at:r.buf_offset + at + n], need))
        if self._pool is None or len(chunks) == 1:
            for chunk in chunks:
                self._pread(*chunk)
            return
        futures = [self._pool.submit(self._pread, *chunk) for chunk in chunks]
        # Every read must finish before the buffer is handed on or an error is raised:
        # a read still running would write into a buffer already being refilled.
        wait(futures)
        for future in futures:
            future.result()

    def _pread(self, path: Path, offset: int, into: memoryview, need: int) -> None:
        try:
            got = os.preadv(self._fds[path], [into], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct[path]:
                what = f"reading {len(into)} bytes at offset {offset}: {exc.strerror}"
                raise OSError(exc.errno, what, str(path)) from None
            # The filesystem opened the file with O_DIRECT but refuses the read itself.
            self._reopen_buffered(path)
            got = os.preadv(self._fds[path], [into], offset)
        if got < need:
            raise ShardChangedError(
                f"{path} ends at byte {offset + got}; expected at least {offset + need} bytes. The file was truncated "
                "after it was opened: reload the model to read the new file",
                path=path,
            )

    def _reopen_buffered(self, path: Path) -> None:
        with self._lock:
            if self._direct[path]:
                self._fall_back(path, "the filesystem refused an O_DIRECT read (EINVAL)")
                # The O_DIRECT descriptor stays open until close(): another reader thread
                # may still hold its number, which a closed-then-reused number would
                # silently point at another file.
                self._retired.append(self._fds[path])
                self._fds[path], self._direct[path] = os.open(path, os.O_RDONLY), False

    def close(self) -> None:
        """Stop the threads and close every descriptor. Idempotent."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None
        fds, self._fds, retired, self._retired = self._fds, {}, self._retired, []
        for fd in [*fds.values(), *retired]:
            os.close(fd)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
