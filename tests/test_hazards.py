"""The CUDA hazards a review of the copy path found, each checked on the CPU by faking
the device layer (lazystream.devices) where the hazard itself needs a GPU; test_cuda.py
runs the real thing on one.

1. a model on cuda:1: every device call of the loader runs on a thread bound to the device;
2. block timing on the model device's current stream, copy stalls not counted as compute;
3. unload waits for every stream the forwards ran on before dropping buffers;
5. loader failures reach the caller as the original error, the shard and tensor named;
6. a loader thread that cannot be bound to the device fails every job instead of hanging;
7. a failed cudaHostRegister leaves no CUDA error behind for the next kernel launch;
8. a CUDA error from a graph capture during a prefetch is named as such.
"""

from __future__ import annotations

import errno
import gc
import threading

import numpy as np
import pytest
import torch
from conftest import cpu_device_class, qwen3_with_logits, write_odd_checkpoint
from torch import nn

import lazystream.streamer as streamer_module
from lazystream import Checkpoint, IOConfig, LazyStreamModel, streamer_of
from lazystream.devices import CudaDevice, HostDevice
from lazystream.errors import HostRegisterError, StagingMemoryError, UnsupportedOperationError
from lazystream.io import Loader
from lazystream.telemetry import BlockTimer


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return qwen3_with_logits(tmp_path_factory.mktemp("hazards"), 7, seed=6)


# -- faking CUDA --------------------------------------------------------------------------


class FakeClock:
    now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeEvent:
    """torch.cuda.Event without a GPU: records how it was made, where it was recorded,
    and (for timing) the fake clock's time then."""

    created: list[FakeEvent] = []
    clock = FakeClock()

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.enable_timing, self.blocking, self.stream, self.waited, self.at = enable_timing, blocking, None, False, None
        FakeEvent.created.append(self)

    def record(self, stream=None):
        self.stream, self.at = stream, FakeEvent.clock.now

    def query(self) -> bool:
        return True

    def synchronize(self):
        self.waited = True

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1e3


class FakeStream:
    def __init__(self, name: str):
        self.name, self.stream_id, self.waits = name, hash(name), []

    def wait_event(self, event) -> None:
        self.waits.append(event)


@pytest.fixture
def fake_cuda(monkeypatch):
    """The model is on cuda:1, the thread's current stream there is a user's side stream,
    and the current device is 0 (whose stream must never be used)."""
    streams = {"current": FakeStream("user side stream on cuda:1")}

    def current_stream(device=None):
        if device is not None and torch.device(device) == torch.device("cuda", 1):
            return streams["current"]
        return FakeStream("a stream of the current device, cuda:0")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    for name, value in (("reset_peak_memory_stats", None), ("memory_allocated", 0), ("max_memory_allocated", 0),
                        ("synchronize", None)):
        monkeypatch.setattr(torch.cuda, name, lambda *args, _v=value, **kwargs: _v)
    FakeEvent.created, FakeEvent.clock = [], FakeClock()
    ops = CudaDevice.__new__(CudaDevice)
    ops.device, ops.copy_stream, ops._compute_streams = torch.device("cuda", 1), FakeStream("copy"), {}
    return ops, streams


# -- 1. the loader's threads are bound to the model's device --------------------------------


class Bound(HostDevice):
    """The CPU device, noting every device call made on a thread that was not bound."""

    def __init__(self, device):
        super().__init__(device)
        self.bound: set[int] = set()
        self.unbound: list[str] = []

    def bind_thread(self) -> None:
        self.bound.add(threading.get_ident())

    def _check(self, what: str) -> None:
        if threading.get_ident() not in self.bound:
            self.unbound.append(f"{what} on {threading.current_thread().name}")

    def copy_in(self, dst, src):
        self._check("copy_in")
        super().copy_in(dst, src)

    def copy_mark(self):
        self._check("copy_mark")
        return super().copy_mark()

    def copy_waits_for(self, marker) -> None:
        self._check("copy_waits_for")


