"""What users do with a loaded model, on CUDA: adapters, state_dict, moves between the CPU
and the device, inference_mode, torch.compile, CUDA graph capture. Skipped without CUDA;
tools/gpu_check.py runs it on the device machine."""

from __future__ import annotations

import pytest
import torch
from compiled import inductor_bound, inductor_difference, library_recompiles, with_stale_row
from loras import zimage_lora
from transformers import Qwen3ForCausalLM

from lazystream import LazyStreamModel, streamer_of
from lazystream.errors import ReadOnlyWeightError, UnsupportedOperationError
from lazystream.synthetic import build_qwen3, build_zimage, zimage_config, zimage_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = build_qwen3(tmp_path_factory.mktemp("qwen3-cuda"), max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    return path, ids


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(model.device)).logits.cpu()


def on_cuda(inputs):
    x, t, caption = inputs
    return [v.cuda() for v in x], t.cuda(), [v.cuda() for v in caption]


@pytest.mark.parametrize("keep_gpu", [0, 1, 100])
def test_lora_on_cuda_equals_the_library(tmp_path, keep_gpu):
    pytest.importorskip("peft", reason="carry the peft wheel to the GPU machine (README)")
    ZImageTransformer2DModel = pytest.importorskip("diffusers").ZImageTransformer2DModel
    path = build_zimage(tmp_path / "model", max_shard_size="60KB")
    lora = zimage_lora(tmp_path / "lora", path, seed=1)
    inputs = on_cuda(zimage_inputs(zimage_config()))
    ref = ZImageTransformer2DModel.from_pretrained(path).cuda().eval()
    model = LazyStreamModel.from_pretrained(path, keep_gpu, device="cuda")
    for m in (ref, model):
        m.load_lora_adapter(lora, weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    assert all(p.device.type == "cuda" for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        assert torch.equal(model(*inputs).sample[0], ref(*inputs).sample[0])
        with pytest.raises(ReadOnlyWeightError):
            model.fuse_lora()
        streamer_of(model).unload()  # adapters leave the device with the rest, and come back
        assert all(p.device.type == "cpu" for n, p in model.named_parameters() if "lora_" in n)
        assert torch.equal(model(*inputs).sample[0], ref(*inputs).sample[0])
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", [0, 2])
def test_state_dict_moves_and_casts_on_cuda(qwen3, keep_gpu):
    path, ids = qwen3
    ref = Qwen3ForCausalLM.from_pretrained(path).cuda().eval()
    model = LazyStreamModel.from_pretrained(path, keep_gpu, device="cuda")
    assert model.device.type == "cuda" and all(p.device.type == "cuda" for p in model.parameters())
    want = logits(ref, ids)
    assert torch.equal(logits(model, ids), want)
    for name, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], value.cpu()), name
    model.cpu()  # re-planned for the CPU: every device byte given back
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(logits(model, ids), logits(Qwen3ForCausalLM.from_pretrained(path).eval(), ids))
    model.cuda().to(torch.bfloat16)
    assert torch.equal(logits(model, ids), logits(ref.to(torch.bfloat16), ids))
    streamer_of(model).close()


def test_inference_mode_on_cuda(qwen3):
    path, ids = qwen3
    want = logits(Qwen3ForCausalLM.from_pretrained(path).cuda().eval(), ids)
    with torch.inference_mode():
        model = LazyStreamModel.from_pretrained(path, 1, device="cuda", load=False)
        assert torch.equal(model(ids.cuda()).logits.cpu(), want)
    assert torch.equal(logits(model, ids), want)
    streamer_of(model).close()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_eager_backends_on_cuda_equal_the_library_model(qwen3, backend):
    path, ids = qwen3
    torch._dynamo.reset()
    want = logits(Qwen3ForCausalLM.from_pretrained(path).cuda().eval(), ids)
    model = LazyStreamModel.from_pretrained(path, 1, device="cuda")
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):
        assert torch.equal(logits(compiled, ids), want)
    streamer_of(model).close()


def test_inductor_on_cuda_within_inductor_own_bound(qwen3, tmp_path):
    """As tests/test_compile.py on the CPU: inductor's own difference to eager bounds the
    streamed model's, and a stale row in a streamed block is far outside the bound."""
    from torch._dynamo.utils import counters

    path, ids = qwen3
    library = Qwen3ForCausalLM.from_pretrained(path).cuda().eval()
    want = logits(library, ids)
    model = LazyStreamModel.from_pretrained(path, 1, device="cuda")
    streamed = [b.path for b in streamer_of(model).plan.blocks if not b.resident]
    baseline = library_recompiles(library, streamed, lambda m: logits(m, ids), calls=2)
    bound = inductor_bound(want, logits(torch.compile(library), ids))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    out = logits(compiled, ids)
    assert inductor_difference(out, want) <= bound
    first = counters["stats"]["unique_graphs"]
    second = logits(compiled, ids)
    assert counters["stats"]["unique_graphs"] - first <= baseline  # none but the library's own at the breaks
    assert torch.equal(second, out) or (baseline and inductor_difference(second, want) <= bound)
    streamer_of(model).close()

    name = "model.layers.{}.mlp.down_proj.weight"
    wrong = with_stale_row(path, tmp_path / "stale", name.format(2), name.format(1))
    model = LazyStreamModel.from_pretrained(wrong, 1, device="cuda")
    assert not streamer_of(model).plan.blocks[2].resident
    assert inductor_difference(logits(torch.compile(model), ids), want) > 100 * bound
    streamer_of(model).close()


def test_cuda_graph_capture_is_refused(qwen3):
    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, 1, device="cuda")
    ids = ids.cuda()
    logits(model, ids)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(UnsupportedOperationError, match="CUDA graph"), torch.no_grad():
        with torch.cuda.graph(graph):
            model(ids)
    streamer_of(model).close()


@pytest.mark.parametrize("how", ["model", "blocks"])
def test_compile_with_cuda_graphs_is_refused(qwen3, how):
    """mode='reduce-overhead' records CUDA graphs of the pieces between the hooks; a streamed
    block's slot holds another block at the next call: refused at the first streamed block."""
    path, ids = qwen3
    torch._dynamo.reset()
    model = LazyStreamModel.from_pretrained(path, 1, device="cuda")
    if how == "model":
        compiled = torch.compile(model, mode="reduce-overhead")
    else:
        for layer in model.model.layers:
            layer.compile(mode="reduce-overhead")
        compiled = model
    with pytest.raises(UnsupportedOperationError, match=r"streamed block model\.layers\.1 of Qwen3ForCausalLM runs "
                                                        r"under torch\.compile with CUDA graphs .*reduce-overhead"):
        logits(compiled, ids)
    torch._dynamo.reset()
    for layer in model.model.layers:
        layer._compiled_call_impl = None
    assert torch.equal(logits(model, ids), logits(Qwen3ForCausalLM.from_pretrained(path).cuda().eval(), ids))
    streamer_of(model).close()
