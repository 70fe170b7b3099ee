"""The bandwidth probe: measured once per machine and device whoever asks first, its read
rate cached per file system, and on CUDA ordered against the caller's stream."""

from __future__ import annotations

import pytest
import torch

from lazystream import LazyStreamModel, probe, streamer_of
from lazystream.synthetic import build_qwen3


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """An empty probe cache, and the number of device and read measurements made."""
    monkeypatch.setenv("LAZYSTREAM_CACHE", str(tmp_path / "cache"))
    runs = {"device": 0, "read": 0}
    measure_device, measure_read = probe.measure_device, probe.measure_read

    def device(*args):
        runs["device"] += 1
        return measure_device(*args)

    def read(*args):
        runs["read"] += 1
        return measure_read(*args)

    monkeypatch.setattr(probe, "measure_device", device)
    monkeypatch.setattr(probe, "measure_read", read)
    return runs


def test_the_planner_and_the_loader_share_one_device_probe(counted, tmp_path):
    """The planner asks with a shard, the loader sizing its ring without one (io.py): one
    measurement of the device between them (it was two: the keys differed by the shard)."""
    shard = tmp_path / "shard.bin"
    shard.write_bytes(bytes(2**21))
    cpu = torch.device("cpu")
    planned = probe.bandwidth(cpu, shard)
    ring = probe.bandwidth(cpu)
    assert counted == {"device": 1, "read": 1}
    assert (ring.memcpy, ring.h2d) == (planned.memcpy, planned.h2d)
    # Another checkpoint on the same file system: its read rate is the cached one.
    other = tmp_path / "other" / "shard.bin"
    other.parent.mkdir()
    other.write_bytes(bytes(2**21))
    assert probe.bandwidth(cpu, other) == planned
    assert counted == {"device": 1, "read": 1}
    assert probe.bandwidth(cpu, shard, refresh=True) is not None
    assert counted == {"device": 2, "read": 2}


def test_a_cache_without_the_expected_rates_is_measured_again(counted):
    cpu = torch.device("cpu")
    probe.bandwidth(cpu)
    (path,) = (probe.cache_dir() / "probe").glob("*.json")
    path.write_text('{"memcpy": 1.0}')  # an older or truncated file
    assert probe.bandwidth(cpu).memcpy != 1.0
    assert counted["device"] == 2


def test_a_first_auto_load_probes_once(counted, tmp_path):
    path = build_qwen3(tmp_path / "model", max_shard_size="60KB")
    model = LazyStreamModel.from_pretrained(path, "auto", max_gpu_memory="600KiB", placement="cost")
    probe.bandwidth(streamer_of(model).device)  # what the loader asks on CUDA
    assert counted["device"] == 1
    streamer_of(model).close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_first_auto_load_on_cuda_probes_once(counted, tmp_path):
    path = build_qwen3(tmp_path / "model", max_shard_size="60KB")
    model = LazyStreamModel.from_pretrained(path, "auto", device="cuda", max_gpu_memory="64MiB")
    assert counted["device"] == 1  # the planner's and the staging ring's
    streamer_of(model).close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_h2d_probe_does_not_write_into_memory_the_callers_stream_still_reads():
    """A block freed on the caller's stream while a kernel queued there still reads it: the
    probe's destination must not be that block, nor its copies run before that kernel."""
    n = probe.PROBE_BYTES
    x = torch.full((n,), 7, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s: the sum below runs after the probe's copies are issued
    total = x.sum(dtype=torch.int64)
    del x  # back in the pool of the current stream, its kernel still queued
    probe.h2d_seconds(torch.device("cuda"), n, repeat=2)
    assert total.item() == 7 * n