@pytest.mark.parametrize("io", [IOConfig(staged=True), IOConfig(staged=True, threaded=False),
                                IOConfig(mode="direct"), IOConfig(mode="register", threaded=False)],
                         ids=["staged", "staged-inline", "direct", "register-inline"])
def test_every_copy_is_issued_on_a_thread_bound_to_the_device(qwen3, io, monkeypatch):
    path, ids, want = qwen3
    made: list[Bound] = []
    monkeypatch.setattr(streamer_module, "device_ops", lambda device: made.append(Bound(device)) or made[-1])
    model = LazyStreamModel.from_pretrained(path, 1, io=io)
    with torch.no_grad(), streamer_of(model).session():
        for _ in range(2):
            assert torch.equal(model(ids).logits, want)
    streamer_of(model).close()
    assert made[0].bound and made[0].unbound == []
    assert threading.get_ident() not in made[0].bound  # the caller's own thread is left alone


def test_bind_thread_sets_the_models_device_and_the_copy_stream(monkeypatch):
    ops = CudaDevice.__new__(CudaDevice)
    ops.device, ops.copy_stream = torch.device("cuda", 1), "the copy stream"
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "set_stream", calls.append)
    ops.bind_thread()
    assert calls == [torch.device("cuda", 1), "the copy stream"]


# -- 2. block timing -------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, clock: FakeClock, seconds: float):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def forward(self, x):
        self.clock.now += self.seconds
        return x


def _stalling(clock: FakeClock, seconds: float):
    def hook(*args):  # as the streamer's pre-hook waits for a block's bytes
        clock.now += seconds
    return hook


def test_copy_stalls_count_neither_as_block_nor_as_other_compute(monkeypatch):
    import lazystream.devices as devices

    clock = FakeClock()
    monkeypatch.setattr(devices, "time", clock)
    blocks = [Block(clock, 1.0) for _ in range(3)]
    for block in blocks:
        block.register_forward_pre_hook(_stalling(clock, 10.0))  # registered first, as the streamer's
    timer = BlockTimer(blocks, torch.device("cpu"))
    for block in blocks:
        clock.now += 2.0  # compute outside the blocks
        block(torch.zeros(1))
    calibration = timer.finish()
    assert calibration.block_compute == (1.0, 1.0, 1.0)
    assert calibration.other_compute == pytest.approx(6.0)  # not 36: the 30 s of stalls are no compute


def test_block_timer_records_on_the_model_devices_current_stream(fake_cuda):
    ops, streams = fake_cuda
    clock = FakeEvent.clock
    blocks = [Block(clock, 1.0) for _ in range(2)]
    for block in blocks:
        block.register_forward_pre_hook(_stalling(clock, 5.0))
    timer = BlockTimer(blocks, torch.device("cuda", 1))
    for block in blocks:
        block(torch.zeros(1))
    calibration = timer.finish()
    assert {e.stream.name for e in FakeEvent.created} == {"user side stream on cuda:1"}
    assert all(e.enable_timing and e.blocking for e in FakeEvent.created)
    assert calibration.block_compute == (1.0, 1.0) and calibration.other_compute == 0.0


# -- 3. unload after forwards on a side stream ------------------------------------------------


def test_cuda_events_the_host_waits_on_sleep_and_time_the_copy_stream(fake_cuda):
    ops, _ = fake_cuda
    mark = ops.copy_mark()
    assert mark.enable_timing and mark.blocking and mark.stream is ops.copy_stream
    done = ops.compute_done()
    assert done.blocking and done.stream.name == "user side stream on cuda:1"


def test_wait_compute_idle_waits_for_every_stream_the_forwards_ran_on(fake_cuda):
    ops, streams = fake_cuda
    ops.note_compute_stream()
    streams["current"] = FakeStream("another side stream")
    ops.compute_waits_for(FakeEvent())
    FakeEvent.created = []
    ops.wait_compute_idle()
    waited = {e.stream.name for e in FakeEvent.created if e.waited}
    assert waited == {"user side stream on cuda:1", "another side stream"}
    assert all(e.blocking for e in FakeEvent.created)
    FakeEvent.created = []
    ops.wait_compute_idle()  # forgotten once waited for
    assert FakeEvent.created == []


