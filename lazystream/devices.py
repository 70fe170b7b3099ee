"""The only code that differs between a CUDA device and the CPU: allocation, pinned
staging memory, page-locking the shard mappings, the copy stream, and the events that
order it against compute and time it.

On the CPU every copy is complete when it returns: each marker is None or a
``perf_counter`` reading, and every wait is a no-op. The rest of lazystream runs the same
code on both.

Every event a host thread waits on is created with ``blocking=True``
(``cudaEventBlockingSync``): the waiting thread sleeps in the driver instead of spinning
on a core the reader threads and the model's own host code need.
"""

from __future__ import annotations

import mmap
import os
import time

import torch

from .errors import UnsupportedOperationError

# cudaHostRegister flags: usable from every context (Portable), and mapped read-only
# for the device (ReadOnly), which a PROT_READ mapping of a file requires: registering it
# writable would make the kernel copy every page into anonymous memory on pinning.
_HOST_REGISTER_PORTABLE = 0x01
_HOST_REGISTER_READ_ONLY = 0x08


def elapsed_seconds(start: object, end: object, *, wait: bool) -> float | None:
    """Seconds between two marks of one device (``copy_mark``/``timing_mark``): device time
    between two CUDA events, host time between two ``perf_counter`` readings. None when
    the events have not completed yet and ``wait`` is False."""
    if isinstance(start, float):
        return end - start
    if not end.query():
        if not wait:
            return None
        end.synchronize()  # a blocking event: the thread sleeps until the copy is done
    return start.elapsed_time(end) / 1e3


