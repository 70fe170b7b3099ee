"""Streamed models give exactly the outputs of the libraries' own loaders, on CPU."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from transformers import Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from lazystream import IOConfig, LazyStreamModel, attach, streamer_of
from lazystream.errors import ClosedError, MissingTensorsError
from conftest import cpu_device_class
from lazystream.io import ring_layout
from lazystream.weights import CheckpointWeight
from lazystream.synthetic import build_qwen3, build_zimage, qwen3_config, zimage_config, zimage_inputs

QWEN_LAYERS = 4
ZIMAGE_BLOCKS = 2 + 2 + 4  # noise refiner, context refiner, main layers


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = build_qwen3(tmp_path_factory.mktemp("qwen3"), max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = Qwen3ForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = ref(ids).logits
    tokens = ref.generate(ids, max_new_tokens=6, do_sample=False)
    return path, ids, logits, tokens


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    path = build_zimage(tmp_path_factory.mktemp("zimage"), max_shard_size="60KB")
    inputs = zimage_inputs(zimage_config())
    ref = ZImageTransformer2DModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = ref(*inputs).sample
    return path, inputs, out


def assert_all_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


KEEP = [0, 1, QWEN_LAYERS - 1, QWEN_LAYERS, QWEN_LAYERS + 5]


@pytest.mark.parametrize("keep_gpu", KEEP)
@pytest.mark.parametrize("placement", ["first", "spread"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_qwen3_logits_equal_repeated_and_in_session(qwen3, keep_gpu, placement, prefetch):
    path, ids, want, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu, placement=placement, prefetch=prefetch)
    assert type(model) is Qwen3ForCausalLM
    streamer = streamer_of(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model(ids).logits, want)
        with streamer.session():
            for _ in range(3):
                assert torch.equal(model(ids).logits, want)
    streamed = len(streamer.plan.streamed)
    assert streamed == max(QWEN_LAYERS - keep_gpu, 0)
    assert streamer.stats().last_call.blocks_streamed == streamed
    streamer.close()


@pytest.mark.parametrize("keep_gpu", [0, 2, QWEN_LAYERS])
def test_qwen3_generate_tokens_equal(qwen3, keep_gpu):
    path, ids, _, want = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", [0, 1, ZIMAGE_BLOCKS - 1, ZIMAGE_BLOCKS, ZIMAGE_BLOCKS + 5])
@pytest.mark.parametrize("placement", ["first", "spread"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_zimage_output_equal(zimage, keep_gpu, placement, prefetch):
    path, inputs, want = zimage
    model = LazyStreamModel.from_pretrained(path, keep_gpu, placement=placement, prefetch=prefetch)
    assert type(model) is ZImageTransformer2DModel
    streamer = streamer_of(model)
    assert len(streamer.plan.blocks) == ZIMAGE_BLOCKS
    with torch.no_grad():
        assert_all_equal(model(*inputs).sample, want)
        with streamer.session():
            for _ in range(2):
                assert_all_equal(model(*inputs).sample, want)
    streamer.close()


IO_MODES = {
    "inline-direct": IOConfig(threaded=False, staged=False),
    "thread-direct": IOConfig(threaded=True, staged=False),
    "inline-staged": IOConfig(threaded=False, staged=True, staging_bytes=8192),
    "thread-staged-ring3": IOConfig(threaded=True, staged=True, staging_bytes=8192, staging_buffers=3),
    "thread-staged-big": IOConfig(threaded=True, staged=True),
}


@pytest.mark.parametrize("io", IO_MODES.values(), ids=IO_MODES.keys())
def test_every_io_path_gives_equal_output(qwen3, io):
    """The worker thread and the staging ring run on the CPU too, behind IOConfig."""
    path, ids, want, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 1, io=io, prefetch=2)
    with torch.no_grad(), streamer_of(model).session():
        for _ in range(3):
            assert torch.equal(model(ids).logits, want)
    stats = streamer_of(model).stats()
    ring = ring_layout(io, streamer_of(model).plan.slot_bytes)  # the fields io leaves at None, sized
    assert stats.staging_bytes == (ring.nbytes if io.staged else 0)
    streamer_of(model).close()


def test_stats_bytes_streamed_equal_streamed_blocks_sizes(qwen3):
    path, ids, _, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 1, placement="first")
    streamer = streamer_of(model)
    ckpt = streamer.ckpt
    want = sum(rec.nbytes for name, rec in ckpt.items() if any(name.startswith(f"model.layers.{i}.") for i in (1, 2, 3)))
    with torch.no_grad():
        for call in range(3):
            model(ids)
            last = streamer.stats().last_call
            assert last.bytes_streamed == want
            assert last.blocks_streamed == 3
    assert streamer.stats().calls == 3
    assert streamer.stats().total.bytes_streamed == 3 * want
    streamer.close()


@pytest.mark.parametrize("keep_gpu", [0, 2, QWEN_LAYERS])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_plan_device_bytes_equal_allocated_bytes(qwen3, keep_gpu, prefetch):
    path, ids, _, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu, prefetch=prefetch)
    streamer = streamer_of(model)
    with torch.no_grad():
        model(ids)
    stats = streamer.stats()
    # Between calls parameters are CheckpointWeights (no storage); bound during a call they are
    # views of the arena; buffers are tensors of their own.
    assert all(isinstance(p, CheckpointWeight) for p in model.parameters())
    own_buffers = sum(-(-t.nbytes // 512) * 512 for t in model.buffers())  # allocator granules
    assert stats.device_bytes == streamer.plan.device_bytes
    assert stats.kept_bytes == own_buffers
    assert stats.resident_bytes == streamer.plan.resident_bytes
    assert stats.slot_bytes == streamer.plan.slots * streamer.plan.slot_bytes
    assert streamer.plan.slots == min(prefetch, QWEN_LAYERS - min(keep_gpu, QWEN_LAYERS))
    arena_views = list(streamer._buffers.resident.params.values())
    assert len(arena_views) == len(streamer.plan.resident_tensors)
    assert all(t.untyped_storage().nbytes() == streamer.plan.resident_bytes for t in arena_views)
    streamer.close()


def test_unload_then_call_loads_again(qwen3):
    path, ids, want, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 2)
    streamer = streamer_of(model)
    streamer.unload()
    stats = streamer.stats()
    assert stats.device_bytes == 0
    assert all(isinstance(p, CheckpointWeight) and p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert streamer.stats().device_bytes == streamer.plan.device_bytes
    streamer.unload()
    streamer.load()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    streamer.close()


def test_close_then_call_raises(qwen3):
    path, ids, _, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 2)
    streamer_of(model).close()
    with pytest.raises(ClosedError, match="was closed"):
        model(ids)
    streamer_of(model).close()  # idempotent


def test_backward_through_streamed_block_raises(qwen3):
    path, ids, _, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 2).requires_grad_(False)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds).logits.sum()
    with pytest.raises(RuntimeError, match="backward through streamed block 'model.layers"):
        loss.backward()
    streamer_of(model).close()


def test_tied_embeddings(tmp_path):
    path = build_qwen3(tmp_path, max_shard_size="60KB", tie_word_embeddings=True)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = Qwen3ForCausalLM.from_pretrained(path).eval()
    model = LazyStreamModel.from_pretrained(path, 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    streamer_of(model).close()


@pytest.mark.parametrize("stored, wanted", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                            (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("keep_gpu", [0, 2])
def test_dtype_follows_library_loader(tmp_path, stored, wanted, keep_gpu):
    path = build_qwen3(tmp_path, dtype=stored, max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=wanted).eval()
    model = LazyStreamModel.from_pretrained(path, keep_gpu, dtype=wanted)
    streamer = streamer_of(model)
    assert (streamer.plan.scratch_bytes > 0) == (stored != wanted)
    with torch.no_grad():
        got = model(ids).logits
        assert got.dtype == ref(ids).logits.dtype
        assert torch.equal(got, ref(ids).logits)
    streamer.close()


def test_zimage_dtype_cast(tmp_path):
    path = build_zimage(tmp_path, max_shard_size="60KB")
    inputs = zimage_inputs(zimage_config())
    ref = ZImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    model = LazyStreamModel.from_pretrained(path, 3, dtype=torch.bfloat16)
    bf16_inputs = ([x.bfloat16() for x in inputs[0]], inputs[1], [c.bfloat16() for c in inputs[2]])
    with torch.no_grad():
        assert_all_equal(model(*bf16_inputs).sample, ref(*bf16_inputs).sample)
    streamer_of(model).close()


def test_default_dtype_is_the_checkpoints(tmp_path):
    path = build_qwen3(tmp_path, dtype=torch.bfloat16, max_shard_size="60KB")
    model = LazyStreamModel.from_pretrained(path, 2)
    assert streamer_of(model).plan.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    streamer_of(model).close()


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_keep_gpu_is_a_value_error(qwen3, bad):
    with pytest.raises(ValueError, match="keep_gpu must be an int >= 0"):
        LazyStreamModel.from_pretrained(qwen3[0], bad)


def test_bad_placement_and_prefetch(qwen3):
    with pytest.raises(ValueError, match="placement must be one of"):
        LazyStreamModel.from_pretrained(qwen3[0], 1, placement="middle")
    with pytest.raises(ValueError, match="prefetch must be an int >= 1"):
        LazyStreamModel.from_pretrained(qwen3[0], 1, prefetch=0)


def test_plan_placements(qwen3):
    path = qwen3[0]
    first = LazyStreamModel.from_pretrained(path, 2, placement="first")
    spread = LazyStreamModel.from_pretrained(path, 2, placement="spread")
    assert [b.resident for b in streamer_of(first).plan.blocks] == [True, True, False, False]
    assert [b.resident for b in streamer_of(spread).plan.blocks] == [True, False, True, False]
    assert "keep_gpu >= blocks: all resident" in str(streamer_of(LazyStreamModel.from_pretrained(path, 9)).plan)
    for m in (first, spread):
        streamer_of(m).close()


def test_zimage_blocks_found_in_every_list(zimage):
    model = LazyStreamModel.from_pretrained(zimage[0], 0)
    paths = [b.path for b in streamer_of(model).plan.blocks]
    assert paths[:4] == ["noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1"]
    assert paths[4:] == [f"layers.{i}" for i in range(4)]
    streamer_of(model).close()


def test_blocks_override(qwen3):
    path, ids, want, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 1, blocks="model.layers")
    assert len(streamer_of(model).plan.blocks) == QWEN_LAYERS
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    streamer_of(model).close()
    model = LazyStreamModel.from_pretrained(path, 0, blocks=["model.layers.1", "model.layers.3"])
    assert [b.path for b in streamer_of(model).plan.blocks] == ["model.layers.1", "model.layers.3"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    streamer_of(model).close()


class Fp32NormQwen3(Qwen3ForCausalLM):
    _keep_in_fp32_modules_strict = ["norm"]


@pytest.mark.parametrize("keep_gpu", [0, 2])
def test_keep_in_fp32_modules_follow_the_library(tmp_path, keep_gpu):
    """(Qwen3 cannot run with fp32 norms in bf16, so this compares dtypes and values, not outputs.)"""
    path = build_qwen3(tmp_path, max_shard_size="60KB")
    ref = dict(Fp32NormQwen3.from_pretrained(path, dtype=torch.bfloat16).named_parameters())
    assert ref["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert ref["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    model = LazyStreamModel.from_pretrained(path, keep_gpu, dtype=torch.bfloat16, model_cls=Fp32NormQwen3)
    plan = streamer_of(model).plan
    targets = {t.name: t.dtype for b in plan.blocks for t in b.tensors} | {t.name: t.dtype for t in plan.resident_tensors}
    assert targets == {name: p.dtype for name, p in ref.items()}
    for name, param in model.named_parameters():
        assert param.dtype == ref[name].dtype and torch.equal(param, ref[name]), name
    streamer_of(model).close()


class _GatedLayer(Qwen3DecoderLayer):
    """A layer with a parameter its class declares float32 (as fp32 router gates are)."""

    def __init__(self, config, idx):
        super().__init__(config, idx)
        self.gate = torch.nn.Parameter(torch.rand(config.hidden_size, dtype=torch.float32) + 0.5)

    def forward(self, hidden_states, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        return (out * self.gate).to(out.dtype)


class GatedQwen3(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model.layers = torch.nn.ModuleList(_GatedLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


@pytest.mark.parametrize("keep_gpu", [0, 2])
def test_parameters_declared_in_another_dtype_keep_it(tmp_path, keep_gpu):
    torch.manual_seed(0)
    GatedQwen3(qwen3_config()).save_pretrained(tmp_path, max_shard_size="60KB")
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(6))
    ref = GatedQwen3.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert ref.model.layers[0].gate.dtype == torch.float32
    model = LazyStreamModel.from_pretrained(tmp_path, keep_gpu, model_cls=GatedQwen3, dtype=torch.bfloat16)
    gates = [t.dtype for b in streamer_of(model).plan.blocks for t in b.tensors if t.name.endswith(".gate")]
    assert gates == [torch.float32] * QWEN_LAYERS
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    streamer_of(model).close()


def test_resident_casts_go_through_a_bounded_buffer(tmp_path, monkeypatch):
    import lazystream.buffers as buffers_module

    monkeypatch.setattr(buffers_module, "CAST_CHUNK_BYTES", 4096)  # smaller than the embedding
    sizes = []
    device = cpu_device_class()
    original = device.empty
    monkeypatch.setattr(device, "empty", lambda self, n: sizes.append(n) or original(self, n))
    path = build_qwen3(tmp_path, max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(7))
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = LazyStreamModel.from_pretrained(path, 2, dtype=torch.bfloat16)
    plan = streamer_of(model).plan
    temporaries = sizes[2 + plan.slots:]  # after the arena, the slots and the cast scratch
    assert temporaries and max(temporaries) <= 4096 + 512
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", [0, 3, ZIMAGE_BLOCKS])
def test_single_row_matmuls_equal_too(zimage, keep_gpu):
    """With one sample, Z-Image's adaLN matmuls have one row, where MKL picks its kernel by
    the weight's address alignment: buffers must align tensors as the mapped file does."""
    path = zimage[0]
    inputs = zimage_inputs(zimage_config(), sizes=((16, 16),), cap_lens=(7,))
    with torch.no_grad():
        want = ZImageTransformer2DModel.from_pretrained(path).eval()(*inputs).sample
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    with torch.no_grad():
        assert_all_equal(model(*inputs).sample, want)
    streamer_of(model).close()


