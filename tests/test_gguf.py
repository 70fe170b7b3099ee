"""GGUF single files (as city96 / ComfyUI users get them: Z-Image's original keys, mixed
Q8_0 / Q4_K / Q4_0 / F16 / F32 tensors) streamed as their stored bytes, against diffusers'
own ``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("gguf")

from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel  # noqa: E402
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter  # noqa: E402

from lazystream import LazyStreamModel, streamer_of  # noqa: E402
from lazystream.errors import UnsupportedQuantizationError  # noqa: E402
from lazystream.gguf import read_gguf_header  # noqa: E402
from lazystream.synthetic import zimage_config, zimage_inputs  # noqa: E402
from lazystream.synthetic.gguf_file import build_zimage_gguf  # noqa: E402

# dim 256: rows fit Q4_K's 256-value blocks; the feed-forward's 682-wide w2 fits none (F16).
SIZE = {"dim": 256, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [32, 48, 48]}
N_BLOCKS = 8  # 2 noise refiners, 2 context refiners, 4 layers


def _config() -> GGUFQuantizationConfig:
    return GGUFQuantizationConfig(compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage-gguf")
    return build_zimage_gguf(folder / "z_image-Q4_K_M.gguf", SIZE, config_folder=folder / "transformer"), folder


@pytest.fixture(scope="module")
def reference(gguf_file):
    file, folder = gguf_file
    return ZImageTransformer2DModel.from_single_file(str(file), config=str(folder), subfolder="transformer",
                                                     quantization_config=_config()).eval()


def _load(gguf_file, keep_gpu):
    file, folder = gguf_file
    return LazyStreamModel.from_single_file(file, keep_gpu, config=folder, subfolder="transformer", device="cpu",
                                            quantization_config=_config())


def _outputs(model) -> torch.Tensor:
    x, t, cap = zimage_inputs(zimage_config(SIZE))
    with torch.no_grad():
        out = model([v.bfloat16() for v in x], t, [c.bfloat16() for c in cap])[0]
    return torch.cat([sample.flatten() for sample in out])


def test_the_file_mixes_formats_as_city96_files_do(gguf_file):
    formats = {rec.format or str(rec.dtype) for rec in read_gguf_header(gguf_file[0]).records}
    assert formats == {"Q8_0", "Q4_K", "Q4_0", "torch.float16", "torch.float32"}


@pytest.mark.parametrize("keep_gpu", [0, 3, N_BLOCKS])
def test_outputs_equal_diffusers_gguf_model(gguf_file, reference, keep_gpu):
    model = _load(gguf_file, keep_gpu)
    try:
        assert type(model.layers[1].attention.to_q) is GGUFLinear  # diffusers' own GGUF module
        # During a call the weight is what diffusers' forward dequantizes: a GGUFParameter
        # of the stored quant type (a plain tensor of its bytes would not be dequantized).
        seen = {}
        for name in ("layers.1.attention.to_out.0", "layers.0.feed_forward.w1"):
            module = model.get_submodule(name)
            module.register_forward_pre_hook(
                lambda mod, args, name=name: seen.update({name: (type(mod.weight), mod.weight.quant_type.name)}))
        assert torch.equal(_outputs(model), _outputs(reference))
        assert seen == {"layers.1.attention.to_out.0": (GGUFParameter, "Q4_K"),
                        "layers.0.feed_forward.w1": (GGUFParameter, "Q4_0")}
        assert sum(not b.resident for b in streamer_of(model).plan.blocks) == N_BLOCKS - keep_gpu
    finally:
        streamer_of(model).close()


def test_each_block_streams_its_stored_bytes(gguf_file):
    """The plan and the stream count GGUF blocks at their stored size, far below the
    dequantized bfloat16 size."""
    model = _load(gguf_file, 0)
    try:
        streamer = streamer_of(model)
        records = {rec.name: rec for rec in read_gguf_header(gguf_file[0]).records}
        prefix = "model.diffusion_model."
        for block in streamer.plan.blocks:
            stored = {name for t in block.tensors for name in t.source.stored}
            assert block.nbytes == sum(records[name].nbytes for name in stored)
        _outputs(model)
        assert streamer.stats().last_call.bytes_streamed == sum(b.nbytes for b in streamer.plan.blocks)
        qkv = records[prefix + "layers.0.attention.qkv.weight"]
        assert qkv.format == "Q8_0" and qkv.nbytes == 3 * 256 * 256 * 34 // 32  # 34 bytes per 32 values
        formats = streamer.plan.blocks[4].formats  # layers.0
        assert set(formats) == {"Q8_0", "Q4_K", "Q4_0", "F16", "F32"} and sum(formats.values()) == \
            streamer.plan.blocks[4].nbytes
        values = sum(math.prod(p.quant_shape) if hasattr(p, "quant_shape") else p.numel()
                     for p in model.layers[0].parameters())
        assert streamer.plan.blocks[4].nbytes < 0.6 * 2 * values  # below 0.6x its bfloat16 bytes
    finally:
        streamer_of(model).close()


def test_state_dict_is_diffusers_gguf_state_dict(gguf_file, reference):
    model = _load(gguf_file, 3)
    try:
        ours, theirs = model.state_dict(), reference.state_dict()
        assert list(ours) == list(theirs)
        for name, value in theirs.items():
            assert type(ours[name]) is type(value), name
            assert getattr(ours[name], "quant_type", None) == getattr(value, "quant_type", None), name
            assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
        assert sum(isinstance(v, GGUFParameter) for v in theirs.values()) > 0
        weight = model.layers[1].attention.to_q.weight  # between calls: streamed, with its quant type
        assert weight.quant_type == reference.layers[1].attention.to_q.weight.quant_type
    finally:
        streamer_of(model).close()


def test_lora_on_top_equals_diffusers(gguf_file, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    file, folder = gguf_file
    plain = ZImageTransformer2DModel(**zimage_config(SIZE))
    plain.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_out.0", "w1", "w3"],
                                 init_lora_weights=False))
    lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(plain).items()}
    reference = ZImageTransformer2DModel.from_single_file(str(file), config=str(folder), subfolder="transformer",
                                                          quantization_config=_config()).eval()
    model = _load(gguf_file, 3)
    try:
        before = _outputs(model)
        for m in (reference, model):
            m.load_lora_adapter(dict(lora), adapter_name="style", prefix=None)
        after = _outputs(model)
        assert torch.equal(after, _outputs(reference))
        assert not torch.equal(after, before)  # the adapter changes the outputs
    finally:
        streamer_of(model).close()


def test_dtype_moves_are_refused_as_diffusers_refuses_them(gguf_file, reference):
    model = _load(gguf_file, 3)
    try:
        for move in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.float()):
            with pytest.raises(ValueError) as theirs:
                move(reference)
            with pytest.raises(ValueError) as ours:
                move(model)
            assert str(ours.value) == str(theirs.value)
        assert torch.equal(_outputs(model), _outputs(reference))  # nothing changed
    finally:
        streamer_of(model).close()


def test_a_gguf_file_needs_its_quantization_config(gguf_file):
    file, folder = gguf_file
    with pytest.raises(UnsupportedQuantizationError, match="GGUFQuantizationConfig"):
        LazyStreamModel.from_single_file(file, 0, config=folder, subfolder="transformer", device="cpu")
    with pytest.raises(UnsupportedQuantizationError, match="'bitsandbytes 4-bit' is not streamed"):
        LazyStreamModel.from_single_file(file, 0, config=folder, subfolder="transformer", device="cpu",
                                         quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})


def test_plan_of_a_gguf_file_prints_each_blocks_formats(gguf_file, capsys):
    from lazystream.cli import main

    file, folder = gguf_file
    args = ["plan", str(file), "--config", str(folder), "--subfolder", "transformer", "--keep-gpu", "2",
            "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "layers.0" in text and "Q8_0" in text and "Q4_K" in text and "block bytes stored as" in text
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    records = read_gguf_header(file).records
    assert sum(b["bytes"] for b in plan["blocks"]) == sum(
        r.nbytes for r in records if any(f".{p}." in r.name for p in ("layers", "noise_refiner", "context_refiner")))
    assert set(plan["blocks"][0]["formats"]) == {"Q8_0", "Q4_K", "Q4_0", "F16", "F32"}


def test_a_pipeline_streams_a_gguf_transformer(tmp_path):
    """``single_files={"transformer": "x.gguf"}`` with its GGUFQuantizationConfig equals the
    pipeline diffusers builds around its own GGUF ``from_single_file`` transformer."""
    from diffusers import ZImagePipeline

    from lazystream.pipeline import LazyStreamPipeline, phases_of
    from lazystream.synthetic import build_zimage_pipeline
    from lazystream.synthetic.gguf_file import uniform_format

    path = build_zimage_pipeline(tmp_path / "pipe", max_shard_size="60KB")
    config = ZImageTransformer2DModel.load_config(path, subfolder="transformer")
    size = {k: config[k] for k in zimage_config("tiny")}
    file = build_zimage_gguf(tmp_path / "z-Q8_0.gguf", size, formats=uniform_format("Q8_0"), seed=3)
    transformer = ZImageTransformer2DModel.from_single_file(str(file), config=str(path), subfolder="transformer",
                                                            quantization_config=_config())
    call = dict(prompt="a red cat", guidance_scale=2.0, num_inference_steps=2, height=32, width=32,
                max_sequence_length=48, output_type="pt")
    want = ZImagePipeline.from_pretrained(path, transformer=transformer)(
        generator=torch.Generator().manual_seed(7), **call).images
    pipe = LazyStreamPipeline.from_pretrained(path, {"transformer": 1, "text_encoder": 1},
                                              single_files={"transformer": file}, quantization_config=_config())
    try:
        assert type(pipe.transformer.layers[0].attention.to_q) is GGUFLinear
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(7), **call).images, want)
    finally:
        phases_of(pipe).close()
    with pytest.raises(UnsupportedQuantizationError, match="GGUFQuantizationConfig"):
        LazyStreamPipeline.from_pretrained(path, {"transformer": 1}, single_files={"transformer": file})
    with pytest.raises(ValueError, match="single_files names none"):
        LazyStreamPipeline.from_pretrained(path, {"transformer": 1}, quantization_config=_config())


def test_direct_staged_reads_of_gguf_bytes_equal(gguf_file, reference):
    """The io path reads GGUF byte runs unchanged: O_DIRECT reads through the staging ring."""
    from lazystream.io import IOConfig

    file, folder = gguf_file
    model = LazyStreamModel.from_single_file(file, 2, config=folder, subfolder="transformer", device="cpu",
                                             quantization_config=_config(), io=IOConfig(mode="direct", staged=True))
    try:
        assert torch.equal(_outputs(model), _outputs(reference))
        assert streamer_of(model).stats().last_call.fill_bytes > 0  # it went through the ring
    finally:
        streamer_of(model).close()


def test_auto_fits_more_gguf_blocks_in_the_same_budget(gguf_file, tmp_path):
    """keep_gpu="auto" plans in stored bytes: a budget that holds 2 blocks of the bfloat16
    file holds more of the GGUF file of the same model."""
    from lazystream.synthetic.single_file import build_zimage_single_file

    file, folder = gguf_file
    bf16 = build_zimage_single_file(tmp_path / "z-bf16.safetensors", SIZE, dtype=torch.bfloat16)
    plain = LazyStreamModel.from_single_file(bf16, 0, config=folder, subfolder="transformer", device="cpu",
                                             dtype=torch.bfloat16, load=False)
    budget = streamer_of(plain).plan.estimate_device_bytes(2)
    streamer_of(plain).close()
    model = LazyStreamModel.from_single_file(file, "auto", config=folder, subfolder="transformer", device="cpu",
                                             quantization_config=_config(), max_gpu_memory=budget,
                                             activation_reserve=0, load=False)
    try:
        plan = streamer_of(model).plan
        assert plan.keep_gpu > 2 and plan.device_bytes <= budget
    finally:
        streamer_of(model).close()


def test_a_flux2_gguf_file_equals_diffusers_gguf_model(tmp_path):
    """Another architecture and conversion (FLUX.2's fused qkv split, its final modulation's
    halves swapped): Q8_0 linear weights, outputs and state_dict as diffusers' own."""
    from diffusers import Flux2Transformer2DModel

    from lazystream.synthetic.gguf_file import build_flux2_gguf

    file = build_flux2_gguf(tmp_path / "flux2-Q8_0.gguf", config_folder=tmp_path / "transformer")
    kwargs = dict(config=str(tmp_path), subfolder="transformer", quantization_config=_config())
    reference = Flux2Transformer2DModel.from_single_file(str(file), **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 8, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g).bfloat16(),
                  timestep=torch.tensor([0.25, 0.75]), guidance=torch.tensor([3.5, 3.5]),
                  img_ids=torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4,
                                       torch.zeros(16)], dim=1),
                  txt_ids=torch.stack([torch.zeros(7), torch.zeros(7), torch.zeros(7), torch.arange(7.0)], dim=1))
    with torch.no_grad():
        want = reference(**inputs)[0]
    assert want.abs().sum() > 0 and not want.isnan().any()
    for keep_gpu in (0, 2):
        model = LazyStreamModel.from_single_file(file, keep_gpu, device="cpu", **kwargs)
        try:
            assert sum(isinstance(m, GGUFLinear) for m in model.modules()) == \
                sum(isinstance(m, GGUFLinear) for m in reference.modules()) > 0
            with torch.no_grad():
                assert torch.equal(model(**inputs)[0], want)
            ours, theirs = model.state_dict(), reference.state_dict()
            assert list(ours) == list(theirs) and all(
                type(ours[k]) is type(v) and torch.equal(ours[k], v) for k, v in theirs.items())
        finally:
            streamer_of(model).close()


def test_without_its_kind_the_bound_tensor_is_not_dequantized(gguf_file, monkeypatch):
    """Negative control for the parameter kind: bound as a plain Parameter of its bytes, a
    streamed GGUF weight reaches diffusers' forward undequantized, and the call fails."""
    import lazystream.buffers
    from lazystream.weights import as_parameter

    monkeypatch.setattr(lazystream.buffers, "as_parameter", lambda value, rg, kind: as_parameter(value, rg, None))
    model = _load(gguf_file, 0)
    try:
        with pytest.raises(RuntimeError):
            _outputs(model)
    finally:
        streamer_of(model).close()
