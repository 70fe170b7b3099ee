"""The :class:`Loader`: copy jobs from one checkpoint into device buffers, in submission
order, through the staging ring, the registered shard mappings, or (the CPU device)
straight from the map."""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, CopyRun
from ..devices import CudaDevice, HostDevice, explain_capture
from ..errors import ClosedError, HostRegisterError, LazyStreamError, StagingMemoryError
from .config import DIRECT_ALIGN, MIN_BUFFER_BYTES, IOConfig, RingLayout, _round_up, ring_layout
from .direct import DirectReader, _direct_segments
from .jobs import Ticket, _covered, _Job, _Piece, _segments


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
        self._bound: set[int] = set()  # those bound to the device
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
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lazystream-read")

    def _bind(self) -> None:
        self._threads.add(threading.get_ident())
        self.ops.bind_thread()
        self._bound.add(threading.get_ident())

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
        try:
            self._bind()
        except BaseException as exc:
            # The thread could not be bound (torch.cuda.set_device raised): fail every job
            # queued, now and later, with the error, rather than leave their waiters hanging.
            while (job := self._queue.get()) is not None:
                ticket = job[-1]
                ticket.error = exc
                ticket.done.set()
            return
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
            ticket.error = explain_capture(exc)
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
            if threading.get_ident() not in self._bound:
                self._bind()  # the thread's first piece; a failure fails the piece, not the thread
            if index is not None:
                self.ops.host_waits_for(self._marks[index])
                if job.ticket.error is None:
                    start = time.perf_counter()
                    nbytes = self._read(piece, self._buffers[index])
                    job.fill_spans.append((start, time.perf_counter(), nbytes))
        except BaseException as exc:
            with self._lock:
                if job.ticket.error is None:
                    job.ticket.error = explain_capture(exc)
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
                job.ticket.error = explain_capture(exc)
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



def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

