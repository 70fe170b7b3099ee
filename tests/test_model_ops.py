"""What users do with a loaded model besides calling it: state_dict, save_pretrained, moves
and casts, other offloaders' hooks, inference_mode, copies, gradients. Each behaves as on the
library's own model, or raises a LazyStreamError before anything changes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

from lazystream import LazyStreamModel, streamer_of
from lazystream.errors import OtherOffloaderError, ReadOnlyWeightError, UnsupportedOperationError
from lazystream.synthetic import build_qwen3, build_zimage, zimage_config, zimage_inputs
from lazystream.weights import CheckpointWeight

KEEP = [0, 1, 100]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = build_qwen3(tmp_path_factory.mktemp("qwen3-ops"), max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    return path, ids


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    path = build_zimage(tmp_path_factory.mktemp("zimage-ops"), max_shard_size="60KB")
    return path, zimage_inputs(zimage_config())


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# -- state_dict and saving ------------------------------------------------------------------


@pytest.mark.parametrize("keep_gpu", KEEP)
@pytest.mark.parametrize("when", ["before a call", "after a call", "unloaded"])
def test_state_dict_equals_the_library(qwen3, keep_gpu, when):
    path, ids = qwen3
    ref = Qwen3ForCausalLM.from_pretrained(path)
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    if when != "before a call":
        logits(model, ids)
    if when == "unloaded":
        streamer_of(model).unload()
    state = model.state_dict()
    assert_same_tensors(state, ref.state_dict())
    assert not any(isinstance(t, CheckpointWeight) for t in state.values())
    streamer_of(model).close()


def test_state_dict_in_another_dtype_equals_the_library(qwen3):
    path, _ = qwen3
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = LazyStreamModel.from_pretrained(path, 1, dtype=torch.bfloat16)
    assert_same_tensors(model.state_dict(), ref.state_dict())
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", KEEP)
def test_torch_save_of_the_state_dict_reloads_equal(qwen3, keep_gpu, tmp_path):
    path, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    assert_same_tensors(torch.load(tmp_path / "state.pt"), Qwen3ForCausalLM.from_pretrained(path).state_dict())
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", KEEP)
def test_save_pretrained_writes_what_the_library_writes(qwen3, keep_gpu, tmp_path):
    path, ids = qwen3
    ref = Qwen3ForCausalLM.from_pretrained(path)
    ref.save_pretrained(tmp_path / "library")
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    logits(model, ids)
    model.save_pretrained(tmp_path / "streamed")
    written = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "library").iterdir())
    for name in written:
        if name.endswith(".safetensors"):
            assert_same_tensors(load_file(tmp_path / "streamed" / name), load_file(tmp_path / "library" / name))
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "streamed")
    assert torch.equal(logits(reloaded, ids), logits(ref, ids))
    streamer_of(model).close()


def test_diffusers_save_pretrained_reloads_equal(zimage, tmp_path):
    path, inputs = zimage
    model = LazyStreamModel.from_pretrained(path, 2)
    model.save_pretrained(tmp_path / "saved")
    reloaded = ZImageTransformer2DModel.from_pretrained(tmp_path / "saved")
    assert_same_tensors(reloaded.state_dict(), ZImageTransformer2DModel.from_pretrained(path).state_dict())
    streamer_of(model).close()


@pytest.mark.parametrize("keep_gpu", KEEP)
def test_load_state_dict_into_the_model_is_refused(qwen3, keep_gpu):
    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    want = logits(model, ids)
    zeros = {k: torch.zeros_like(v) for k, v in Qwen3ForCausalLM.from_pretrained(path).state_dict().items()}
    with pytest.raises(ReadOnlyWeightError):
        model.load_state_dict(zeros)
    assert torch.equal(logits(model, ids), want)
    with pytest.raises(ReadOnlyWeightError), torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.raises(ReadOnlyWeightError):
        model.lm_head.weight.data = torch.zeros_like(model.lm_head.weight)
    assert torch.equal(logits(model, ids), want)
    streamer_of(model).close()


# -- moves and casts ------------------------------------------------------------------------


@pytest.mark.parametrize("keep_gpu", KEEP)
@pytest.mark.parametrize("move", ["to('cpu')", "cpu()", "float()", "to(float32)", "to(cpu, float32)"])
def test_a_move_that_changes_nothing_reloads_nothing(qwen3, keep_gpu, move):
    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu)
    want = logits(model, ids)
    streamer = streamer_of(model)
    read, plan = streamer.loader.bytes_read, streamer.plan
    out = eval(f"model.{move}".replace("float32", "torch.float32").replace("(cpu", "('cpu'"))
    assert out is model and streamer.plan is plan and streamer.loader.bytes_read == read
    assert torch.equal(logits(model, ids), want)
    streamer.close()


CASTS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "half()": lambda m: m.half(),
    "bfloat16().float()": lambda m: m.bfloat16().float(),
    "half().to(bfloat16)": lambda m: m.half().to(torch.bfloat16),
}


@pytest.mark.parametrize("keep_gpu", KEEP)
@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "unloaded"])
def test_casts_equal_the_library(qwen3, keep_gpu, cast, loaded):
    path, ids = qwen3
    ref = CASTS[cast](Qwen3ForCausalLM.from_pretrained(path))
    model = LazyStreamModel.from_pretrained(path, keep_gpu, load=loaded)
    weights = dict(model.named_parameters())
    assert CASTS[cast](model) is model
    assert dict(model.named_parameters()) == weights  # the same objects, as after a library .to()
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in ref.named_buffers()}
    assert streamer_of(model).stats().device_bytes == (streamer_of(model).plan.device_bytes if loaded else 0)
    assert torch.equal(logits(model, ids), logits(ref, ids))
    assert_same_tensors(model.state_dict(), ref.state_dict())
    streamer_of(model).close()


def test_casts_of_a_model_loaded_in_another_dtype_round_as_the_library(zimage):
    """bfloat16 at load, then float(): each value rounded to bfloat16 once, then widened."""
    path, inputs = zimage
    ref = ZImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16).float().eval()
    model = LazyStreamModel.from_pretrained(path, 3, dtype=torch.bfloat16).float()
    assert_same_tensors(model.state_dict(), ref.state_dict())
    with torch.no_grad():
        assert torch.equal(model(*inputs).sample[0], ref(*inputs).sample[0])
    streamer_of(model).close()


def test_a_move_to_a_missing_device_changes_nothing(qwen3):
    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    want = logits(model, ids)
    plan = streamer_of(model).plan
    with pytest.raises((AssertionError, RuntimeError)):  # what torch raises for the library's model too
        model.to("meta" if torch.cuda.is_available() else "cuda")
    assert streamer_of(model).plan is plan and torch.equal(logits(model, ids), want)
    streamer_of(model).close()


def test_moving_part_of_the_model_is_refused(qwen3):
    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    want = logits(model, ids)
    with pytest.raises(ReadOnlyWeightError, match="whole model"):
        model.model.layers[1].to(torch.bfloat16)
    assert torch.equal(logits(model, ids), want)
    streamer_of(model).close()


# -- other offloaders -----------------------------------------------------------------------


def test_layerwise_casting_after_load_is_refused_and_changes_nothing(zimage):
    path, inputs = zimage
    model = LazyStreamModel.from_pretrained(path, 1)
    with torch.no_grad():
        want = model(*inputs).sample[0]
    with pytest.raises(ReadOnlyWeightError, match="whole model"):  # it casts each layer's weights first
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(*inputs).sample[0], want)
    streamer_of(model).close()


def test_group_offloading_after_load_is_refused_at_the_next_call(zimage):
    from diffusers.hooks import apply_group_offloading

    path, inputs = zimage
    model = LazyStreamModel.from_pretrained(path, 1)
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(OtherOffloaderError, match="ZImageTransformer2DModel.*diffusers"), torch.no_grad():
        model(*inputs)
    streamer_of(model).close()


def test_accelerate_cpu_offload_after_load_is_refused(qwen3):
    from accelerate import cpu_offload

    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    with pytest.raises(UnsupportedOperationError, match="set_module_tensor_to_device"):
        cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(OtherOffloaderError, match="accelerate"):
        logits(model, ids)
    streamer_of(model).close()


def test_accelerate_hook_added_after_load_is_refused_at_the_next_call(qwen3):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    want = logits(model, ids)
    module = model.model.layers[2].mlp
    add_hook_to_module(module, ModelHook())
    with pytest.raises(OtherOffloaderError, match="model.layers.2.mlp"):
        logits(model, ids)
    remove_hook_from_module(module)
    assert torch.equal(logits(model, ids), want)
    streamer_of(model).close()


# -- inference_mode -------------------------------------------------------------------------


def test_loading_reloading_and_replanning_inside_inference_mode(qwen3):
    path, ids = qwen3
    want = logits(Qwen3ForCausalLM.from_pretrained(path), ids)
    with torch.inference_mode():
        model = LazyStreamModel.from_pretrained(path, "auto", placement="cost", max_gpu_memory=2**30, load=False)
        assert torch.equal(model(ids).logits, want)  # first call: load, calibrate, re-plan
    assert torch.equal(logits(model, ids), want)
    streamer = streamer_of(model)
    streamer.unload()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, want)
        model.to(torch.bfloat16)
        model.float()
    assert torch.equal(logits(model, ids), logits(Qwen3ForCausalLM.from_pretrained(path).bfloat16().float(), ids))
    streamer.close()


# -- copies and gradients -------------------------------------------------------------------


def test_copying_or_pickling_the_model_is_refused(qwen3):
    path, _ = qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    with pytest.raises(UnsupportedOperationError, match="save_pretrained"):
        copy.deepcopy(model)
    with pytest.raises(UnsupportedOperationError, match="save_pretrained"):
        pickle.dumps(model)
    streamer_of(model).close()


def test_gradients_reach_inputs_not_checkpoint_weights(qwen3):
    path, ids = qwen3
    ref = Qwen3ForCausalLM.from_pretrained(path)
    model = LazyStreamModel.from_pretrained(path, 100)
    embeds = ref.get_input_embeddings()(ids).detach()
    with pytest.raises(UnsupportedOperationError, match="requires_grad_"):
        model(inputs_embeds=embeds.clone().requires_grad_()).logits.sum().backward()
    grads = []
    for m in (ref, model):
        m.requires_grad_(False)
        x = embeds.clone().requires_grad_()
        m(inputs_embeds=x).logits.sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    streamer_of(model).close()


def test_cuda_graph_capture_is_refused(qwen3, monkeypatch):
    path, ids = qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    streamer = streamer_of(model)
    monkeypatch.setattr(streamer.ops, "is_cuda", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(UnsupportedOperationError, match="CUDA graph"):
        logits(model, ids)
    monkeypatch.undo()
    assert logits(model, ids) is not None
    streamer.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_weights_are_saved_once_as_the_library_saves_them(tmp_path, dtype):
    """Within one state_dict(), a tied weight's two names share one host tensor (also when a
    cast made it), so save_pretrained drops the duplicate as it does for the library's model;
    a later state_dict() reads afresh."""
    path = build_qwen3(tmp_path / "tied", max_shard_size="60KB", tie_word_embeddings=True)
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=dtype)
    model = LazyStreamModel.from_pretrained(path, 1, dtype=dtype)
    state = model.state_dict()
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    ref.save_pretrained(tmp_path / "library")
    model.save_pretrained(tmp_path / "streamed")
    for name in sorted(p.name for p in (tmp_path / "library").glob("*.safetensors")):
        assert_same_tensors(load_file(tmp_path / "streamed" / name), load_file(tmp_path / "library" / name))
    again = model.state_dict()
    assert again["lm_head.weight"] is not state["lm_head.weight"]
    streamer_of(model).close()
