"""transformers fine-grained FP8 checkpoints (``quant_method: fp8``, ``weight_block_size``,
the Qwen/Qwen3-8B-FP8 layout) stream as stored: transformers' own quantizer builds its
FP8Linear modules inside its own from_pretrained, each float8 ``weight`` and float32
``weight_scale_inv`` streams as its stored bytes, and the library's forward dequantizes.

transformers keeps its fp8 modules only on a CUDA GPU of compute capability 8.9 or more
(elsewhere it dequantizes at load, which lazystream refuses), and their forward runs a
Triton kernel. On this CPU machine the tests therefore put the library where it keeps its
fp8 modules (:func:`fp8_modules_kept`: its environment check as on such a GPU), compare
the modules and every stored byte with the library's own load, and run both models'
forwards through one CPU stand-in for the kernel built from the library's own
dequantization; the ``cuda`` test runs the library's real kernel.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from loras import qwen3_adapter
from peft import PeftModel
from safetensors import safe_open
from torch.nn import functional as F
from transformers import FineGrainedFP8Config, Qwen3ForCausalLM
from transformers.integrations import finegrained_fp8
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from lazystream import LazyStreamModel, streamer_of
from lazystream.errors import UnsupportedQuantizationError
from lazystream.synthetic import build_qwen3

# Linear shapes in multiples of 128, so that transformers' quantizer tiles every one of them.
SIZE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 64, "num_hidden_layers": 4, "vocab_size": 256}
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def _keep_fp8_modules(self, *args, **kwargs):
    """The quantizer's environment check as it passes on a CUDA GPU of compute capability
    >= 8.9: nothing to change (it dequantizes only without one)."""


def _dequantize_then_linear(input, weight, weight_scale_inv, block_size=None, bias=None, activation_scale=None,
                            allow_deepgemm=True):
    """A CPU stand-in for the library's fp8 kernel: its own backward's dequantization, then a linear."""
    w = finegrained_fp8._dequantize_fp8_weight(weight, weight_scale_inv, block_size, input.dtype)
    return F.linear(input, w, bias)


@pytest.fixture
def fp8_modules_kept(monkeypatch):
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", _keep_fp8_modules)


@pytest.fixture
def cpu_kernel(monkeypatch):
    monkeypatch.setattr(finegrained_fp8, "fp8_linear", _dequantize_then_linear)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A bfloat16 Qwen3 quantized by transformers' own fp8 quantizer and written with its
    save_pretrained (the config's quantization_config and the tensors as it writes them)."""
    root = tmp_path_factory.mktemp("fp8")
    bf16 = build_qwen3(root / "bf16", SIZE, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FineGrainedFP8HfQuantizer, "validate_environment", _keep_fp8_modules)
        model = Qwen3ForCausalLM.from_pretrained(bf16, quantization_config=FineGrainedFP8Config(
            weight_block_size=[128, 128]))
        model.save_pretrained(root / "fp8", max_shard_size="80KB")
    return root / "fp8"


def _library(path, device="cpu"):
    return Qwen3ForCausalLM.from_pretrained(path, device_map=device if device != "cpu" else None)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu().contiguous().view(torch.uint8),
                                                                     b.cpu().contiguous().view(torch.uint8))


def _stored(path) -> dict[str, tuple[torch.dtype, int]]:
    out = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = (t.dtype, t.nbytes)
    return out


