"""LoRA adapters on streamed models, through every entry point users have: the same outputs
as the library's model with the same adapters; fusing, which would need weights that a
reload from the checkpoint would undo, is refused before it changes anything."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from loras import qwen3_adapter, zimage_lora
from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

from lazystream import LazyStreamModel, streamer_of
from lazystream.errors import ReadOnlyWeightError
from lazystream.pipeline import LazyStreamPipeline, phases_of
from lazystream.plan import GRANULE
from lazystream.synthetic import build_qwen3, build_zimage, build_zimage_pipeline, zimage_config, zimage_inputs

ZIMAGE_BLOCKS, QWEN_LAYERS = 8, 4
LORA_FILE = "pytorch_lora_weights.safetensors"
KEEP = [0, 1, 100]


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage-lora")
    path = build_zimage(root / "model", max_shard_size="60KB")
    loras = {name: zimage_lora(root / name, path, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    return path, loras, zimage_inputs(zimage_config())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-lora")
    path = build_qwen3(root / "model", max_shard_size="60KB")
    adapters = {name: qwen3_adapter(root / name, path, seed=seed) for name, seed in (("x", 3), ("y", 4))}
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    return path, adapters, ids


def sample(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).sample[0]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def lora_bytes(model) -> int:
    return sum(-(-p.nbytes // GRANULE) * GRANULE for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("keep_gpu", KEEP)
def test_diffusers_model_adapters_equal_the_library(zimage, keep_gpu):
    path, loras, inputs = zimage
    ref = ZImageTransformer2DModel.from_pretrained(path).eval()
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    sample(model, inputs)  # adapters arrive after the model has run: noticed at the next call

    steps = [
        lambda m: m.load_lora_adapter(loras["a"], weight_name=LORA_FILE, prefix="transformer", adapter_name="a"),
        lambda m: m.load_lora_adapter(loras["b"], weight_name=LORA_FILE, prefix="transformer", adapter_name="b"),
        lambda m: m.set_adapters(["a", "b"], weights=[0.7, 0.4]),
        lambda m: m.set_adapters("b"),
        lambda m: m.disable_lora(),
        lambda m: m.enable_lora(),
        lambda m: m.delete_adapters("b"),
    ]
    outputs = set()
    for step in steps:
        step(ref)
        step(model)
        want = sample(ref, inputs)
        assert torch.equal(sample(model, inputs), want)
        outputs.add(want.sum().item())
        assert streamer_of(model).plan.adapter_bytes == lora_bytes(ref)
    assert len(outputs) >= 4  # the steps changed the outputs: the comparison could fail
    streamer = streamer_of(model)
    streamer.unload()  # adapters leave the device with everything else and come back intact
    assert streamer.stats().device_bytes == 0
    assert torch.equal(sample(model, inputs), sample(ref, inputs))
    assert streamer.stats().kept_bytes == streamer.plan.kept_bytes >= lora_bytes(ref) > 0
    streamer.close()


@pytest.mark.parametrize("keep_gpu", KEEP)
@pytest.mark.parametrize("safe", [False, True])
def test_fuse_lora_is_refused_and_changes_nothing(zimage, keep_gpu, safe):
    path, loras, inputs = zimage
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    model.load_lora_adapter(loras["a"], weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    want = sample(model, inputs)
    with pytest.raises(ReadOnlyWeightError, match="in-place change could not last"):
        model.fuse_lora(safe_fusing=safe)
    assert torch.equal(sample(model, inputs), want)
    streamer_of(model).close()


def test_adapters_take_the_dtype_the_library_gives_them(zimage):
    """A float32 checkpoint loaded in bfloat16: peft reads the base weight's dtype between calls."""
    path, loras, inputs = zimage
    ref = ZImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    model = LazyStreamModel.from_pretrained(path, 1, dtype=torch.bfloat16)
    for m in (ref, model):
        m.load_lora_adapter(loras["a"], weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    got = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert got == {n: p.dtype for n, p in ref.named_parameters() if "lora_" in n}
    x, t, caption = inputs
    bf16 = ([v.bfloat16() for v in x], t.bfloat16(), [v.bfloat16() for v in caption])
    assert torch.equal(sample(model, bf16), sample(ref, bf16))
    streamer_of(model).close()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-lora")
    path = build_zimage_pipeline(root / "pipe", max_shard_size="60KB")
    return path, zimage_lora(root / "lora", path / "transformer", seed=5)


def images(pipe) -> torch.Tensor:
    return pipe(["a red cat", "a lighthouse"], generator=torch.Generator().manual_seed(7), guidance_scale=0.0,
                num_inference_steps=2, height=32, width=32, max_sequence_length=48, output_type="pt").images


@pytest.mark.parametrize("keep_gpu", [0, 3, ZIMAGE_BLOCKS])
def test_pipeline_lora_equals_the_library_pipeline(pipeline, keep_gpu):
    path, lora = pipeline
    ref = ZImagePipeline.from_pretrained(path)
    pipe = LazyStreamPipeline.from_pretrained(path, {"transformer": keep_gpu, "text_encoder": 1})
    base = images(pipe)
    for p in (ref, pipe):
        p.load_lora_weights(lora, weight_name=LORA_FILE, adapter_name="style")
    want = images(ref)
    assert not torch.equal(want, base)
    assert torch.equal(images(pipe), want)  # across phase switches: the adapters move with their component
    with pytest.raises(ReadOnlyWeightError):
        pipe.fuse_lora()
    assert torch.equal(images(pipe), want)
    for p in (ref, pipe):
        p.set_adapters("style", 0.5)
    assert torch.equal(images(pipe), images(ref))
    for p in (ref, pipe):
        p.unload_lora_weights()
    assert torch.equal(images(pipe), base)
    assert streamer_of(pipe.transformer).plan.adapter_bytes == 0
    phases_of(pipe).close()


@pytest.mark.parametrize("keep_gpu", KEEP)
def test_peft_model_from_pretrained_equals_the_library(qwen3, keep_gpu):
    path, adapters, ids = qwen3
    ref = PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(path), adapters["x"]).eval()
    model = PeftModel.from_pretrained(LazyStreamModel.from_pretrained(path, keep_gpu), adapters["x"]).eval()
    assert torch.equal(logits(model, ids), logits(ref, ids))
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False),
                       ref.generate(input_ids=ids, max_new_tokens=5, do_sample=False))
    for m in (ref, model):
        m.load_adapter(adapters["y"], adapter_name="y")
        m.set_adapter("y")
    assert torch.equal(logits(model, ids), logits(ref, ids))
    with pytest.raises(ReadOnlyWeightError):
        model.merge_and_unload()
    assert torch.equal(logits(model, ids), logits(ref, ids))
    streamer_of(model.get_base_model()).close()


