"""Moving bytes from the shards into device buffers.

A job is a list of copy runs into one destination buffer (a slot, the resident arena).
Jobs complete in submission order. Three ways for a job's bytes to travel:

  staged      (every job on CUDA in "mmap" and "direct" mode) a ring of small staging
              buffers, one pinned allocation sliced: the job is cut into pieces of at most
              one buffer, several reader threads each fill a piece, and each piece's
              device copy is issued on the copy stream as soon as that piece is full, in
              whatever order the pieces fill. A job's copies are issued only after every
              copy of the jobs before it, so a slot's wait for its previous reader never
              holds up an earlier job; reading runs ahead, into the next jobs, as far as
              the ring has free buffers.
  registered  (mode "register") each shard is mapped a second time, shared and
              read-only, and page-locked for the device (``cudaHostRegister``): the copy
              engine reads the page cache itself, no reader thread touches a byte.
  unstaged    (the CPU device in "mmap" mode) straight from the map into the slot.

Two ways to read the shards into staging (``IOConfig.mode``):
  mmap    copy out of the memory-mapped shards (``numpy.copyto``, GIL released): served
          by the page cache when the checkpoint is cached, else by page faults and the
          kernel's readahead;
  direct  ``preadv`` on ``O_DIRECT`` descriptors into the aligned staging ring, one
          request per reader thread in flight (a queue depth of read_threads): the page
          cache is neither used nor filled, so a checkpoint larger than the RAM does not
          evict every other cached file on each call (and is never served from the cache).

Every ordering runs on the CPU device too (``IOConfig(staged=True)``, or mode "direct"
or "register"); only the thin layer in devices.py differs.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, CopyRun
from .devices import CudaDevice, HostDevice, elapsed_seconds
from .errors import ClosedError, HostRegisterError, LazyStreamError, ShardChangedError, StagingMemoryError

MODES = ("mmap", "direct", "register")
# O_DIRECT needs the file offset, the length and the buffer address aligned to the
# device's logical block size (512 or 4096 bytes); 4096 satisfies both.
DIRECT_ALIGN = 4096
# One preadv of at most this many bytes at a time: large enough for the disk's full
# bandwidth, small enough that a thread's request is not one huge transfer.
READ_CHUNK_BYTES = 4 * 2**20

# -- sizing the ring (IOConfig fields left at None) ------------------------------------
# What one reader thread copies from the page cache into pinned memory, at the low end of
# what servers reach (6-12 GB/s): it sets how many threads keep up with the copy engine.
FILL_PER_THREAD = 6e9
MAX_READ_THREADS = 8
# NVMe drives reach their full bandwidth with about 8 requests in flight.
DIRECT_QUEUE_DEPTH = 8
# A piece of at least 1 MiB keeps the per-copy cost (~10 us to launch and set up the DMA)
# under 20% of the copy at 50 GB/s; at most 16 MiB, so the first copy of a block starts
# early and a block spreads over every reader.
MIN_BUFFER_BYTES = 2**20
MAX_BUFFER_BYTES = 16 * 2**20
# The most pinned memory a ring takes unless asked for more: reading a whole block ahead
# while its slot is still busy helps only where the readers are slower than the copy
# engine, and pinned host memory is scarce on the machines lazystream is for.
AUTO_RING_BYTES = 256 * 2**20
# The block size assumed for a plan with no streamed block (the ring then only loads).
DEFAULT_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class IOConfig:
    """How bytes travel. Defaults suit both devices; tests flip them to cover every path.

    Args:
        threaded: ``submit`` returns at once and a dispatcher thread cuts the job into
            pieces (else ``submit`` returns when the job's copies are issued). Reader
            threads fill the staging ring either way.
        staged: go through the staging ring; None means on CUDA (and the asynchronous test
            device), or in "direct" mode.
        staging_bytes: size of each staging buffer (one piece of a job); None: from the
            block size, between 1 and 16 MiB.
        staging_buffers: buffers in the ring; None: two per reader thread, more (up to
            256 MiB in all) so the readers can fill most of the next block ahead.
        mode: "mmap" (copy out of the mapped shards, through the page cache), "direct"
            (O_DIRECT reads that bypass it; always staged, on the CPU device too) or
            "register" (CUDA: the shard mappings page-locked, the copy engine reads the
            page cache directly; every shard's pages stay locked in RAM while loaded, so
            the RAM must hold the checkpoint).
        read_threads: reader threads filling the ring; None: enough to keep up with the
            probed host-to-device bandwidth (at most 8 and the cores less one), or 8 in
            "direct" mode (its queue depth).

    Example:
        >>> LazyStreamModel.from_pretrained(repo, keep_gpu=8, io=IOConfig(mode="direct"))
    """

    threaded: bool = True
    staged: bool | None = None
    staging_bytes: int | None = None
    staging_buffers: int | None = None
    mode: str = "mmap"
    read_threads: int | None = None

    def __post_init__(self) -> None:
        if self.staging_bytes is not None and self.staging_bytes < DIRECT_ALIGN:
            raise ValueError(f"IOConfig.staging_bytes must be >= {DIRECT_ALIGN}, got {self.staging_bytes}")
        if self.staging_buffers is not None and self.staging_buffers < 1:
            raise ValueError(f"IOConfig.staging_buffers must be >= 1, got {self.staging_buffers}")
        if self.mode not in MODES:
            raise ValueError(f"IOConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.read_threads is not None and self.read_threads < 1:
            raise ValueError(f"IOConfig.read_threads must be >= 1, got {self.read_threads}")
        if self.mode == "direct" and self.staged is False:
            raise ValueError("IOConfig(mode='direct') reads into the aligned staging ring: "
                             "leave staged at None or set True")
        if self.mode == "register" and self.staged:
            raise ValueError("IOConfig(mode='register') copies from the registered shard mappings without "
                             "staging: leave staged at None")


@dataclass(frozen=True)
class RingLayout:
    """The staging ring: ``buffers`` of ``buffer_bytes`` each, filled by ``threads`` readers."""

    buffers: int
    buffer_bytes: int
    threads: int

    @property
    def nbytes(self) -> int:
        return self.buffers * self.buffer_bytes


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ring_layout(config: IOConfig, block_bytes: int, *, h2d: float | None = None,
                cores: int | None = None) -> RingLayout:
    """The ring for blocks of up to ``block_bytes``: the fields ``config`` leaves at None
    sized from the block and the bandwidths (``h2d``: pinned host-to-device bytes/s, None
    on the CPU device).

    Threads: enough that their fills (FILL_PER_THREAD each) keep up with the copy engine,
    at most MAX_READ_THREADS and the cores less one (the model's own host thread needs
    one); on the CPU device 2; in "direct" mode DIRECT_QUEUE_DEPTH. Buffers: a power of
    two between 1 and 16 MiB, about a block over twice the threads, so every reader has a
    piece of each block and one waits to be copied while the next fills. Ring: two
    buffers per thread at least, up to a block and a piece per thread beyond it within
    AUTO_RING_BYTES; a power of two in all, as torch rounds pinned allocations up to one.
    """
    cores = cores or usable_cores()
    block = block_bytes or DEFAULT_BLOCK_BYTES
    if config.read_threads is not None:
        threads = config.read_threads
    elif config.mode == "direct":
        threads = DIRECT_QUEUE_DEPTH
    elif config.mode == "register":
        threads = 1  # issues copies only; nothing to read
    else:
        wanted = math.ceil(h2d / FILL_PER_THREAD) if h2d else 2
        threads = max(1, min(wanted, MAX_READ_THREADS, cores - 1 if cores > 2 else cores))
    if config.staging_bytes is not None:
        size = config.staging_bytes
    elif block <= MIN_BUFFER_BYTES:
        size = _round_up(block, DIRECT_ALIGN)
    else:
        size = 1 << max(0, (block // (2 * threads)).bit_length() - 1)
        size = min(MAX_BUFFER_BYTES, max(MIN_BUFFER_BYTES, size))
    if config.staging_buffers is not None:
        buffers = config.staging_buffers
    else:
        floor = 2 * threads
        buffers = max(floor, min(math.ceil(block / size) + threads, AUTO_RING_BYTES // size))
        if size & (size - 1) == 0:
            buffers = 1 << (buffers - 1).bit_length()
    return RingLayout(buffers, size, threads)


@dataclass
class Ticket:
    """A submitted job. ``wait()`` on the host, then order compute after ``ready``.

    After ``done``: ``fill_bytes`` were read into staging in ``fill_seconds`` of wall time
    during which at least one reader thread was filling this job's pieces; ``copy_marks``
    time each piece's device copy (start, end, bytes), resolved by :meth:`copy_time`.
    """

    nbytes: int
    done: threading.Event = field(default_factory=threading.Event)
    ready: object = None  # device marker after the job's last copy
    error: BaseException | None = None
    fill_bytes: int = 0
    fill_seconds: float = 0.0
    copy_marks: list[tuple[object, object, int]] = field(default_factory=list)
    _copy_time: tuple[int, float] | None = field(default=None, repr=False)

    def wait(self) -> float:
        """Block until the job's copies are issued; return the seconds waited."""
        start = time.perf_counter()
        self.done.wait()
        waited = time.perf_counter() - start
        if self.error is not None:
            raise self.error
        return waited

    def copy_time(self, *, wait: bool) -> tuple[int, float] | None:
        """(bytes, seconds) of this job's device copies: on CUDA the time between events
        on the copy stream around each piece's copies, summed (the copy engine's busy time,
        not the gaps while it waited for a piece to fill); on the CPU the host time of the
        copies. None while a copy is still running and ``wait`` is False."""
        if self._copy_time is None:
            total = 0.0
            for start, end, _ in self.copy_marks:
                seconds = elapsed_seconds(start, end, wait=wait)
                if seconds is None:
                    return None
                total += seconds
            self._copy_time = (sum(n for _, _, n in self.copy_marks), total)
        return self._copy_time


@dataclass
class _Piece:
    """What one reader fills and what is then copied to the destination.

    ``reads``: mapped runs (dest_offset relative to the staging buffer) or AlignedReads
    into the buffer, empty for registered jobs. ``copies``: (source file or None for the
    staging buffer, source offset, destination offset, bytes)."""

    reads: list
    copies: list[tuple[Path | None, int, int, int]]
    staged: bool

    @property
    def nbytes(self) -> int:
        return sum(c[3] for c in self.copies)


@dataclass
class _Job:
    ticket: Ticket
    dest: torch.Tensor | None
    after: object
    pieces: int = 0  # pieces the job was cut into (and handed to readers)
    delivered: int = 0  # pieces whose copies were issued (or skipped after an error)
    pending: deque = field(default_factory=deque)  # filled pieces waiting for the jobs before
    waited: bool = False  # the copy stream waits for ``after``
    fill_spans: list[tuple[float, float, int]] = field(default_factory=list)
    copy_marks: list[tuple[object, object, int]] = field(default_factory=list)


class Loader:
    """Runs copy jobs from one checkpoint into device buffers, in submission order.

    ``submit`` queues a job; ``allocate`` sizes and allocates the staging ring (or
    registers the shards) for a block size; ``drain`` waits for everything submitted;
    ``close`` releases it all. ``staging_bytes`` and ``bytes_read`` count what it holds
    and what it read.
    """

    def __init__(self, ckpt: Checkpoint, ops: HostDevice | CudaDevice, config: IOConfig):
        self.ckpt = ckpt
        self.ops = ops
        self.config = config
        self.mode = config.mode
        self.registered = config.mode == "register"
        direct = config.mode == "direct"
        self.staged = (ops.async_copies or direct) if config.staged is None else config.staged
        self.staged = self.staged and not self.registered
        if ops.is_cuda and not (self.staged or self.registered):
            raise ValueError("on CUDA, bytes must go through the pinned staging ring (IOConfig.staged) or "
                             "registered shard mappings (IOConfig(mode='register'))")
        self.layout: RingLayout | None = None
        self.bytes_read = 0
        self._reader = DirectReader(ckpt.shard_paths, 1) if direct else None
        self._buffers: list[torch.Tensor] = []
        self._marks: list[object] = []  # per buffer: the end of the last copy out of it
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._mappings: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._threads: set[int] = set()  # idents of this loader's own threads
        self._lock = threading.Lock()  # the open jobs, issuing copies, the tail
        self._setup_lock = threading.Lock()
        self._open: deque[_Job] = deque()  # jobs not yet done, in submission order
        self._tail: object = None  # the mark after the last copy issued
        self._closed = False

    @property
    def staging_bytes(self) -> int:
        """Bytes of the staging ring (pinned on CUDA); 0 before it is allocated and after close."""
        return sum(buf.numel() for buf in self._buffers)

    # -- setting up -------------------------------------------------------------------

    def allocate(self, block_bytes: int) -> None:
        """Allocate the staging ring for blocks of up to ``block_bytes`` (or, in "register"
        mode, page-lock the shard mappings) and start the reader threads. The streamer
        calls it in ``load()``, so a failure surfaces there; a ring that exists is kept.

        Raises:
            StagingMemoryError: the ring could not be allocated (with every field of
                IOConfig left at None, a smaller ring is taken instead, with one warning).
            HostRegisterError: "register" mode could not page-lock a shard.
        """
        if self._closed:
            raise ClosedError(f"the loader of {self.ckpt.folder} is closed", path=self.ckpt.folder)
        self._ensure(block_bytes)

    def _ensure(self, block_bytes: int) -> None:
        with self._setup_lock:
            if self.registered and not self._mappings:
                self._register_shards()
            if self.staged and not self._buffers:
                self._allocate_ring(block_bytes)
            if self._pool is None and (self.staged or self.registered):
                threads = self.layout.threads if self.layout else 1
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lazystream-read", initializer=self._bind)

    def _bind(self) -> None:
        self.ops.bind_thread()
        self._threads.add(threading.get_ident())

    def _allocate_ring(self, block_bytes: int) -> None:
        h2d = None
        if self.ops.is_cuda:
            from .probe import bandwidth

            h2d = bandwidth(self.ops.device).h2d  # measured once per machine, then cached
        layout = ring_layout(self.config, block_bytes, h2d=h2d)
        # Slices of the one allocation start at multiples of the stride: aligned for O_DIRECT.
        shrink = self.config.staging_bytes is None and self.config.staging_buffers is None
        buffers, size, failure = layout.buffers, layout.buffer_bytes, None
        while True:
            stride = _round_up(size, DIRECT_ALIGN) if self._reader else size
            try:
                ring = self._staging(buffers * stride)
                break
            except (RuntimeError, MemoryError) as exc:  # cudaHostAlloc's failure is a RuntimeError
                failure = exc
                if not shrink or (buffers <= 2 and size <= MIN_BUFFER_BYTES):
                    kind = "pinned" if self.ops.is_cuda else "host"
                    raise StagingMemoryError(
                        f"could not allocate {buffers * stride} bytes ({buffers * stride / 2**20:.2f} MiB) of {kind} "
                        f"staging memory ({buffers} buffers of {stride} bytes) to load {self.ckpt.folder}: {exc}. "
                        "Free host memory, or ask for a smaller ring: IOConfig(staging_buffers=..., staging_bytes=...)",
                        path=self.ckpt.folder,
                    ) from exc
                if buffers > 2:
                    buffers //= 2
                else:
                    size //= 2
        if failure is not None:
            warnings.warn(
                f"lazystream: {layout.nbytes} bytes of {'pinned' if self.ops.is_cuda else 'host'} staging memory could "
                f"not be allocated ({failure}); streaming through a smaller ring of {buffers} x {stride} bytes "
                "instead, which may be slower",
                RuntimeWarning,
                stacklevel=4,
            )
        self.layout = RingLayout(buffers, size, min(layout.threads, buffers))
        self._buffers = [ring[i * stride:i * stride + size] for i in range(buffers)]
        self._marks = [None] * buffers
        for index in range(buffers):
            self._free.put(index)

    def _staging(self, nbytes: int) -> torch.Tensor:
        """One staging allocation; page-aligned where O_DIRECT reads into it. Pinned memory
        is page-aligned already; plain host memory only 64-byte aligned, so it gets a page more."""
        buf = self.ops.staging(nbytes)
        if self._reader is None or buf.data_ptr() % DIRECT_ALIGN == 0:
            return buf
        del buf
        raw = self.ops.staging(nbytes + DIRECT_ALIGN)
        shift = -raw.data_ptr() % DIRECT_ALIGN
        return raw[shift:shift + nbytes]

    def _register_shards(self) -> None:
        paths = self.ckpt.shard_paths
        total = sum(p.stat().st_size for p in paths)
        available = _mem_available()
        if available is not None and total > available:
            raise HostRegisterError(
                f"IOConfig(mode='register') page-locks every shard of {self.ckpt.folder} in RAM: {total / 2**30:.1f} GiB, "
                f"but only {available / 2**30:.1f} GiB are available; use mode='mmap' (the staging ring)",
                path=self.ckpt.folder,
            )
        try:
            for path in paths:
                with open(path, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "non-writable buffer": it is only ever read
                    host = torch.frombuffer(mapped, dtype=torch.uint8)
                try:
                    self.ops.register_host(host)
                except RuntimeError as exc:
                    raise HostRegisterError(
                        f"{path}: could not page-lock its read-only mapping ({host.numel()} bytes) for the copy engine: "
                        f"{exc}. IOConfig(mode='register') needs a driver that registers read-only memory "
                        "(cudaDevAttrHostRegisterReadOnlySupported); use mode='mmap'",
                        path=path,
                    ) from exc
                self._mappings[path] = (mapped, host)
        except BaseException:
            self._unregister_shards()
            raise

    def _unregister_shards(self) -> None:
        mappings, self._mappings = self._mappings, {}
        for _, host in mappings.values():
            self.ops.unregister_host(host)
        # The maps close when their last tensor goes: a copy's temporary view may still hold one.

    # -- jobs -------------------------------------------------------------------------

    def submit(self, runs: list[CopyRun], dest: torch.Tensor, after: object = None) -> Ticket:
        """Copy ``runs`` into ``dest`` (a 1-D uint8 buffer) after device marker ``after``."""
        if self._closed:
            raise ClosedError(f"the loader of {self.ckpt.folder} is closed", path=self.ckpt.folder)
        ticket = Ticket(nbytes=sum(r.nbytes for r in runs))
        if not self.config.threaded:
            self._dispatch(runs, dest, after, ticket)
            ticket.done.wait()
            return ticket
        with self._setup_lock:
            if self._thread is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._work, name="lazystream-io", daemon=True)
                self._thread.start()
        self._queue.put((runs, dest, after, ticket))
        return ticket

    def _work(self) -> None:
        self._bind()
        while (job := self._queue.get()) is not None:
            self._dispatch(*job)

    def _dispatch(self, runs: list[CopyRun], dest: torch.Tensor | None, after: object, ticket: Ticket) -> None:
        """Cut a job into pieces and hand them to the readers (or, unstaged, copy it here)."""
        job = _Job(ticket, dest, after)
        pieces: list[_Piece] = []
        try:
            for path in {r.file for r in runs}:
                try:
                    self.ckpt.shard(path).check_unchanged()
                except BaseException as exc:
                    raise self._named(exc, path, [(r.offset, r.nbytes) for r in runs if r.file == path])
            if runs and (self.staged or self.registered):
                self._ensure(dest.numel())  # done in load(); a loader used on its own sizes the ring here
                pieces = self._pieces(runs)
            elif runs:
                # Written from this thread, not the copy stream: the slot's last reader must be done.
                self.ops.host_waits_for(after)
                start = self.ops.copy_mark()
                for run in runs:
                    try:
                        self.ckpt.copy_run(run, dest)
                    except BaseException as exc:
                        raise self._named(exc, run.file, [(run.offset, run.nbytes)])
                job.copy_marks.append((start, self.ops.copy_mark(), ticket.nbytes))
        except BaseException as exc:  # handed to the waiting thread, which re-raises it
            ticket.error = exc
            pieces = []
        job.pieces = len(pieces)
        with self._lock:
            self._open.append(job)
            self._advance()
        for handed, piece in enumerate(pieces):
            index = None
            try:
                if piece.staged:
                    index = self._free.get()  # sleeps until a buffer's previous piece was issued
                self._pool.submit(self._fill, job, piece, index)
            except BaseException as exc:  # the pool was shut down, or an interrupt in inline mode
                if index is not None:
                    self._free.put(index)
                with self._lock:
                    if ticket.error is None:
                        ticket.error = exc
                    job.pieces = handed
                    self._advance()
                return

    def _pieces(self, runs: list[CopyRun]) -> list[_Piece]:
        if self.registered:
            return [_Piece([], [(r.file, r.offset, r.dest_offset, r.nbytes) for r in runs], staged=False)]
        size = self.layout.buffer_bytes
        if self._reader is not None:
            return [_Piece(reads, [(None, p.buf_offset, p.dest_offset, p.nbytes) for p in places], staged=True)
                    for reads, places in _direct_segments(runs, size)]
        return [_Piece([CopyRun(r.file, r.offset, r.dest_offset - start, r.nbytes) for r in seg_runs],
                       [(None, 0, start, end - start)], staged=True)
                for start, end, seg_runs in _segments(runs, size)]

    def _fill(self, job: _Job, piece: _Piece, index: int | None) -> None:
        """On a reader thread: wait until the buffer's previous copy is done, fill it."""
        try:
            if index is not None:
                self.ops.host_waits_for(self._marks[index])
                if job.ticket.error is None:
                    start = time.perf_counter()
                    nbytes = self._read(piece, self._buffers[index])
                    job.fill_spans.append((start, time.perf_counter(), nbytes))
        except BaseException as exc:
            with self._lock:
                if job.ticket.error is None:
                    job.ticket.error = exc
        with self._lock:
            job.pending.append((piece, index))
            self._advance()

    def _read(self, piece: _Piece, buf: torch.Tensor) -> int:
        view = buf.numpy()
        nbytes = 0
        for r in piece.reads:
            if self._reader is not None:
                try:
                    self._reader.read_into(r, view)
                except BaseException as exc:
                    raise self._named(exc, r.file, [(r.offset, r.need)])
                nbytes += r.need
            else:
                try:
                    src = self.ckpt.shard(r.file).bytes.numpy()
                    np.copyto(view[r.dest_offset:r.dest_offset + r.nbytes], src[r.offset:r.offset + r.nbytes])
                except BaseException as exc:
                    raise self._named(exc, r.file, [(r.offset, r.nbytes)])
                nbytes += r.nbytes
        return nbytes

    def _advance(self) -> None:
        """Under the lock: issue the filled pieces of the oldest open job, finish it when
        all are issued, and go on with the next one."""
        while self._open:
            job = self._open[0]
            while job.pending:
                self._issue(job, *job.pending.popleft())
                job.delivered += 1
            if job.delivered < job.pieces:
                return
            self._open.popleft()
            self._finish(job)

    def _issue(self, job: _Job, piece: _Piece, index: int | None) -> None:
        try:
            if job.ticket.error is None:
                if not job.waited:
                    self.ops.copy_waits_for(job.after)
                    job.waited = True
                start = self.ops.copy_mark()
                for file, src_at, dest_at, n in piece.copies:
                    src = self._buffers[index] if file is None else self._mappings[file][1]
                    self.ops.copy_in(job.dest[dest_at:dest_at + n], src[src_at:src_at + n])
                end = self.ops.copy_mark()
                job.copy_marks.append((start, end, piece.nbytes))
                self._tail = end
                if index is not None:
                    self._marks[index] = end
        except BaseException as exc:
            if job.ticket.error is None:
                job.ticket.error = exc
        finally:
            if index is not None:
                self._free.put(index)

    def _finish(self, job: _Job) -> None:
        ticket = job.ticket
        if ticket.error is None:
            ticket.ready = job.copy_marks[-1][1] if job.copy_marks else None
            self.bytes_read += ticket.nbytes
        ticket.fill_bytes = sum(n for _, _, n in job.fill_spans)
        ticket.fill_seconds = _covered(job.fill_spans)
        ticket.copy_marks = job.copy_marks
        ticket.done.set()

    def _named(self, exc: BaseException, path: Path, spans: list[tuple[int, int]]) -> BaseException:
        """``exc`` itself, with a note naming the shard, the byte ranges and the tensors in them."""
        names = sorted(name for name, rec in self.ckpt.items() if rec.file == path and any(
            rec.offset < offset + nbytes and offset < rec.offset + rec.nbytes for offset, nbytes in spans))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        where = ", ".join(f"{offset} to {offset + nbytes}" for offset, nbytes in spans[:3])
        exc.add_note(f"lazystream: while reading {path}, bytes {where}{' and more' if len(spans) > 3 else ''}"
                     + (f" (tensor {shown})" if names else ""))
        if isinstance(exc, LazyStreamError):
            exc.path = exc.path or os.fspath(path)
            exc.tensor = exc.tensor or (names[0] if names else None)
        return exc

    # -- waiting and closing ----------------------------------------------------------

    def drain(self) -> None:
        """Wait until every submitted job has finished, on the host and on the device."""
        if self._thread is not None:
            flushed = Ticket(nbytes=0)
            self._queue.put(([], None, None, flushed))
            flushed.done.wait()
        with self._lock:
            tail = self._tail
        self.ops.host_waits_for(tail)  # the copy stream runs in order: its last copy is the last to end

    def close(self) -> None:
        """Finish pending jobs, stop the threads, free the staging ring, unregister the
        shards. Idempotent."""
        if threading.get_ident() in self._threads:
            # Garbage collection ran the finalizer on one of this loader's own threads,
            # which cannot wait for itself: close from a thread of its own.
            threading.Thread(target=self.close, name="lazystream-close", daemon=True).start()
            return
        with self._setup_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self.drain()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._buffers, self._marks, self.layout = [], [], None
        self._unregister_shards()
        if self._reader is not None:
            self._reader.close()


def _covered(spans: list[tuple[float, float, int]]) -> float:
    """Seconds covered by the union of the (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end, _ in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    """Reads aligned byte ranges of the shards with O_DIRECT: :meth:`read_into` on the
    calling thread (the loader's reader threads, one request each in flight), or
    :meth:`read`, which spreads the chunks over a pool of ``threads`` of its own.

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
        """Fill ``buf`` (DIRECT_ALIGN-aligned) as ``reads`` say, the chunks spread over this
        reader's threads; return when every read is done."""
        view = memoryview(buf.numpy())
        chunks = [chunk for r in reads for chunk in _chunks(r, view)]
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

    def read_into(self, r: AlignedRead, view: np.ndarray) -> None:
        """One read into ``view`` (the staging buffer), on the calling thread, one chunk
        request at a time."""
        for chunk in _chunks(r, memoryview(view)):
            self._pread(*chunk)

    def _pread(self, path: Path, offset: int, into: memoryview, need: int) -> None:
        with self._lock:  # the descriptor and its kind together: another thread may reopen it
            fd, direct = self._fds[path], self._direct[path]
        try:
            got = os.preadv(fd, [into], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not direct:
                what = f"reading {len(into)} bytes at offset {offset}: {exc.strerror}"
                raise OSError(exc.errno, what, str(path)) from None
            # The filesystem opened the file with O_DIRECT but refuses the read itself.
            self._reopen_buffered(path)
            with self._lock:
                fd = self._fds[path]
            got = os.preadv(fd, [into], offset)
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


def _chunks(r: AlignedRead, view: memoryview) -> Iterator[tuple[Path, int, memoryview, int]]:
    """The preadv requests of one read: (file, offset, into, bytes that must arrive)."""
    for at in range(0, r.length, READ_CHUNK_BYTES):
        n = min(READ_CHUNK_BYTES, r.length - at)
        need = min(n, r.need - at)
        if need > 0:
            yield r.file, r.offset + at, view[r.buf_offset + at:r.buf_offset + at + n], need


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