def test_the_checkpoint_is_the_qwen3_fp8_layout(fp8_checkpoint):
    stored = _stored(fp8_checkpoint)
    assert stored["model.layers.0.mlp.up_proj.weight"][0] == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.up_proj.weight_scale_inv"] == (torch.float32, 2 * 1 * 4)
    config = json.loads((fp8_checkpoint / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]


@pytest.mark.parametrize("keep_gpu", [0, 2, 4])
def test_modules_and_stored_bytes_equal_the_library_load(fp8_checkpoint, fp8_modules_kept, keep_gpu):
    ref = _library(fp8_checkpoint)
    model = LazyStreamModel.from_pretrained(fp8_checkpoint, keep_gpu, device="cpu")
    classes = {n: type(m) for n, m in model.named_modules()}
    assert classes == {n: type(m) for n, m in ref.named_modules()}
    assert classes["model.layers.3.mlp.up_proj"] is finegrained_fp8.FP8Linear
    fp8 = [n for n, c in classes.items() if c is finegrained_fp8.FP8Linear]
    assert [(model.get_submodule(n).block_size, model.get_submodule(n).activation_scheme) for n in fp8] == \
        [(ref.get_submodule(n).block_size, ref.get_submodule(n).activation_scheme) for n in fp8]
    assert model.config.quantization_config.to_dict() == ref.config.quantization_config.to_dict()
    assert type(model.hf_quantizer) is type(ref.hf_quantizer) and model.is_quantized
    ours, theirs = model.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    different = [k for k in theirs if not _same_bytes(ours[k], theirs[k])]
    assert not different
    # Each streamed block's bytes are its stored float8 weights and float32 scales, as stored.
    streamer = streamer_of(model)
    stored = _stored(fp8_checkpoint)
    for block in streamer.plan.blocks:
        names = [t.name for t in block.tensors]
        assert block.nbytes == sum(stored[n][1] for n in names) and block.cast_bytes == 0
        assert any(stored[n][0] == torch.float8_e4m3fn for n in names)
        assert all(t.source.dtype == stored[t.name][0] for t in block.tensors)


def test_a_changed_scale_changes_the_bytes_compared(fp8_checkpoint, fp8_modules_kept, tmp_path):
    """Negative control for the test above: one block's scale, changed in the checkpoint, is seen."""
    changed = tmp_path / "changed"
    shutil.copytree(fp8_checkpoint, changed)
    name = "model.layers.2.mlp.down_proj.weight_scale_inv"
    shard = next(p for p in changed.glob("*.safetensors") if name in safe_open(p, "pt").keys())
    data = bytearray(shard.read_bytes())
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    start = 8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0]
    data[start + 3] ^= 0x01  # the top byte of the first float32 scale
    shard.write_bytes(bytes(data))
    model = LazyStreamModel.from_pretrained(changed, 0, device="cpu")
    assert not _same_bytes(model.state_dict()[name], _library(fp8_checkpoint).state_dict()[name])


@pytest.mark.parametrize("keep_gpu", [0, 2, 4])
def test_forward_and_generate_equal_the_library(fp8_checkpoint, fp8_modules_kept, cpu_kernel, keep_gpu):
    ref = _library(fp8_checkpoint)
    model = LazyStreamModel.from_pretrained(fp8_checkpoint, keep_gpu, device="cpu")
    with torch.no_grad():
        expected = ref(IDS).logits
        assert torch.equal(model(IDS).logits, expected)
        assert torch.equal(model.generate(IDS, max_new_tokens=5, do_sample=False),
                           ref.generate(IDS, max_new_tokens=5, do_sample=False))
    if keep_gpu < 4:
        assert streamer_of(model).stats().last_call.bytes_streamed > 0
    # Negative control: the scales matter to this forward.
    ref.model.layers[1].mlp.down_proj.weight_scale_inv.data.mul_(2)
    with torch.no_grad():
        assert not torch.equal(ref(IDS).logits, expected)


def test_bytes_streamed_are_the_stored_fp8_bytes(fp8_checkpoint, fp8_modules_kept, cpu_kernel):
    stored = _stored(fp8_checkpoint)
    model = LazyStreamModel.from_pretrained(fp8_checkpoint, 0, device="cpu")
    with torch.no_grad():
        model(IDS)
    per_block = [sum(v[1] for k, v in stored.items() if k.startswith(f"model.layers.{i}.")) for i in range(4)]
    assert streamer_of(model).stats().last_call.bytes_streamed == sum(per_block)
    # Half the bytes of the linears in bfloat16, plus their scales.
    assert stored["model.layers.0.mlp.up_proj.weight"][1] == 256 * 128


