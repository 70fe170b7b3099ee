"""The CUDA path: copy stream, pinned staging ring, events. Skipped without CUDA;
tools/gpu_check.py runs it on the device machine."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3ForCausalLM

from lazystream import IOConfig, LazyStreamModel, streamer_of
from lazystream.synthetic import build_qwen3

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def qwen3_cuda(tmp_path_factory):
    path = build_qwen3(tmp_path_factory.mktemp("qwen3"), {"num_hidden_layers": 6}, max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1)).cuda()
    ref = Qwen3ForCausalLM.from_pretrained(path).cuda().eval()
    with torch.no_grad():
        logits = ref(ids).logits
    tokens = ref.generate(ids, max_new_tokens=6, do_sample=False)
    del ref
    return path, ids, logits, tokens


@pytest.mark.parametrize("keep_gpu", [0, 2, 5, 6])
@pytest.mark.parametrize("placement", ["first", "spread"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_cuda_logits_equal(qwen3_cuda, keep_gpu, placement, prefetch):
    path, ids, want, tokens = qwen3_cuda
    model = LazyStreamModel.from_pretrained(path, keep_gpu, device="cuda", placement=placement, prefetch=prefetch)
    streamer = streamer_of(model)
    with torch.no_grad(), streamer.session():
        for _ in range(3):
            assert torch.equal(model(ids).logits, want)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    streamer.close()


@pytest.mark.parametrize("staging_bytes", [4096, 64 * 2**20])
def test_cuda_small_staging_ring(qwen3_cuda, staging_bytes):
    path, ids, want, _ = qwen3_cuda
    model = LazyStreamModel.from_pretrained(path, 1, device="cuda", io=IOConfig(staging_bytes=staging_bytes))
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, want)
    streamer_of(model).close()


def test_cuda_memory_matches_plan_and_returns_after_unload(qwen3_cuda):
    path, ids, _, _ = qwen3_cuda
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = LazyStreamModel.from_pretrained(path, 2, device="cuda")
    streamer = streamer_of(model)
    # The caching allocator does not split a large block for less than 1 MiB.
    taken = torch.cuda.memory_allocated() - before
    assert streamer.plan.device_bytes <= taken <= streamer.plan.device_bytes + (2 + streamer.plan.slots) * 2**20
    streamer.unload()
    assert torch.cuda.memory_allocated() == before
    with torch.no_grad():
        model(ids)
    streamer.close()
    del model, streamer
    assert torch.cuda.memory_allocated() == before


def test_cuda_dtype_cast_on_device(tmp_path):
    path = build_qwen3(tmp_path, dtype=torch.float32, max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 5)).cuda()
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    model = LazyStreamModel.from_pretrained(path, 1, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    streamer_of(model).close()


@pytest.mark.parametrize("io", [IOConfig(mode="register"), IOConfig(read_threads=4, staging_bytes=3 * 4096),
                                IOConfig(read_threads=1, staging_buffers=2, staging_bytes=64 * 2**20),
                                IOConfig(mode="direct")], ids=["register", "4-threads-tiny-pieces", "1-thread-ring",
                                                               "direct"])
def test_cuda_every_io_mode_gives_equal_logits_and_times_its_copies(qwen3_cuda, io):
    path, ids, want, _ = qwen3_cuda
    model = LazyStreamModel.from_pretrained(path, 1, device="cuda", io=io)
    streamer = streamer_of(model)
    with torch.no_grad(), streamer.session():
        for _ in range(3):
            assert torch.equal(model(ids).logits, want)
    stats = streamer.stats()
    assert stats.last_call.h2d_bytes >= stats.last_call.bytes_streamed > 0
    assert stats.last_call.h2d_gb_per_s > 0
    assert (stats.staging_bytes == 0) == (io.mode == "register")
    assert (stats.last_call.fill_bytes == 0) == (io.mode == "register")
    streamer.close()


def test_cuda_unload_after_forwards_on_a_side_stream(qwen3_cuda):
    """Hazard 3: the forward's kernels wait on the side stream behind a long sleep when
    unload() runs; memory the allocator then hands out again and fills must not change
    what that forward reads."""
    path, ids, want, _ = qwen3_cuda
    model = LazyStreamModel.from_pretrained(path, 0, device="cuda")
    streamer = streamer_of(model)
    side = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(side):
        model(ids)  # warm: learn the order
        torch.cuda._sleep(2_000_000_000)  # about a second of the side stream's time
        logits = model(ids).logits
    streamer.unload()
    garbage = torch.full((streamer.plan.device_bytes,), 7, dtype=torch.uint8, device="cuda")
    side.synchronize()
    assert torch.equal(logits, want)
    del garbage
    streamer.close()


def test_cuda_block_timer_times_the_side_stream_the_blocks_run_on():
    """Hazard 2: blocks that sleep on a side stream are timed there, not on the default stream."""
    from lazystream.telemetry import BlockTimer

    class Sleep(torch.nn.Module):
        def forward(self, x):
            torch.cuda._sleep(100_000_000)
            return x

    blocks = [Sleep(), Sleep()]
    side = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(side):
        start.record(side)
        torch.cuda._sleep(100_000_000)
        end.record(side)
        end.synchronize()
        one = start.elapsed_time(end) / 1e3
        timer = BlockTimer(blocks, torch.device("cuda", torch.cuda.current_device()))
        x = torch.zeros(1, device="cuda")
        for block in blocks:
            x = block(x)
        calibration = timer.finish()
    assert all(0.5 * one < t < 2 * one for t in calibration.block_compute)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_model_on_the_second_device_makes_no_context_on_the_first(qwen3_cuda):
    """Hazard 1, in a process of its own: loading and streaming on cuda:1 leaves cuda:0 untouched."""
    import subprocess
    import sys

    path = qwen3_cuda[0]
    code = (
        "import torch\n"
        "from lazystream import LazyStreamModel, streamer_of\n"
        f"model = LazyStreamModel.from_pretrained({str(path)!r}, 1, device='cuda:1')\n"
        "with torch.no_grad(), streamer_of(model).session():\n"
        "    for _ in range(3):\n"
        "        model(torch.randint(0, 256, (2, 11), device='cuda:1'))\n"
        "torch.cuda.synchronize('cuda:1')\n"
        "streamer_of(model).close()\n"
        "print(torch._C._cuda_hasPrimaryContext(0), torch._C._cuda_hasPrimaryContext(1))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "True"]