def test_base_model_prefix_added_or_removed_as_transformers_does(qwen3, tmp_path):
    """A Qwen3ForCausalLM checkpoint ("model.layers...") loads into Qwen3Model ("layers...")
    and a Qwen3Model checkpoint into Qwen3ForCausalLM's base, as transformers loads them."""
    from transformers import Qwen3Model

    path, ids, _, _ = qwen3
    ref = Qwen3Model.from_pretrained(path).eval()
    with pytest.warns(UserWarning, match=r"not used by Qwen3Model: \['lm_head.weight'\]"):
        model = LazyStreamModel.from_pretrained(path, 1, model_cls=Qwen3Model)
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)
    streamer_of(model).close()

    ref.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers real
        full = Qwen3ForCausalLM(ref.config)
    with pytest.raises(MissingTensorsError, match=r"1 tensor\(s\) of Qwen3ForCausalLM are in no shard: "
                                                  r"\['lm_head.weight'\]"):  # every other name matched
        attach(full, tmp_path / "base", 1)
    base = LazyStreamModel.from_pretrained(tmp_path / "base", 1)  # config names Qwen3Model
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, ref(ids).last_hidden_state)
    streamer_of(base).close()


def test_load_false_defers_device_memory_to_the_first_call(qwen3):
    path, ids, want, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 2, load=False)
    streamer = streamer_of(model)
    assert streamer.stats().device_bytes == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert streamer.stats().device_bytes == streamer.plan.device_bytes
    streamer.close()
