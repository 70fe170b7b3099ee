"""The adversarial asynchronous CPU device (lazystream/async_device.py), and the orderings
of the copy path checked on it: each test makes the schedule under which its wait matters
(long copy delays, long compute lags, a second compute stream), so that without the wait
it fails every time. tools/check_ordering.py removes each wait in turn and runs these."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import qwen3_with_logits
from transformers import Qwen3ForCausalLM

from lazystream import IOConfig, LazyStreamModel, streamer_of
from lazystream import async_device
from lazystream.async_device import POISON, AsyncDevice


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return qwen3_with_logits(tmp_path_factory.mktemp("async"), 7, seed=11)


@pytest.fixture
def schedule(monkeypatch):
    """Put this test's models on the async device with the given copy delay and compute
    lag ("least:most" seconds); after the test, the hazards found (every queued work run)."""
    monkeypatch.setenv("LAZYSTREAM_TEST_DEVICE", "async")
    async_device.HAZARDS.clear()

    def make(delay: str = "0.002", lag: str = "0.002") -> list[str]:
        monkeypatch.setenv("LAZYSTREAM_ASYNC_DELAY", delay)
        monkeypatch.setenv("LAZYSTREAM_ASYNC_LAG", lag)
        return async_device.HAZARDS

    yield make
    async_device.settle_all()


def hazards_after(model) -> list[str]:
    streamer_of(model).ops.synchronize()
    found, async_device.HAZARDS[:] = list(async_device.HAZARDS), []
    return found


# -- the device itself ----------------------------------------------------------------------


def test_copies_land_late_in_stream_order_and_markers_wait_for_them():
    ops = AsyncDevice(torch.device("cpu"), delay="0.2:0.25")  # long: a busy machine must not run it first
    dst = ops.empty(8)
    assert dst.eq(POISON).all()  # fresh memory is poisoned
    first, second = torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)
    ops.copy_in(dst, first)
    ops.copy_in(dst, second)
    mark = ops.copy_mark()
    assert dst.eq(POISON).all() and not mark.query()  # queued, not run: the negative control
    ops.host_waits_for(mark)
    assert torch.equal(dst, second)  # in stream order: the second copy ran last


def test_the_copy_stream_waits_for_a_compute_marker_and_compute_lags():
    ops = AsyncDevice(torch.device("cpu"), delay="0", lag="0.2:0.25")
    slot = ops.empty(4)
    read = ops.compute_done(slot)
    assert not read.query()
    ops.copy_waits_for(read)
    ops.copy_in(slot, torch.zeros(4, dtype=torch.uint8))
    ops.host_waits_for(ops.copy_mark())
    assert read.query() and async_device.HAZARDS == []


def test_a_write_under_lagging_compute_is_a_hazard():
    async_device.HAZARDS.clear()
    ops = AsyncDevice(torch.device("cpu"), delay="0", lag="0.3:0.35")
    slot = ops.empty(4)
    ops.compute_done(slot)
    ops.copy_in(slot, torch.zeros(4, dtype=torch.uint8))  # no copy_waits_for: the hazard
    ops.synchronize()
    found, async_device.HAZARDS[:] = list(async_device.HAZARDS), []
    assert len(found) == 1 and "4 bytes were written while compute" in found[0]


def test_a_copy_into_memory_freed_before_it_ran_is_a_hazard():
    async_device.HAZARDS.clear()
    ops = AsyncDevice(torch.device("cpu"), delay="0.3:0.35")
    slot = ops.empty(4)
    ops.copy_in(slot, torch.zeros(4, dtype=torch.uint8))
    del slot  # dropped with the copy in flight
    ops.synchronize()
    found, async_device.HAZARDS[:] = list(async_device.HAZARDS), []
    assert found == ["a copy of 4 bytes landed in memory freed before it ran"]


def test_freed_memory_is_handed_out_again_poisoned():
    ops = AsyncDevice(torch.device("cpu"))
    buf = ops.empty(64)
    buf.zero_()
    where = buf.data_ptr()
    del buf
    again = ops.empty(64)
    assert again.data_ptr() == where and again.eq(POISON).all()
    kept = ops.empty(64)
    assert kept.data_ptr() != again.data_ptr()  # memory still held is never handed out


def test_a_seed_makes_the_delays_reproducible(monkeypatch):
    import itertools

    def delays(seed: int) -> list[float]:
        monkeypatch.setattr(async_device, "_made", itertools.count())  # as in a fresh process
        devices = [AsyncDevice(torch.device("cpu"), seed=seed, delay="1") for _ in range(2)]
        return [d._random.uniform(*d.delay) for d in devices for _ in range(3)]

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)
    assert delays(3)[:3] != delays(3)[3:]  # two devices of one run draw differently


def test_the_environment_puts_cpu_models_on_it(monkeypatch):
    from lazystream.devices import HostDevice, device_ops

    monkeypatch.setenv("LAZYSTREAM_TEST_DEVICE", "async")
    assert isinstance(device_ops(torch.device("cpu")), AsyncDevice)
    monkeypatch.setenv("LAZYSTREAM_TEST_DEVICE", "cpu")
    assert type(device_ops(torch.device("cpu"))) is HostDevice
    monkeypatch.setenv("LAZYSTREAM_TEST_DEVICE", "gpu?")
    with pytest.raises(ValueError, match="'cpu' or 'async'"):
        device_ops(torch.device("cpu"))


# -- each wait of the copy path, under the schedule that needs it ---------------------------


def run(model, ids, calls: int = 2, stream: str | None = None, session: bool = True):
    ops = streamer_of(model).ops
    outs = []
    with torch.no_grad(), streamer_of(model).session() if session else contextlib.nullcontext():
        for _ in range(calls):
            if stream is None:
                outs.append(model(ids).logits)
            else:
                with ops.stream(stream):
                    outs.append(model(ids).logits)
    return outs


def test_compute_waits_for_the_slots_copy(qwen3, schedule):
    """Copies land 20-30 ms late: a forward that did not wait reads poison or the slot's old block."""
    path, ids, want = qwen3
    schedule(delay="0.02:0.03", lag="0")
    model = LazyStreamModel.from_pretrained(path, 1)
    assert isinstance(streamer_of(model).ops, AsyncDevice) and streamer_of(model).loader.staged
    for out in run(model, ids):
        assert torch.equal(out, want)
    assert hazards_after(model) == []


