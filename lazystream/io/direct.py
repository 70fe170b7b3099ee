"""O_DIRECT reading: runs laid into aligned staging buffers (:func:`_direct_segments`) and
the :class:`DirectReader` that preads them, bypassing the page cache."""

from __future__ import annotations

import errno
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CopyRun
from ..errors import ShardChangedError
from .config import DIRECT_ALIGN, _round_up

# One preadv of at most this many bytes at a time: large enough for the disk's full
# bandwidth, small enough that a thread's request is not one huge transfer.
READ_CHUNK_BYTES = 4 * 2**20


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

