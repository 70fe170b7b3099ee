"""A tensor's source is a list of byte runs: tracing conversions into runs, reading a
value back (read_value), the conversions the libraries apply at load, the default dtype
each library chooses, and blocks that cover a model's weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import keeps_holes
from lazystream import LazyStreamModel, streamer_of
from lazystream.adapters import default_dtype, find_blocks
from lazystream.checkpoint import Checkpoint, copy_runs, read_value
from lazystream.conversions import sources_for
from lazystream.errors import UnsupportedConversionError
from lazystream.source import ConversionNotStreamableError, TensorSource, source_of, trace


@pytest.fixture
def stored(tmp_path):
    """Three tensors in one file, and their values."""
    values = {
        "a": torch.arange(24, dtype=torch.float32).reshape(4, 6),
        "b": torch.arange(100, 124, dtype=torch.float32).reshape(4, 6),
        "c": torch.arange(200, 212, dtype=torch.bfloat16).reshape(2, 6),
    }
    save_file(values, tmp_path / "w.safetensors")
    with Checkpoint.open(tmp_path) as ckpt:
        yield ckpt, values


def _value(ckpt, traced):
    return read_value(ckpt, source_of("x", traced))


# -- tracing ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [
    lambda a, b: torch.stack([a, b]),
    lambda a, b: torch.cat([a, b], dim=1),
    lambda a, b: torch.cat([a, b]).chunk(4)[1],
    lambda a, b: torch.split(torch.cat([a, b], dim=1), [5, 7], dim=1)[1],
    lambda a, b: a.reshape(2, 2, 6).transpose(0, 1).contiguous(),
    lambda a, b: torch.stack([a, b]).transpose(0, 1)[1:3],
    lambda a, b: a[1:3].to(torch.float16),  # a cast on load: the runs stay in the stored dtype
    lambda a, b: a.reshape(4, 3, 2).transpose(1, 2).contiguous(),  # element-wise, still exact
], ids=["stack", "cat-dim1", "chunk", "split-dim1", "block-transpose", "stacked-slice", "cast", "element-transpose"])
def test_traced_ops_give_the_runs_of_their_value(stored, op):
    ckpt, values = stored
    got = _value(ckpt, op(trace(ckpt["a"]), trace(ckpt["b"])))
    want = op(values["a"], values["b"])
    assert torch.equal(got, want.to(got.dtype))


def test_a_split_along_the_first_dimension_is_one_run_read_zero_copy(stored):
    ckpt, values = stored
    piece = source_of("b.half", trace(ckpt["b"]).chunk(2)[1])
    assert piece.runs == (piece.runs[0],) and piece.runs[0].offset == ckpt["b"].offset + 48 and not piece.fresh
    view = read_value(ckpt, piece)
    assert torch.equal(view, values["b"][2:])
    assert view.data_ptr() == ckpt.tensor("b").data_ptr() + 48  # the shard's map, not a copy


def test_stacked_tensors_are_one_run_each_and_coalesce_when_adjacent(stored):
    ckpt, _ = stored
    stacked = source_of("ab", torch.stack([trace(ckpt["a"]), trace(ckpt["b"])]))
    adjacent = ckpt["a"].offset + ckpt["a"].nbytes == ckpt["b"].offset
    assert len(stacked.runs) == (1 if adjacent else 2) and stacked.fresh  # a new tensor in the library
    interleaved = source_of("ab", torch.cat([trace(ckpt["a"]), trace(ckpt["b"])], dim=1))
    assert len(interleaved.runs) == 8 and interleaved.fresh  # a row of a, a row of b, ...
    assert source_of("a", torch.cat([trace(ckpt["a"])])).fresh  # even a concatenation of one
    assert not source_of("a", trace(ckpt["a"]).reshape(24)).fresh
    placement = type("P", (), {"source": interleaved, "offset": 1000})()
    runs = copy_runs([placement])
    assert sorted(r.dest_offset for r in runs) == [1000 + 24 * i for i in range(8)]


@pytest.mark.parametrize("op, reason", [
    (lambda a, b, c: a * 2, "computes new values"),
    (lambda a, b, c: torch.cat([a, torch.zeros(2, 6)]), "does not hold"),
    (lambda a, b, c: torch.cat([a, c]), "different dtypes"),
    (lambda a, b, c: (a + 1)[1:], "computes new values"),  # poison follows the value through later views
    (lambda a, b, c: a.view(torch.int16), "reinterprets its bytes"),
])
def test_ops_byte_runs_cannot_express_poison_the_result(stored, op, reason):
    ckpt, _ = stored
    out = op(trace(ckpt["a"]), trace(ckpt["b"]), trace(ckpt["c"]))
    with pytest.raises(ConversionNotStreamableError, match=reason):
        source_of("x", out)


def test_an_in_place_change_poisons_the_tensor_the_library_keeps(stored):
    ckpt, _ = stored
    a = trace(ckpt["a"])
    a.mul_(2)
    with pytest.raises(ConversionNotStreamableError, match="mul_ changes it in place"):
        source_of("a", a)
    b = trace(ckpt["b"])
    row = b[1]  # a view taken before its base changes
    b[0] = 1.0  # a write through another view
    with pytest.raises(ConversionNotStreamableError, match="in place"):
        source_of("b", b)
    with pytest.raises(ConversionNotStreamableError, match="in place"):
        source_of("row", row)
    c = trace(ckpt["c"])
    torch.add(trace(ckpt["c"]), 1, out=c)
    with pytest.raises(ConversionNotStreamableError, match="in place"):
        source_of("c", c)


def test_within_clips_runs_to_a_byte_range(stored):
    ckpt, _ = stored
    source = source_of("ab", torch.cat([trace(ckpt["a"]), trace(ckpt["b"])], dim=1))
    part = source.within(20, 52)  # the end of a's first row, b's first row, a's second row's start
    assert [(r.dest, r.nbytes) for r in part] == [(0, 4), (4, 24), (28, 4)]
    assert sum(r.nbytes for r in part) == 32


# -- the libraries' conversions -------------------------------------------------------------


def _qwen3_moe(folder, **overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, **overrides)
    model = Qwen3MoeForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="40KB")
    return model


def test_transformers_stacks_experts_into_fused_parameters_read_as_runs(tmp_path):
    model = _qwen3_moe(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        sources = sources_for(model, ckpt)
        gate_up = sources["model.layers.1.mlp.experts.gate_up_proj"]
        assert gate_up.shape == (4, 64, 64) and len(gate_up.stored) == 8  # gate and up of 4 experts
        assert torch.equal(read_value(ckpt, gate_up), model.model.layers[1].mlp.experts.gate_up_proj.detach())
        assert not sources["model.layers.0.self_attn.q_proj.weight"].fresh and gate_up.fresh
        assert not sources.unused


def test_a_computed_conversion_is_refused_naming_the_tensors(tmp_path):
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import ConversionOps, WeightConverter

    class Scale(ConversionOps):  # a conversion that computes: no byte runs hold its result
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            return {target_patterns[0]: next(iter(input_dict.values()))[0] * 2}

    model = _qwen3_moe(tmp_path)
    register_checkpoint_conversion_mapping(
        "Qwen3MoeForCausalLM", [WeightConverter("mlp.gate.weight", "mlp.gate.weight", operations=[Scale()])])
    try:
        with Checkpoint.open(tmp_path) as ckpt, pytest.raises(UnsupportedConversionError) as info:
            sources_for(model, ckpt)
    finally:
        from transformers import conversion_mapping

        conversion_mapping._checkpoint_conversion_mapping_cache.pop("Qwen3MoeForCausalLM")
        conversion_mapping.USER_REGISTERED_MAPPINGS.discard("Qwen3MoeForCausalLM")
    assert "model.layers.0.mlp.gate.weight" in str(info.value) and "mul computes new values" in str(info.value)


def test_moe_plan_and_stream_read_headers_only_then_expert_runs(tmp_path, monkeypatch):
    _qwen3_moe(tmp_path)
    reads = []
    original = Checkpoint.copy_run
    monkeypatch.setattr(Checkpoint, "copy_run", lambda self, run, dest: (reads.append(run), original(self, run, dest)))
    model = LazyStreamModel.from_pretrained(tmp_path, keep_gpu=0, device="cpu", load=False)
    assert not reads  # planning traced the conversion from the headers
    plan = streamer_of(model).plan
    experts = [t for b in plan.blocks for t in b.tensors if ".experts." in t.name]
    assert experts and all(len(t.source.runs) >= 1 for t in experts)
    streamer_of(model).close()


def test_plan_of_a_real_size_moe_layout_from_its_headers(tmp_path, capsys):
    """Qwen3-30B-A3B's layers (128 experts of 768, top 8) as save_pretrained writes them
    (the library's own reverse conversion, 8 of its 48 layers here), in one sparse file of
    10 GB: its stacked experts are traced from the header alone."""
    if not keeps_holes(tmp_path):
        pytest.skip("this file system does not keep holes: the file would take 10 GB")
    from accelerate import init_empty_weights
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from lazystream.cli import main
    from lazystream.synthetic.single_file import write_header_only

    config = Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
                            head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768, dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"])
    with init_empty_weights():
        model = Qwen3MoeForCausalLM(config)
    stored = revert_weight_conversion(model, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert "model.layers.0.mlp.experts.127.up_proj.weight" in stored
    config.save_pretrained(tmp_path)
    write_header_only(tmp_path / "model.safetensors", stored)
    assert main(["plan", str(tmp_path), "--keep-gpu", "2", "--device", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dtype"] == "bfloat16" and len(plan["blocks"]) == 8
    assert plan["param_bytes"] == sum(p.numel() for p in model.parameters()) * 2
    assert plan["blocks"][0]["bytes"] == sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    experts = sum(p.numel() for layer in model.model.layers[2:] for p in layer.mlp.experts.parameters()) * 2
    streamed = sum(b["bytes"] for b in plan["blocks"] if not b["resident"])
    assert plan["moe"] == {"experts": 128, "top_k": 8, "expert_bytes_per_call": experts,
                           "routed_only_bytes_per_token": streamed - experts + experts * 8 // 128}


@pytest.mark.parametrize("io", ["direct", "staged"])
def test_expert_runs_stream_exactly_through_every_io_path(tmp_path, io):
    from transformers import Qwen3MoeForCausalLM

    from lazystream import IOConfig
    from lazystream.io import DIRECT_ALIGN

    _qwen3_moe(tmp_path)
    config = {"direct": IOConfig(mode="direct", staging_bytes=DIRECT_ALIGN * 3, read_threads=3),
              "staged": IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 2)}[io]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = Qwen3MoeForCausalLM.from_pretrained(tmp_path)(ids).logits
        for keep_gpu in (0, 1):
            model = LazyStreamModel.from_pretrained(tmp_path, keep_gpu, device="cpu", io=config)
            assert torch.equal(model(ids).logits, want)
            streamer_of(model).close()


# -- default dtype ------------------------------------------------------------------------


def _record_map(tmp_path, tensors):
    save_file(tensors, tmp_path / "w.safetensors")
    return Checkpoint.open(tmp_path)


@pytest.mark.parametrize("library, config, want", [
    ("transformers", {"dtype": "bfloat16"}, torch.bfloat16),
    ("transformers", {"torch_dtype": "float16"}, torch.float16),
    ("transformers", {}, torch.float16),  # the first floating tensor in key order that is not float8
    ("diffusers", {"_class_name": "X"}, torch.float32),  # diffusers builds in float32 and casts to it
    ("torch", None, torch.float16),  # the floating dtype holding the most bytes, float8 aside
])
def test_default_dtype_is_the_one_each_library_chooses(tmp_path, library, config, want):
    tensors = {"a.fp8": torch.zeros(64, dtype=torch.float8_e4m3fn), "b.half": torch.zeros(4, dtype=torch.float16),
               "c.bf16": torch.zeros(2, dtype=torch.bfloat16)}
    with _record_map(tmp_path, tensors) as ckpt:
        assert default_dtype(library, config, ckpt) == want


def test_float8_weights_stream_as_float8_bytes_and_upcast_on_the_device(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lazystream.synthetic import fill_random_weights

    model = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128))
    fill_random_weights(model, torch.bfloat16, seed=0)
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = Qwen3ForCausalLM.from_pretrained(tmp_path)(ids).logits  # the config's bfloat16, as transformers loads
        streamed = LazyStreamModel.from_pretrained(tmp_path, keep_gpu=0, device="cpu")
        assert torch.equal(streamed(ids).logits, want)
    plan, stats = streamer_of(streamed).plan, streamer_of(streamed).stats()
    linears = [t for b in plan.blocks for t in b.tensors if t.source.dtype == torch.float8_e4m3fn]
    assert len(linears) == 2 * 7 and all(t.dtype == torch.bfloat16 and t.needs_cast for t in linears)
    assert plan.dtype == torch.bfloat16 and plan.scratch_bytes >= max(t.source.numel * 2 for t in linears)
    assert stats.last_call.bytes_streamed == sum(b.nbytes for b in plan.blocks)  # stored (float8) bytes
    assert sum(b.nbytes for b in plan.blocks) < sum(t.source.numel * 2 for b in plan.blocks for t in b.tensors)
    streamer_of(streamed).close()


# -- blocks that cover the weights ---------------------------------------------------------


def test_unet_blocks_cover_its_weights_in_run_order():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
    blocks = find_blocks(unet)
    modules = dict(unet.named_modules())
    nbytes = lambda m: sum(p.nbytes for p in m.parameters())  # noqa: E731
    assert sum(nbytes(modules[b]) for b in blocks) >= 0.9 * nbytes(unet)
    parts = [b.split(".")[0] for b in blocks]
    assert parts == sorted(parts, key=["down_blocks", "mid_block", "up_blocks"].index)  # not registration order
    assert blocks[:3] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0",
                          "down_blocks.0.resnets.1"]
    assert blocks.index("down_blocks.0.downsamplers.0") == 4
    assert blocks[7:10] == ["mid_block.resnets.0", "mid_block.attentions.0.transformer_blocks.0", "mid_block.resnets.1"]


def test_declared_blocks_stay_where_they_cover_the_weights():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256))
    assert find_blocks(model) == [f"model.layers.{i}" for i in range(3)]


def test_the_plan_reports_the_streamed_share(tmp_path):
    _qwen3_moe(tmp_path)
    model = LazyStreamModel.from_pretrained(tmp_path, keep_gpu=1, device="cpu", load=False)
    plan = streamer_of(model).plan
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.param_bytes == params
    assert math.isclose(plan.block_share, sum(b.nbytes for b in plan.blocks) / params)
    assert math.isclose(plan.streamed_share, plan.blocks[1].nbytes / params)
    assert f"{plan.streamed_share:.1%} of the weights" in str(plan)
    assert plan.summary()["block_share"] == plan.block_share
    streamer_of(model).close()


def test_source_of_a_record_is_one_run(stored):
    ckpt, _ = stored
    source = TensorSource.of(ckpt["c"])
    assert source.runs[0].offset == ckpt["c"].offset and source.nbytes == ckpt["c"].nbytes and not source.fresh


def test_assembled_values_are_laid_out_as_fresh_allocations_on_the_cpu(tmp_path):
    """The library stacks experts into new tensors (64-byte aligned on the CPU) but leaves
    plain tensors views of the file: lazystream lays each out the same way."""
    from lazystream.plan import MAP_ALIGN

    _qwen3_moe(tmp_path)
    model = LazyStreamModel.from_pretrained(tmp_path, keep_gpu=1, device="cpu", load=False)
    plan = streamer_of(model).plan
    placements = [t for b in plan.blocks for t in b.tensors] + list(plan.resident_tensors)
    assert {t.source.fresh for t in placements} == {True, False}
    for t in placements:
        want = 0 if t.source.fresh else t.source.runs[0].offset % MAP_ALIGN
        assert t.offset % MAP_ALIGN == want, t.name
    streamer_of(model).close()


def test_a_shard_larger_than_memory_maps(tmp_path):
    """A single-file checkpoint can exceed RAM and swap; mapping it must not need them."""
    if not keeps_holes(tmp_path):
        pytest.skip("this file system does not keep holes")
    from lazystream.synthetic.single_file import write_header_only

    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    size = 2 * (info["MemTotal"] + info["SwapTotal"])
    rows = size // (4 * 2**20) + 1
    write_header_only(tmp_path / "huge.safetensors", {"w": torch.empty(rows, 2**20, device="meta")})
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt["w"].nbytes > size and ckpt.tensor("w")[-1, :4].tolist() == [0.0] * 4