def test_the_copy_into_a_slot_waits_for_its_last_reader(qwen3, schedule):
    """Compute lags 50-60 ms behind the host: a prefetch copy into a freed slot must wait for
    the forward that read it."""
    path, ids, want = qwen3
    schedule(delay="0", lag="0.05:0.06")
    model = LazyStreamModel.from_pretrained(path, 1)
    for out in run(model, ids):
        assert torch.equal(out, want)
    assert hazards_after(model) == []


def test_a_reader_waits_for_the_staging_buffers_last_copy(qwen3, schedule):
    """Two 4 KiB staging buffers and copies 5-10 ms late: a reader refilling a buffer before
    its copy ran would send the next piece's bytes to the device."""
    path, ids, want = qwen3
    schedule(delay="0.005:0.01", lag="0")
    model = LazyStreamModel.from_pretrained(path, 1, io=IOConfig(staged=True, staging_bytes=4096,
                                                                  staging_buffers=2))
    for out in run(model, ids, calls=1):
        assert torch.equal(out, want)
    assert hazards_after(model) == []


def test_unload_waits_for_the_last_forward_on_every_stream(qwen3, schedule):
    """A call on a side stream, then unload and a call on the default stream: the new
    buffers reuse the freed memory, which the side stream's forward still read. No
    session: a wrap-around prefetch would make unload wait for the side stream anyway."""
    path, ids, want = qwen3
    schedule(delay="0", lag="0.05:0.06")
    model = LazyStreamModel.from_pretrained(path, 1)
    (side,) = run(model, ids, calls=1, stream="side", session=False)
    streamer_of(model).unload()
    (again,) = run(model, ids, calls=1, session=False)
    assert torch.equal(side, want) and torch.equal(again, want)
    assert hazards_after(model) == []


def test_unload_waits_for_the_copies_in_flight(qwen3, schedule):
    """Copies land 30-40 ms late and the session prefetches the next call's blocks: unload
    right after a call must let those copies finish before it drops their slots."""
    path, ids, want = qwen3
    schedule(delay="0.03:0.04", lag="0")
    model = LazyStreamModel.from_pretrained(path, 1)
    (out,) = run(model, ids, calls=1)
    streamer_of(model).unload()
    assert torch.equal(out, want)
    assert hazards_after(model) == []


def test_the_cast_scratch_waits_for_the_previous_blocks_reader(tmp_path_factory, schedule):
    """Streamed blocks cast into one scratch. Calls alternate between two compute streams,
    and compute lags 50-60 ms: the first block's casts of a call must wait for the last
    block of the call before, on the other stream, to finish reading the scratch. Four
    streamed blocks in two slots: the first block's slot was last read by the third block,
    so the slot's own ordering does not cover the fourth."""
    path, ids, _ = qwen3_with_logits(tmp_path_factory.mktemp("cast"), 5, seed=12)
    with torch.no_grad():
        want = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()(ids).logits
    schedule(delay="0", lag="0.05:0.06")
    model = LazyStreamModel.from_pretrained(path, 0, dtype=torch.bfloat16)
    plan = streamer_of(model).plan
    assert plan.scratch_bytes and plan.slots == 2 and len(plan.streamed) == 4
    outs = []
    for stream in ("one", "two", "one"):
        outs += run(model, ids, calls=1, stream=stream)
    assert all(torch.equal(out, want) for out in outs)
    assert hazards_after(model) == []