def test_the_library_dequantizing_at_load_is_refused(fp8_checkpoint, monkeypatch):
    """Without a CUDA GPU of compute capability >= 8.9 (or with dequantize=True)
    transformers computes bfloat16 weights at load: refused, naming why."""
    def dequantize(self, *args, **kwargs):
        self.quantization_config.dequantize = True  # what the library does on such a machine

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", dequantize)
    with pytest.raises(UnsupportedQuantizationError, match=r"transformers dequantizes this 'fp8' checkpoint at load "
                                                           r"here .*compute capability 8.9"):
        LazyStreamModel.from_pretrained(fp8_checkpoint, 1, device="cpu")


def test_half_float_and_dequantize_are_refused_as_the_library_refuses_them(fp8_checkpoint, fp8_modules_kept):
    ref = _library(fp8_checkpoint)
    model = LazyStreamModel.from_pretrained(fp8_checkpoint, 1, device="cpu")
    for move in ("half", "float"):
        with pytest.raises(ValueError) as theirs:
            getattr(ref, move)()
        with pytest.raises(ValueError) as ours:
            getattr(model, move)()
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(NotImplementedError) as theirs:  # transformers has no fp8 dequantize()
        ref.dequantize()
    with pytest.raises(NotImplementedError) as ours:
        model.dequantize()
    assert str(ours.value) == str(theirs.value)
    assert model.model.layers[3].mlp.up_proj.weight.dtype == torch.float8_e4m3fn


def test_to_bfloat16_equals_the_library(fp8_checkpoint, fp8_modules_kept):
    """transformers lets ``.to(dtype)`` cast an fp8 model (its float8 weights become
    bfloat16 values, and FP8Linear then runs a plain linear, scales unused): the streamed
    model does the same, here with the library's real forward on this CPU."""
    ref = _library(fp8_checkpoint).to(torch.bfloat16)
    model = LazyStreamModel.from_pretrained(fp8_checkpoint, 1, device="cpu").to(torch.bfloat16)
    assert model.model.layers[3].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def test_save_pretrained_writes_what_the_library_writes(fp8_checkpoint, fp8_modules_kept, tmp_path):
    _library(fp8_checkpoint).save_pretrained(tmp_path / "theirs")
    LazyStreamModel.from_pretrained(fp8_checkpoint, 1, device="cpu").save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"] == \
        json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]

    def tensors(folder):
        out = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    assert all(_same_bytes(ours[k], theirs[k]) for k in theirs)
    assert theirs["model.layers.3.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn


@pytest.mark.cuda
@pytest.mark.parametrize("keep_gpu", [0, 2, 4])
def test_forward_on_cuda_equals_the_library(fp8_checkpoint, keep_gpu):
    """The library's own fp8 kernel on a CUDA GPU of compute capability >= 8.9."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU of compute capability 8.9 or more (else transformers dequantizes at load)")
    ref = _library(fp8_checkpoint, "cuda")
    ids = IDS.cuda()
    try:
        with torch.no_grad():
            expected = ref(ids).logits
    except ImportError as exc:
        pytest.skip(f"transformers' fp8 kernel is unavailable here: {exc}")
    model = LazyStreamModel.from_pretrained(fp8_checkpoint, keep_gpu, device="cuda")
    assert type(model.model.layers[0].mlp.up_proj) is finegrained_fp8.FP8Linear
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                           ref.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("keep_gpu", [0, 2, 4])
def test_a_lora_adapter_on_the_fp8_model_equals_the_library(fp8_checkpoint, fp8_modules_kept, cpu_kernel, keep_gpu,
                                                            tmp_path):
    """peft wraps transformers' FP8Linear (an nn.Linear) in its LoRA layer, over the
    library's fp8 forward; the streamed model does the same."""
    adapter = qwen3_adapter(tmp_path / "adapter", fp8_checkpoint.parent / "bf16", seed=1)
    ref = PeftModel.from_pretrained(_library(fp8_checkpoint), adapter).eval()
    model = PeftModel.from_pretrained(LazyStreamModel.from_pretrained(fp8_checkpoint, keep_gpu, device="cpu"),
                                      adapter).eval()
    assert type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer) is finegrained_fp8.FP8Linear
    with torch.no_grad():
        got, want = model(input_ids=IDS).logits, ref(input_ids=IDS).logits
        assert torch.equal(got, want)
        with ref.disable_adapter():
            assert not torch.equal(ref(input_ids=IDS).logits, want)  # the adapter changes the output