class Streams(HostDevice):
    """The CPU device, logging the stream bookkeeping and whether the slots were still held."""

    def __init__(self, device):
        super().__init__(device)
        self.log: list[str] = []
        self.streamer = None

    def note_compute_stream(self) -> None:
        self.log.append("forward")

    def wait_compute_idle(self) -> None:
        held = bool(self.streamer and self.streamer._slots)
        self.log.append("waited, slots held" if held else "waited")


def test_unload_waits_for_the_forwards_streams_before_dropping_buffers(qwen3, monkeypatch):
    path, ids, _ = qwen3
    made: list[Streams] = []
    monkeypatch.setattr(streamer_module, "device_ops", lambda device: made.append(Streams(device)) or made[-1])
    model = LazyStreamModel.from_pretrained(path, 1)
    streamer = streamer_of(model)
    made[0].streamer = streamer
    with torch.no_grad():
        model(ids)
        model(ids)
    streamer.unload()
    assert made[0].log == ["forward", "forward", "waited, slots held"]
    streamer.close()


# -- 5. failures on the loader's threads --------------------------------------------------------


class FailingStaging(HostDevice):
    def staging(self, nbytes: int) -> torch.Tensor:
        raise RuntimeError("CUDA error: out of memory")


def test_pinned_allocation_failure_surfaces_in_load_naming_the_size(qwen3, monkeypatch):
    path, _, _ = qwen3
    monkeypatch.setattr(streamer_module, "device_ops", FailingStaging)
    with pytest.raises(StagingMemoryError, match=r"could not allocate 16384 bytes \(0\.02 MiB\) of host staging "
                                                  r"memory \(2 buffers of 8192 bytes\)"):
        LazyStreamModel.from_pretrained(path, 1, io=IOConfig(staged=True, staging_bytes=8192, staging_buffers=2))


def test_read_error_in_a_forward_is_the_original_error_naming_shard_and_tensor(qwen3, monkeypatch):
    path, ids, want = qwen3
    model = LazyStreamModel.from_pretrained(path, 0, io=IOConfig(staged=True, staging_bytes=8192))
    streamer = streamer_of(model)
    victim = streamer.ckpt["model.layers.2.mlp.up_proj.weight"]
    bad_at = streamer.ckpt.shard(victim.file).bytes.data_ptr() + victim.offset
    real_copyto, raised = np.copyto, []

    def copyto(dst, src, **kwargs):
        if not raised and src.ctypes.data <= bad_at < src.ctypes.data + src.nbytes:
            raised.append(OSError(errno.EIO, "Input/output error"))
            raise raised[-1]
        return real_copyto(dst, src, **kwargs)

    monkeypatch.setattr(np, "copyto", copyto)
    with torch.no_grad(), pytest.raises(OSError) as info:
        model(ids)
    assert info.value is raised[0]
    notes = "\n".join(info.value.__notes__)
    assert str(victim.file) in notes and "model.layers.2.mlp.up_proj.weight" in notes
    with torch.no_grad():  # the next call reads it again, and the model still works
        assert torch.equal(model(ids).logits, want)
    streamer.close()


# -- 6. a loader thread that cannot be bound ------------------------------------------------


class Unbindable(cpu_device_class()):
    """torch.cuda.set_device raising on every lazystream thread (a bad ordinal, a lost device)."""

    def bind_thread(self) -> None:
        raise RuntimeError("CUDA error: invalid device ordinal")


def within(seconds: float, fn):
    """Run ``fn`` on a thread; fail the test if it has not returned after ``seconds`` (a hang)."""
    result: list = []

    def run():
        try:
            result.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"hung for {seconds} s"
    return result[0]


@pytest.mark.parametrize("io", [IOConfig(staged=True), IOConfig(staged=False), IOConfig(staged=True, threaded=False)],
                         ids=["staged", "unstaged", "staged-inline"])