@pytest.mark.parametrize("keep_gpu", KEEP)
def test_inject_adapter_in_model_equals_the_library(qwen3, keep_gpu):
    path, adapters, ids = qwen3
    config = LoraConfig.from_pretrained(adapters["x"])
    state = load_file(adapters["x"] / "adapter_model.safetensors")
    ref = Qwen3ForCausalLM.from_pretrained(path).eval()
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    for m in (ref, model):
        inject_adapter_in_model(config, m, adapter_name="x")
        set_peft_model_state_dict(m, state, adapter_name="x")
    assert torch.equal(logits(model, ids), logits(ref, ids))
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", KEEP)
def test_transformers_load_adapter_equals_the_library(qwen3, keep_gpu):
    path, adapters, ids = qwen3
    ref = Qwen3ForCausalLM.from_pretrained(path).eval()
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    for m in (ref, model):
        m.load_adapter(adapters["x"], adapter_name="x")
    want = logits(ref, ids)
    assert torch.equal(logits(model, ids), want)
    for m in (ref, model):
        m.load_adapter(adapters["y"], adapter_name="y")  # a second adapter
    assert torch.equal(logits(model, ids), logits(ref, ids))
    try:
        ref.set_adapter("y")
    except ValueError as exc:  # transformers 5.24 wants peft >= 0.22 here, which PyPI does not have yet
        if "version of PEFT" not in str(exc):
            raise
        streamer_of(model).close()
        pytest.skip(f"the library's own set_adapter refuses this peft: {exc}")
    model.set_adapter("y")
    assert torch.equal(logits(model, ids), logits(ref, ids))
    for m in (ref, model):
        m.delete_adapter("y")
        m.set_adapter("x")
    assert torch.equal(logits(model, ids), want)
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", [1, "auto"])
def test_adapters_survive_casts_and_replans(zimage, keep_gpu):
    """Nothing of an adapter is lost when the model is re-planned: by .to(), or by the
    calibration of keep_gpu='auto' on the first call."""
    path, loras, inputs = zimage
    ref = ZImageTransformer2DModel.from_pretrained(path).eval()
    model = LazyStreamModel.from_pretrained(path, keep_gpu, max_gpu_memory=2**30, load=False)
    for m in (ref, model):
        m.load_lora_adapter(loras["a"], weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    assert torch.equal(sample(model, inputs), sample(ref, inputs))  # the first call loads and re-plans
    for m in (ref, model):
        m.to(torch.bfloat16)
    x, t, caption = inputs
    bf16 = ([v.bfloat16() for v in x], t.bfloat16(), [v.bfloat16() for v in caption])
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    assert torch.equal(sample(model, bf16), sample(ref, bf16))
    streamer_of(model).close()


def test_plan_with_lora_counts_the_adapter_bytes_a_load_takes(zimage, capsys):
    """``lazystream plan --lora`` predicts, from the file's header, the device bytes the
    adapters take once loaded (and holds them back from --vram with --keep-gpu auto)."""
    import json

    from lazystream.cli import main

    def plan_json(*args: str) -> dict:
        capsys.readouterr()
        assert main(["plan", str(path), "--device", "cpu", "--lora", lora_file, "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    path, loras, _ = zimage
    lora_file = str(loras["a"] / LORA_FILE)
    predicted = plan_json("--keep-gpu", "1")
    model = LazyStreamModel.from_pretrained(path, 1)
    model.load_lora_adapter(loras["a"], weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    sample(model, zimage[2])
    plan = streamer_of(model).plan
    assert predicted["adapter_bytes"] == plan.adapter_bytes > 0
    assert predicted["device_bytes"] == plan.device_bytes
    streamer_of(model).close()
    vram = plan.device_bytes + 4096
    auto = plan_json("--keep-gpu", "auto", "--vram", str(vram), "--activation-reserve", "0")
    assert auto["device_bytes"] <= vram and auto["adapter_bytes"] == plan.adapter_bytes
