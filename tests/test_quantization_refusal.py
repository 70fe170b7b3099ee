"""A checkpoint or keyword naming a quantization method lazystream does not stream is
refused, naming the method, before anything is loaded: loading the packed weights as
plain ones (scales dropped) would give another model. transformers' fine-grained fp8
checkpoints are streamed (tests/test_fp8_quantized.py); an fp8 quantization_config
keyword, an fp8 diffusers config and attach to an fp8 checkpoint are still refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, FineGrainedFP8Config, Qwen3ForCausalLM

from lazystream import LazyStreamModel
from lazystream.errors import UnsupportedQuantizationError
from lazystream.synthetic import build_qwen3, build_zimage

# quantization_config entries as each method writes them into config.json, and the name
# the refusal must give.
QUANTIZED_CONFIGS = {
    "bitsandbytes 4-bit": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                           "_load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"},
    "bitsandbytes 8-bit": {"quant_method": "bitsandbytes", "load_in_8bit": True, "_load_in_8bit": True},
    "mxfp4": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                           "config_groups": {"group_0": {"targets": ["Linear"],
                                                         "weights": {"num_bits": 4, "type": "int"}}}},
    "fbgemm_fp8": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
    "torchao": {"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}}},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return build_qwen3(tmp_path_factory.mktemp("q") / "q", max_shard_size="60KB")


def _write_fp8_checkpoint(src, dst) -> None:
    """Qwen/Qwen3-8B-FP8's layout: each linear weight of the layers in float8_e4m3fn with a
    float32 ``weight_scale_inv`` per 128x128 block, and the fp8 quantization_config."""
    from safetensors import safe_open

    dst.mkdir()
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    for name in [n for n in state if ".layers." in n and n.endswith("proj.weight")]:
        weight = state[name]
        rows, cols = -(-weight.shape[0] // 128), -(-weight.shape[1] // 128)
        scale = weight.abs().amax().clamp(min=1e-12) / 448.0
        state[name] = (weight / scale).to(torch.float8_e4m3fn)
        state[name.replace(".weight", ".weight_scale_inv")] = torch.full((rows, cols), float(scale))
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if lazystream gets as far as choosing the model class or building it."""
    import lazystream.model

    def loaded(*args, **kwargs):
        raise AssertionError("the refusal must come before the model is built")

    monkeypatch.setattr(lazystream.model, "model_class", loaded)
    monkeypatch.setattr(lazystream.model, "build_skeleton", loaded)


def test_a_block_fp8_checkpoint_is_streamed_not_refused(qwen3, tmp_path, monkeypatch):
    """The config's fp8 quantization_config passes; transformers' quantizer builds its fp8
    modules (where it keeps them: a CUDA GPU of capability >= 8.9, as its environment check
    is made to pass here)."""
    from transformers.integrations.finegrained_fp8 import FP8Linear
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    _write_fp8_checkpoint(qwen3, tmp_path / "fp8")
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    model = LazyStreamModel.from_pretrained(tmp_path / "fp8", 1, device="cpu")
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is FP8Linear and up.weight.dtype == torch.float8_e4m3fn
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight_scale_inv"):
        ours = model.state_dict()[name]
        assert ours.dtype == stored[name].dtype and torch.equal(ours.view(torch.uint8), stored[name].view(torch.uint8))


def test_the_fp8_checkpoint_is_another_model_without_its_scales(qwen3, tmp_path):
    """Why the refusal: transformers' own fp8 loader (dequantizing on this CPU) gives other
    logits than the same bytes loaded with the scales dropped."""
    _write_fp8_checkpoint(qwen3, tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    try:
        ref = Qwen3ForCausalLM.from_pretrained(tmp_path / "fp8",
                                               quantization_config=FineGrainedFP8Config(dequantize=True))
    except Exception as exc:  # this transformers cannot dequantize fp8 on this machine
        pytest.skip(f"transformers' fp8 loader is unavailable here: {exc}")
    del config["quantization_config"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    dropped = Qwen3ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    with torch.no_grad():
        assert not torch.equal(ref(ids).logits.float(), dropped(ids).logits)


@pytest.mark.parametrize("method", list(QUANTIZED_CONFIGS))
def test_each_quantized_checkpoint_is_refused_naming_its_method(qwen3, tmp_path, method, nothing_loads):
    folder = tmp_path / "quantized"
    folder.mkdir()
    for f in qwen3.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    config = json.loads((qwen3 / "config.json").read_text())
    config["quantization_config"] = QUANTIZED_CONFIGS[method]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match=rf"quantization method '{method}' is not streamed .*"
                                                           r"streamed methods: fp8 \(pre-quantized transformers"):
        LazyStreamModel.from_pretrained(folder, 1, device="cpu")


@pytest.mark.parametrize("config, method", [
    (BitsAndBytesConfig(load_in_4bit=True), "bitsandbytes 4-bit"),
    (BitsAndBytesConfig(load_in_8bit=True), "bitsandbytes 8-bit"),
    (FineGrainedFP8Config(), "fp8"),
    ({"quant_method": "torchao", "quant_type": "int4_weight_only"}, "torchao"),
], ids=["bnb4", "bnb8", "fp8", "torchao-dict"])
def test_a_quantization_config_keyword_is_refused_naming_its_method(qwen3, config, method, nothing_loads):
    with pytest.raises(UnsupportedQuantizationError,
                       match=rf"quantization_config=.*quantization method '{method}' is not streamed.*"
                             r"without quantization_config"):
        LazyStreamModel.from_pretrained(qwen3, 1, device="cpu", quantization_config=config)


@pytest.mark.parametrize("method", ["bitsandbytes 8-bit", "fp8"])
def test_a_quantized_diffusers_checkpoint_is_refused(tmp_path, method):
    path = build_zimage(tmp_path / "z")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = QUANTIZED_CONFIGS.get(method) or {"quant_method": "fp8",
                                                                      "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match=rf"'{method}' is not streamed"):
        LazyStreamModel.from_pretrained(path, 1, device="cpu")


def test_a_quantization_config_keyword_of_from_single_file_is_refused(tmp_path):
    # GGUF is streamed (tests/test_gguf.py); any other method is refused before the file is looked for.
    with pytest.raises(UnsupportedQuantizationError, match=r"from_single_file\(quantization_config=...\).*"
                                                           r"'bitsandbytes 4-bit' is not streamed"):
        LazyStreamModel.from_single_file(tmp_path / "any.safetensors", 1,
                                         quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})


def test_attach_refuses_a_quantized_checkpoint(qwen3, tmp_path):
    from accelerate import init_empty_weights

    from lazystream import attach

    _write_fp8_checkpoint(qwen3, tmp_path / "fp8")
    config = Qwen3ForCausalLM.config_class.from_pretrained(qwen3)
    with init_empty_weights():
        model = Qwen3ForCausalLM(config)
    with pytest.raises(UnsupportedQuantizationError, match=r"quantization_config \(attach streams into a model built "
                                                           r"without the library's quantizer.*'fp8' is not streamed"):
        attach(model, tmp_path / "fp8", 1, device="cpu")
