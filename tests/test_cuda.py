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
