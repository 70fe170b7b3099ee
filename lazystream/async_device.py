"""An adversarial CPU device whose streams behave like CUDA streams at their worst, so that
a missing wait shows on a machine without a GPU (``LAZYSTREAM_TEST_DEVICE=async``).

- The copy stream is a worker thread: ``copy_in`` only queues the copy, which runs later,
  after a random delay, in stream order; ``copy_waits_for`` queues a wait in that order.
- Compute runs on the caller's thread, but lags: the compute before a ``compute_done`` marker
  is taken to still read the buffers named there until the marker fires, a random time
  later. A write into those bytes before it fires (a copy, the allocator handing the memory
  out again, a cast on another stream) is an ordering hazard: each is recorded in
  :data:`HAZARDS` (tests fail on any, see tests/conftest.py). Work on one compute stream is
  ordered: each ``compute_waits_for`` and allocation first lets that stream's earlier
  compute finish, as a CUDA stream would. ``stream(name)`` switches the compute stream
  (a user's side stream).
- Markers are real events, set when the work queued before them has run;
  ``compute_waits_for`` and ``host_waits_for`` block on them.
- Memory from ``empty`` and ``staging`` starts as 0xFF bytes (NaN in every float dtype);
  memory whose tensors all died is handed out again, poisoned anew, as CUDA's caching
  allocator reuses freed blocks. A read before its copy lands gives a visibly wrong answer.

Seeded by ``LAZYSTREAM_ASYNC_SEED`` (the delays; the threads still race). The copy delay
and the compute lag are drawn from ``LAZYSTREAM_ASYNC_DELAY`` and ``LAZYSTREAM_ASYNC_LAG``:
"most" seconds (from 0) or "least:most"; a test that needs a schedule makes it so.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import torch

from .devices import HostDevice

# Every ordering hazard any async device found, oldest first: a test clears and checks it.
HAZARDS: list[str] = []
POISON = 0xFF
DEFAULT_DELAY = "0.002"  # seconds: the range of the random delay of a copy
DEFAULT_LAG = "0.002"  # seconds: the range of the random lag of compute behind the host
# A wait longer than this is a deadlock: recorded as a hazard instead of hanging the tests.
DEADLOCK_SECONDS = 60.0

_made = itertools.count()
_devices: weakref.WeakSet[AsyncDevice] = weakref.WeakSet()


class AsyncEvent:
    """A marker: set when the stream it was queued on reaches it. Quacks like a timing
    ``torch.cuda.Event`` (``query``, ``synchronize``, ``elapsed_time``)."""

    __slots__ = ("_done", "time", "__weakref__")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.time = 0.0

    def fire(self) -> None:
        self.time = time.perf_counter()
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        if not self._done.wait(DEADLOCK_SECONDS):
            HAZARDS.append(f"a marker did not complete within {DEADLOCK_SECONDS:.0f} s (a deadlock)")
            raise RuntimeError(f"lazystream async device: a marker did not complete within {DEADLOCK_SECONDS:.0f} s")

    def elapsed_time(self, end: AsyncEvent) -> float:
        return (end.time - self.time) * 1e3


class _Stream:
    """Work run in order on a thread of its own, each item not before its due time."""

    def __init__(self, name: str):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_run, args=(self._queue, name), name=f"lazystream-async-{name}", daemon=True).start()

    def put(self, due: float, work: Callable[[], None]) -> None:
        self._queue.put((due, work))

    def mark(self) -> AsyncEvent:
        event = AsyncEvent()
        self.put(0.0, event.fire)
        return event

    def close(self) -> None:
        self._queue.put(None)


def _run(work: queue.SimpleQueue, name: str) -> None:
    while (item := work.get()) is not None:
        due, fn = item
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - a failed copy, as CUDA reports it: later
            HAZARDS.append(f"work on stream {name!r} failed: {exc!r}")


class AsyncDevice(HostDevice):
    """Host memory, with copies queued to a late copy stream and compute that lags."""

    async_copies = True

    def __init__(self, device: torch.device, *, seed: int | None = None, delay: str | None = None,
                 lag: str | None = None):
        super().__init__(device)
        if seed is None:
            seed = int(os.environ.get("LAZYSTREAM_ASYNC_SEED", "0"))
        self.seed = seed
        self._random = random.Random(seed * 1_000_003 + next(_made))
        self.delay = _span(delay or os.environ.get("LAZYSTREAM_ASYNC_DELAY", DEFAULT_DELAY))
        self.lag = _span(lag or os.environ.get("LAZYSTREAM_ASYNC_LAG", DEFAULT_LAG))
        self._lock = threading.Lock()  # the random generator and the pool, used from several threads
        self._streams: dict[str, _Stream] = {}
        self._current = "default"
        self._pool: list[torch.Tensor] = []  # every allocation made, each owned here too
        self._handed: dict[int, int] = {}  # allocation address -> times handed out
        _devices.add(self)

    # -- streams ------------------------------------------------------------------------

    def _stream(self, name: str) -> _Stream:
        with self._lock:
            stream = self._streams.get(name)
            if stream is None:
                stream = self._streams[name] = _Stream(name)
                weakref.finalize(self, stream.close)
            return stream

    def _due(self, span: tuple[float, float]) -> float:
        with self._lock:
            return time.perf_counter() + self._random.uniform(*span)

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[None]:
        """Run the compute inside on the compute stream ``name`` (as ``torch.cuda.stream``)."""
        previous, self._current = self._current, f"compute:{name}"
        try:
            yield
        finally:
            self._current = previous

    def _compute(self) -> _Stream:
        return self._stream(self._current if self._current != "default" else "compute:default")

    def _flush(self, stream: _Stream) -> None:
        stream.mark().synchronize()

    def synchronize(self) -> None:
        """Wait until every stream of this device has run all its work."""
        for stream in list(self._streams.values()):
            self._flush(stream)

    # -- memory -------------------------------------------------------------------------

    def empty(self, nbytes: int) -> torch.Tensor:
        # The caching allocator hands a freed block to the next allocation on the same
        # stream without waiting: only that stream's own earlier work is ordered before it.
        self._flush(self._compute())
        with self._lock:
            raw = next((r for r in self._pool if r.numel() == nbytes and _unused(r)), None)
        if raw is None:
            raw = super().empty(nbytes)  # (where tests count or limit allocations)
        with self._lock:
            if all(r is not raw for r in self._pool):
                self._pool.append(raw)
            self._handed[raw.data_ptr()] = self._handed.get(raw.data_ptr(), 0) + 1
        raw.fill_(POISON)
        return raw[:]

    def staging(self, nbytes: int) -> torch.Tensor:
        return super().staging(nbytes).fill_(POISON)

    def _home(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """The pool allocation holding ``tensor``, and its byte offset there."""
        at = tensor.data_ptr()
        with self._lock:
            for raw in self._pool:
                if raw.data_ptr() <= at < raw.data_ptr() + raw.numel():
                    return raw, at - raw.data_ptr()
        return None

    # -- copies -------------------------------------------------------------------------

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue the copy. It holds the pool's allocation, not ``dst``: memory whose tensors
        all died before the copy ran is free (or handed out again), as on CUDA."""
        home = self._home(dst) if dst.dtype == torch.uint8 else None
        if home is None:
            self._stream("copy").put(self._due(self.delay), functools.partial(dst.copy_, src))
            return
        raw, start = home
        handed = self._handed[raw.data_ptr()]

        def copy() -> None:
            if self._handed[raw.data_ptr()] != handed or _unused(raw):
                HAZARDS.append(f"a copy of {src.numel()} bytes landed in memory freed before it ran")
            raw[start:start + src.numel()].copy_(src)

        self._stream("copy").put(self._due(self.delay), copy)

    def copy_mark(self) -> AsyncEvent:
        return self._stream("copy").mark()

    def copy_waits_for(self, marker: AsyncEvent | None) -> None:
        if marker is not None:
            self._stream("copy").put(0.0, marker.synchronize)

    # -- compute ------------------------------------------------------------------------

    def compute_done(self, *reads: torch.Tensor) -> AsyncEvent:
        """A marker after the compute issued so far on the current compute stream, which
        reads ``reads`` until the marker fires: a write into them before then is a hazard."""
        stream = self._compute()
        watched = []
        for tensor in reads:
            if tensor is None:
                continue
            home = self._home(tensor)
            if home is not None:  # the pool's own tensor: watching it keeps no user tensor alive
                raw, start = home
                watched.append((raw, start, raw[start:start + tensor.numel() * tensor.element_size()].clone()))
        event = AsyncEvent()
        name = stream.name

        def finish() -> None:
            for raw, start, seen in watched:
                if not torch.equal(raw[start:start + seen.numel()], seen):
                    HAZARDS.append(f"{seen.numel()} bytes were written while compute on {name!r} still read them")
            event.fire()

        stream.put(self._due(self.lag), finish)
        return event

    def compute_waits_for(self, marker: AsyncEvent | None) -> None:
        self._flush(self._compute())  # the compute before, on this stream, is done first
        if marker is not None:
            marker.synchronize()

    def host_waits_for(self, marker: AsyncEvent | None) -> None:
        if marker is not None:
            marker.synchronize()

    def wait_compute_idle(self) -> None:
        for name, stream in list(self._streams.items()):
            if name.startswith("compute:"):
                self._flush(stream)


def _span(text: str) -> tuple[float, float]:
    """"most" or "least:most" seconds."""
    least, _, most = text.rpartition(":")
    return float(least or 0.0), float(most)


def _unused(raw: torch.Tensor) -> bool:
    """No tensor but the pool's own holds this allocation (the storage object asked here counts one)."""
    return torch._C._storage_Use_Count(raw.untyped_storage()._cdata) <= 2


def settle_all() -> None:
    """Let every live async device run its queued work (a test's end)."""
    for device in list(_devices):
        device.synchronize()