def test_lazystream_plan_counts_the_stored_bytes_as_the_load_does(fp8_checkpoint, fp8_modules_kept, capsys):
    from lazystream.cli import main

    assert main(["plan", str(fp8_checkpoint), "--keep-gpu", "1", "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = streamer_of(LazyStreamModel.from_pretrained(fp8_checkpoint, 1, device="cpu")).plan
    stored = _stored(fp8_checkpoint)
    assert [b["bytes"] for b in printed["blocks"]] == [b.nbytes for b in plan.blocks] == \
        [sum(v[1] for k, v in stored.items() if k.startswith(f"model.layers.{i}.")) for i in range(4)]
    assert printed["scratch_bytes"] == 0 and printed["device_bytes"] == plan.device_bytes


def test_lazystream_plan_refuses_where_the_library_dequantizes(fp8_checkpoint, monkeypatch, capsys):
    from lazystream.cli import main

    def dequantize(self, *args, **kwargs):
        self.quantization_config.dequantize = True

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", dequantize)
    assert main(["plan", str(fp8_checkpoint), "--keep-gpu", "1", "--device", "cpu"]) != 0
    assert "transformers dequantizes this 'fp8' checkpoint at load here" in capsys.readouterr().err


def test_keep_gpu_auto_fits_more_fp8_blocks_than_bfloat16_ones(fp8_checkpoint, fp8_modules_kept, cpu_kernel):
    kept = []
    for path in (fp8_checkpoint, fp8_checkpoint.parent / "bf16"):
        model = LazyStreamModel.from_pretrained(path, "auto", device="cpu", max_gpu_memory="900KiB",
                                                activation_reserve="10KiB")
        with torch.no_grad():
            model(IDS)  # the calibration call
        kept.append(sum(b.resident for b in streamer_of(model).plan.blocks))
    assert kept == [4, 1]


# -- MoE: transformers stacks each expert's fp8 weights and scales into FP8Experts ---------


@pytest.fixture(scope="module")
def fp8_moe_checkpoint(tmp_path_factory):
    """A bfloat16 Qwen3-MoE quantized by transformers' fp8 quantizer and saved by it (as it
    writes them: each expert's weight one by one, the experts' scales stacked)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("fp8moe")
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**SIZE, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                       decoder_sparse_step=1)).to(torch.bfloat16).save_pretrained(root / "bf16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FineGrainedFP8HfQuantizer, "validate_environment", _keep_fp8_modules)
        Qwen3MoeForCausalLM.from_pretrained(root / "bf16", quantization_config=FineGrainedFP8Config(
            weight_block_size=[128, 128])).save_pretrained(root / "fp8", max_shard_size="100KB")
    return root / "fp8"


@pytest.mark.parametrize("keep_gpu", [0, 2])
def test_moe_experts_stream_their_stored_fp8_bytes(fp8_moe_checkpoint, fp8_modules_kept, keep_gpu):
    """FP8Experts' forward is a Triton kernel even in eager mode: modules and bytes here,
    the forward in the cuda test."""
    from transformers import Qwen3MoeForCausalLM

    stored = _stored(fp8_moe_checkpoint)
    assert stored["model.layers.0.mlp.experts.1.up_proj.weight"][0] == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.experts.gate_up_proj_scale_inv"][0] == torch.float32
    ref = Qwen3MoeForCausalLM.from_pretrained(fp8_moe_checkpoint)
    model = LazyStreamModel.from_pretrained(fp8_moe_checkpoint, keep_gpu, device="cpu")
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in ref.named_modules()}
    assert type(model.model.layers[3].mlp.experts) is finegrained_fp8.FP8Experts
    ours, theirs = model.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs) and all(_same_bytes(ours[k], theirs[k]) for k in theirs)
    assert ours["model.layers.3.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn


@pytest.mark.cuda
def test_moe_forward_on_cuda_equals_the_library(fp8_moe_checkpoint):
    from transformers import Qwen3MoeForCausalLM

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU of compute capability 8.9 or more (else transformers dequantizes at load)")
    ref = Qwen3MoeForCausalLM.from_pretrained(fp8_moe_checkpoint, device_map="cuda")
    ids = IDS.cuda()
    try:
        with torch.no_grad():
            expected = ref(ids).logits
    except (ImportError, ValueError) as exc:
        pytest.skip(f"transformers' fp8 kernel is unavailable here: {exc}")
    for keep_gpu in (0, 2, 4):
        model = LazyStreamModel.from_pretrained(fp8_moe_checkpoint, keep_gpu, device="cuda")
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
        streamer_of(model).close()


def test_a_dtype_keyword_casts_what_the_library_casts(fp8_checkpoint, fp8_modules_kept, cpu_kernel):
    """dtype=float32: the norms and embeddings become float32, the fp8 weights stay fp8."""
    ref = Qwen3ForCausalLM.from_pretrained(fp8_checkpoint, dtype=torch.float32)
    model = LazyStreamModel.from_pretrained(fp8_checkpoint, 1, device="cpu", dtype=torch.float32)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert {t.dtype for t in theirs.values()} == {torch.float32, torch.float8_e4m3fn}
    assert list(ours) == list(theirs) and all(_same_bytes(ours[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def test_moe_checkpoint_with_per_expert_scales_streams_as_the_library_loads_it(fp8_moe_checkpoint, fp8_modules_kept,
                                                                                tmp_path):
    """The Hub's fp8 MoE layout (Qwen3-30B-A3B-FP8): each expert's ``weight_scale_inv``
    stored beside its weight; the library stacks them at load, lazystream as byte runs."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeForCausalLM

    state = {}
    for shard in fp8_moe_checkpoint.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    for name in [n for n in state if n.endswith("_proj_scale_inv")]:
        prefix, stacked = name.rsplit(".", 1)[0], state.pop(name)
        for e, scales in enumerate(stacked):
            projections = ("gate_proj", "up_proj") if name.endswith("gate_up_proj_scale_inv") else ("down_proj",)
            for proj, part in zip(projections, scales.chunk(len(projections))):
                state[f"{prefix}.{e}.{proj}.weight_scale_inv"] = part.contiguous()
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(state, hub / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(fp8_moe_checkpoint / "config.json", hub / "config.json")
    assert "model.layers.0.mlp.experts.3.up_proj.weight_scale_inv" in state
    ref = Qwen3MoeForCausalLM.from_pretrained(hub)
    ours, theirs = LazyStreamModel.from_pretrained(hub, 1, device="cpu").state_dict(), ref.state_dict()
    assert list(ours) == list(theirs) and all(_same_bytes(ours[k], theirs[k]) for k in theirs)
    saved = Qwen3MoeForCausalLM.from_pretrained(fp8_moe_checkpoint).state_dict()
    assert all(_same_bytes(saved[k], theirs[k]) for k in theirs)  # the same model, in either layout