def test_a_thread_that_cannot_be_bound_fails_every_job_and_drain_and_close_return(tmp_path, io):
    odd = write_odd_checkpoint(tmp_path, [[5000, 7000], [3000]], seed=3)
    with Checkpoint.open(odd) as ckpt:
        runs = [r for name in sorted(ckpt) for r in [ckpt[name]]]
        from lazystream.checkpoint import coalesce

        loader = Loader(ckpt, Unbindable(torch.device("cpu")), io)
        dest = torch.zeros(sum(r.nbytes for r in runs) + 64, dtype=torch.uint8)
        job = coalesce([(r, sum(x.nbytes for x in runs[:i])) for i, r in enumerate(runs)])
        for _ in range(2):  # the first job and every later one
            kind, exc = within(30, lambda: loader.submit(job, dest).wait())
            assert kind == "raised" and "invalid device ordinal" in str(exc)
        assert within(30, loader.drain)[0] == "ok"
        assert within(30, loader.close)[0] == "ok"


def test_a_model_whose_threads_cannot_be_bound_raises_at_load(qwen3, monkeypatch):
    path, _, _ = qwen3
    monkeypatch.setattr(streamer_module, "device_ops", Unbindable)
    gc.collect()
    earlier = {t for t in threading.enumerate() if t.name == "lazystream-io"}  # other tests' models, not collected yet
    kind, exc = within(60, lambda: LazyStreamModel.from_pretrained(path, 1))
    assert kind == "raised" and "invalid device ordinal" in str(exc)
    del exc  # its traceback holds the half-loaded model, whose finalizer stops the loader's thread
    gc.collect()
    assert not [t for t in threading.enumerate() if t.name == "lazystream-io" and t not in earlier]


# -- 7. a failed cudaHostRegister -----------------------------------------------------------


class FakeCudart:
    """The CUDA runtime's sticky-until-read last error, and a cudaHostRegister that fails."""

    class cudaError:
        success = 0

    def __init__(self):
        self.last_error = 0

    def cudaHostRegister(self, ptr, size, flags):
        self.last_error = 801  # cudaErrorNotSupported, as a driver without read-only registration gives
        return 801

    def cudaGetErrorString(self, err):
        return "operation not supported"

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, 0
        return err


def test_a_failed_host_register_clears_cudas_last_error(monkeypatch):
    import contextlib

    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    ops = CudaDevice.__new__(CudaDevice)
    ops.device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="operation not supported"):
        ops.register_host(torch.zeros(10, dtype=torch.uint8))
    assert cudart.last_error == 0  # else the next, unrelated kernel launch raises it


# -- 8. a graph capture while the session's prefetch is in flight ----------------------------


class CapturedMidPrefetch(cpu_device_class()):
    """The copy stream's calls fail as CUDA fails them while a user's thread captures a graph
    in the default (global) capture mode."""

    capturing = False

    def copy_mark(self):
        if CapturedMidPrefetch.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return super().copy_mark()


def test_a_capture_during_the_wraparound_prefetch_is_named(qwen3, monkeypatch):
    path, ids, want = qwen3
    monkeypatch.setattr(streamer_module, "device_ops", CapturedMidPrefetch)
    end_call = streamer_module.Streamer._end_call

    def capture_begins(self, completed):  # as the call returns, before its wrap-around prefetch
        CapturedMidPrefetch.capturing = True
        end_call(self, completed)

    model = LazyStreamModel.from_pretrained(path, 1)
    monkeypatch.setattr(streamer_module.Streamer, "_end_call", capture_begins)
    try:
        with torch.no_grad(), streamer_of(model).session():
            assert torch.equal(model(ids).logits, want)  # ends by prefetching the next call's blocks
            with pytest.raises(UnsupportedOperationError, match="a CUDA graph was captured") as err:
                model(ids)
    finally:
        CapturedMidPrefetch.capturing = False
    assert "capture_error_mode='thread_local'" in str(err.value)
    streamer_of(model).close()
