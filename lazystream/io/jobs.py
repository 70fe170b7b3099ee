"""A copy job as the loader tracks it: the :class:`Ticket` its submitter waits on, and the
pieces a job is cut into, each one staging buffer's worth."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CopyRun
from ..devices import elapsed_seconds


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
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(c[3] for c in self.copies)  # once, not under the loader's lock


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



def _covered(spans: list[tuple[float, float, int]]) -> float:
    """Seconds covered by the union of the (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end, _ in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total



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