def timing_mark(device: torch.device) -> float | torch.cuda.Event:
    """A point in time of ``device``'s compute: on CUDA a timing event on that device's
    current stream (the stream the caller's kernels run on, a side stream too, and not the
    current device's), on the CPU a ``perf_counter`` reading."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True, blocking=True)
    event.record(torch.cuda.current_stream(device))
    return event


def explain_capture(exc: BaseException) -> BaseException:
    """``exc``, or where CUDA refused one of the loader's calls because a thread is capturing
    a CUDA graph, an error that says so and what to do (chained to ``exc``)."""
    if not (isinstance(exc, RuntimeError) and "capturing" in str(exc)):
        return exc
    error = UnsupportedOperationError(
        "a CUDA graph was captured while lazystream's threads were copying blocks (the prefetch a session starts "
        "at the end of each call runs on between calls): in the default global capture mode CUDA refuses their "
        f"calls ({exc}). Capture with torch.cuda.graph(..., capture_error_mode='thread_local'), or outside "
        "streamer_of(model).session(); a capture through the streamed model itself is refused in any mode"
    )
    error.__cause__ = exc
    return error


class HostDevice:
    """Slots in host memory; copies are synchronous."""

    is_cuda = False
    async_copies = False  # copies complete when issued: nothing needs the staging ring

    def __init__(self, device: torch.device):
        self.device = device

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def register_host(self, host: torch.Tensor) -> None:
        pass

    def unregister_host(self, host: torch.Tensor) -> None:
        pass

    def bind_thread(self) -> None:
        pass

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def copy_mark(self) -> float:
        return time.perf_counter()

    def compute_done(self, *reads: torch.Tensor) -> None:
        return None

    def copy_waits_for(self, marker: object) -> None:
        pass

    def compute_waits_for(self, marker: object) -> None:
        pass

    def host_waits_for(self, marker: object) -> None:
        pass

    def note_compute_stream(self) -> None:
        pass

    def wait_compute_idle(self) -> None:
        pass

    def free_bytes(self) -> int | None:
        return None


class CudaDevice:
    """Slots in device memory, filled on a dedicated copy stream from pinned staging
    (or from shard mappings registered as pinned memory)."""

    is_cuda = True
    async_copies = True

    def __init__(self, device: torch.device):
        # A bare "cuda" means the current device of the thread that loads the model; the
        # loader's threads start on device 0, so they need the index itself.
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self._compute_streams: dict[int, torch.cuda.Stream] = {}

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def register_host(self, host: torch.Tensor) -> None:
        """Page-lock ``host``, the whole of a read-only shared file mapping, for the copy
        engine. Its last page is registered whole: the mapping covers it."""
        cudart = torch.cuda.cudart()
        size = -(-host.numel() // mmap.PAGESIZE) * mmap.PAGESIZE
        with torch.cuda.device(self.device):  # the model's context, not the calling thread's device 0
            err = cudart.cudaHostRegister(host.data_ptr(), size, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_READ_ONLY)
        if err != cudart.cudaError.success:
            # The runtime also keeps the failure as its last error, which the next unrelated
            # kernel launch would report as its own: read it, which clears it.
            cudart.cudaGetLastError()
            raise RuntimeError(f"cudaHostRegister of {size} bytes failed: {cudart.cudaGetErrorString(err)}")

    def unregister_host(self, host: torch.Tensor) -> None:
        with torch.cuda.device(self.device):
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())

    def bind_thread(self) -> None:
        """Make this device the calling thread's current device. Run first on every
        lazystream thread: a new thread's current device is 0, and entering
        ``torch.cuda.stream`` for a stream of another device switches the thread's device
        there and back on every copy, creating a context on device 0 on the way. The copy
        stream becomes the thread's current stream: a copy then needs no stream context
        (several Python calls a piece)."""
        torch.cuda.set_device(self.device)
        torch.cuda.set_stream(self.copy_stream)

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # On the copy stream: called only on the loader's own threads, bound (bind_thread)
        # with the copy stream current, never inside a model's forward, so torch.compile
        # never traces it. Asynchronous only because src is page-locked (the pinned ring,
        # or a registered mapping); the caller keeps src untouched until the copy's mark
        # has completed.
        dst.copy_(src, non_blocking=True)

    def copy_mark(self) -> torch.cuda.Event:
        """A timing event on the copy stream after everything issued to it so far."""
        event = torch.cuda.Event(enable_timing=True, blocking=True)
        event.record(self.copy_stream)
        return event

    def compute_done(self, *reads: torch.Tensor) -> torch.cuda.Event:
        """An event after the work queued so far on the current stream (``reads``: the
        buffers that work reads, which only the async test device checks)."""
        stream = torch.cuda.current_stream(self.device)
        self._compute_streams[stream.stream_id] = stream
        event = torch.cuda.Event(blocking=True)
        event.record(stream)
        return event

    def copy_waits_for(self, marker: torch.cuda.Event | None) -> None:
        # A slot is rewritten only after the kernels that read its previous block finished;
        # without this wait the copy stream would overwrite weights still being read.
        if marker is not None:
            self.copy_stream.wait_event(marker)

    def compute_waits_for(self, marker: torch.cuda.Event | None) -> None:
        # Kernels of a streamed block start only after its bytes have landed; without this
        # wait they would read a half-copied slot. The wait is on the device, not the host.
        if marker is not None:
            stream = torch.cuda.current_stream(self.device)
            self._compute_streams[stream.stream_id] = stream
            stream.wait_event(marker)

    def host_waits_for(self, marker: torch.cuda.Event | None) -> None:
        # The host refills a pinned staging buffer only after the device has read it;
        # without this the next block's bytes would overwrite an in-flight copy.
        if marker is not None:
            marker.synchronize()

    def note_compute_stream(self) -> None:
        """Remember the stream the caller's forwards run on now (a user's side stream too)."""
        stream = torch.cuda.current_stream(self.device)
        self._compute_streams[stream.stream_id] = stream

    def wait_compute_idle(self) -> None:
        """Wait on the host until every stream the forwards ran on has finished the work
        queued so far. Before device buffers are dropped: the caching allocator hands a
        freed block to the next allocation of the stream that allocated it, and knows
        nothing of a forward on another stream still reading it. Not the hot path (unload,
        a new plan, close)."""
        for stream in self._compute_streams.values():
            event = torch.cuda.Event(blocking=True)
            event.record(stream)
            event.synchronize()
        self._compute_streams.clear()

    def free_bytes(self) -> int:
        """Free device memory, counting what this process's allocator holds unused."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


def device_ops(device: torch.device) -> HostDevice | CudaDevice:
    """The device layer for ``device``. ``LAZYSTREAM_TEST_DEVICE=async`` in the environment
    puts every CPU model on the adversarial :class:`~lazystream.async_device.AsyncDevice`."""
    if device.type == "cuda":
        return CudaDevice(device)
    if device.type == "cpu":
        kind = os.environ.get("LAZYSTREAM_TEST_DEVICE", "cpu")
        if kind == "async":
            from .async_device import AsyncDevice

            return AsyncDevice(device)
        if kind != "cpu":
            raise ValueError(f"LAZYSTREAM_TEST_DEVICE must be 'cpu' or 'async', got {kind!r}")
        return HostDevice(device)
    raise ValueError(f"device must be 'cuda' or 'cpu', got {device}")
