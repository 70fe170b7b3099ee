"""A model card's loading line, with LazyStreamModel swapped in, gives the library's model:
dtype forms, config overrides, generation_config, keep-in-fp32 modules, tied weights, the
keys the library ignores, its loading report; what lazystream cannot honour is refused by
name. Each is compared with the library's own from_pretrained on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Qwen3ForCausalLM

from lazystream import LazyStreamModel, streamer_of
from lazystream.errors import LazyStreamError, UnsupportedKeywordError, UnusedTensorsError
from lazystream.synthetic import build_qwen3

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def qwen3_bf16(tmp_path_factory):
    return build_qwen3(tmp_path_factory.mktemp("q") / "q", dtype=torch.bfloat16, max_shard_size="60KB")


def _logits(model, **kwargs):
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def _same_model(streamed, ref) -> None:
    """Same parameter dtypes, config, generation_config and logits as the library's model."""
    assert {n: p.dtype for n, p in streamed.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    assert streamed.config.to_dict() == ref.config.to_dict()
    assert streamed.generation_config.to_dict() == ref.generation_config.to_dict()
    assert torch.equal(_logits(streamed), _logits(ref))


@pytest.mark.parametrize("kwargs", [{}, {"dtype": "auto"}, {"dtype": "bfloat16"}, {"dtype": torch.float16},
                                    {"torch_dtype": torch.float32}, {"dtype": "float32", "torch_dtype": "float16"}],
                         ids=["default", "auto", "string", "dtype", "torch_dtype", "dtype-over-torch_dtype"])
def test_dtype_as_transformers_resolves_it(qwen3_bf16, kwargs):
    ref = Qwen3ForCausalLM.from_pretrained(qwen3_bf16, **kwargs)
    model = LazyStreamModel.from_pretrained(qwen3_bf16, 1, device="cpu", **kwargs)
    _same_model(model, ref)
    streamer_of(model).close()


def test_default_dtype_is_the_checkpoint_one_not_float32(qwen3_bf16):
    """Negative control of the dtype test: "auto" (transformers' default) differs from float32 here."""
    model = LazyStreamModel.from_pretrained(qwen3_bf16, 1, device="cpu")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.config.dtype == torch.bfloat16
    streamer_of(model).close()


def test_config_overrides_and_attn_implementation(qwen3_bf16):
    kwargs = {"attn_implementation": "eager", "rms_norm_eps": 0.5, "dtype": torch.float32}
    ref = Qwen3ForCausalLM.from_pretrained(qwen3_bf16, **kwargs)
    model = LazyStreamModel.from_pretrained(qwen3_bf16, 1, device="cpu", **kwargs)
    assert model.config._attn_implementation == "eager" and model.config.rms_norm_eps == 0.5
    _same_model(model, ref)
    plain = LazyStreamModel.from_pretrained(qwen3_bf16, 1, device="cpu", dtype=torch.float32)
    assert not torch.equal(_logits(plain), _logits(model))  # the override changes the model
    streamer_of(model).close()
    streamer_of(plain).close()


def test_generation_config_json_is_read_and_generate_matches(tmp_path):
    path = build_qwen3(tmp_path / "q", max_shard_size="60KB")
    prompt = IDS[:1]
    qwen3_like = {"bos_token_id": 1, "do_sample": True, "eos_token_id": [2, 3], "pad_token_id": 2,
                  "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    (path / "generation_config.json").write_text(json.dumps(qwen3_like))
    ref = Qwen3ForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    sampled = ref.generate(prompt, max_new_tokens=40)
    # One sampled token becomes an eos id too: generation must stop there.
    stop = int(sampled[0, prompt.shape[1] + 5])
    qwen3_like["eos_token_id"] = [2, 3, stop]
    (path / "generation_config.json").write_text(json.dumps(qwen3_like))
    ref = Qwen3ForCausalLM.from_pretrained(path)
    model = LazyStreamModel.from_pretrained(path, 1, device="cpu")
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    assert model.generation_config.temperature == 0.6 and model.generation_config.eos_token_id == [2, 3, stop]
    torch.manual_seed(0)
    want = ref.generate(prompt, max_new_tokens=40)
    torch.manual_seed(0)
    got = model.generate(prompt, max_new_tokens=40)
    assert torch.equal(got, want)
    assert got.shape[1] <= prompt.shape[1] + 6  # stopped at the eos id from the file
    torch.manual_seed(1)
    assert not torch.equal(model.generate(prompt, max_new_tokens=40), want)  # it samples: the seed matters
    # The generation_config= keyword overrides the file, as in the library.
    greedy = GenerationConfig(do_sample=False, max_new_tokens=5)
    streamer_of(model).close()
    model = LazyStreamModel.from_pretrained(path, 1, device="cpu", generation_config=greedy)
    ref = Qwen3ForCausalLM.from_pretrained(path, generation_config=greedy)
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    assert model.generation_config.do_sample is False
    assert torch.equal(model.generate(prompt), ref.generate(prompt))
    streamer_of(model).close()


def test_keep_in_fp32_modules_as_transformers(tmp_path):
    """T5 keeps its ``wo`` projections in float32 when loaded in float16."""
    from transformers import T5ForConditionalGeneration

    _tiny_t5(tmp_path / "t5")
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    model = LazyStreamModel.from_pretrained(tmp_path / "t5", 1, device="cpu", dtype=torch.float16)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert dict(model.named_parameters())[wo].dtype == torch.float32 == dict(ref.named_parameters())[wo].dtype
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits,
                           ref(input_ids=ids, decoder_input_ids=ids).logits)
    streamer_of(model).close()


def test_tied_weights_as_transformers(tmp_path):
    path = build_qwen3(tmp_path / "q", tie_word_embeddings=True, max_shard_size="60KB")
    assert "lm_head.weight" not in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    ref = Qwen3ForCausalLM.from_pretrained(path)
    model = LazyStreamModel.from_pretrained(path, 1, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _same_model(model, ref)
    streamer_of(model).close()


def _add_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = path / index["weight_map"]["model.norm.weight"]
    state = load_file(shard)
    state.update(tensors)
    save_file(state, shard, metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index_path.write_text(json.dumps(index))


def test_loading_info_and_keys_the_library_ignores(tmp_path):
    """A stale per-layer rotary inv_freq is on transformers' ignore list: no report, no
    warning; an unknown tensor is reported as unexpected, by both."""
    path = build_qwen3(tmp_path / "q", max_shard_size="60KB")
    _add_tensors(path, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), "extra.a": torch.ones(3)})
    ref, ref_info = Qwen3ForCausalLM.from_pretrained(path, output_loading_info=True)
    with pytest.warns(UserWarning, match=r"1 checkpoint tensor\(s\) are not used by Qwen3ForCausalLM: \['extra.a'\]"):
        model, info = LazyStreamModel.from_pretrained(path, 1, device="cpu", output_loading_info=True)
    assert info == ref_info and info["unexpected_keys"] == {"extra.a"}
    assert torch.equal(_logits(model), _logits(ref))
    streamer_of(model).close()


class _WithExtraState(torch.nn.Module):
    """A module whose state the library hands to ``set_extra_state`` at load."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def get_extra_state(self):
        return torch.arange(4.0)

    def set_extra_state(self, state):
        self.seen = state


class _Qwen3WithExtraState(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.calibration = _WithExtraState()


def test_a_tensor_the_library_loads_and_lazystream_would_not_is_an_error(tmp_path):
    path = build_qwen3(tmp_path / "q", max_shard_size="60KB")
    _add_tensors(path, {"calibration._extra_state": torch.arange(4.0)})
    ref = _Qwen3WithExtraState.from_pretrained(path)
    assert torch.equal(ref.calibration.seen, torch.arange(4.0))  # the library loads it
    with pytest.raises(UnusedTensorsError, match=r"transformers loads 1 checkpoint tensor\(s\) into "
                                                 r"_Qwen3WithExtraState that lazystream does not stream: "
                                                 r"\['calibration._extra_state'\]"):
        LazyStreamModel.from_pretrained(path, 1, device="cpu", model_cls=_Qwen3WithExtraState)
    # Negative control: the plain class does not load it (unexpected to the library too): no error.
    with pytest.warns(UserWarning, match="calibration._extra_state"):
        model = LazyStreamModel.from_pretrained(path, 1, device="cpu")
    streamer_of(model).close()


@pytest.mark.parametrize("kwargs, name, hint", [
    ({"device_map": "auto"}, "device_map", "keep_gpu"),
    ({"max_memory": {0: "1GiB"}}, "max_memory", "max_gpu_memory"),
    ({"ignore_mismatched_sizes": True}, "ignore_mismatched_sizes", "not a random initialization"),
    ({"use_safetensors": False}, "use_safetensors", "safetensors only"),
    ({"adapter_kwargs": {"revision": "x"}}, "adapter_kwargs", "load_adapter"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_keywords_lazystream_cannot_honour_are_refused_by_name(qwen3_bf16, kwargs, name, hint):
    with pytest.raises(UnsupportedKeywordError, match=rf"{name}=.*not supported by lazystream.*{hint}") as err:
        LazyStreamModel.from_pretrained(qwen3_bf16, 1, device="cpu", **kwargs)
    assert isinstance(err.value, (LazyStreamError, TypeError))


def _tiny_t5(path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(path, max_shard_size="20KB")
    return config


def test_attach_resolves_dtype_and_keep_in_fp32_by_the_librarys_rules(tmp_path, qwen3_bf16):
    from accelerate import init_empty_weights
    from transformers import T5ForConditionalGeneration

    from lazystream import attach

    config = _tiny_t5(tmp_path / "t5")
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    with init_empty_weights():
        built = T5ForConditionalGeneration(config)
    built.tie_weights()  # accelerate re-wraps each parameter made in the context, untying them
    built.eval()
    model = attach(built, tmp_path / "t5", 1, device="cpu", dtype=torch.float16)
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    assert torch.float32 in {p.dtype for p in model.parameters()}  # the wo projections: not all float16
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits,
                           ref(input_ids=ids, decoder_input_ids=ids).logits)
    streamer_of(model).close()
    # "auto" and strings, as transformers resolves them: the checkpoint's bfloat16 here.
    ref = Qwen3ForCausalLM.from_pretrained(qwen3_bf16)
    for dtype in ("auto", None, "bfloat16"):
        with init_empty_weights(include_buffers=False):
            built = Qwen3ForCausalLM(ref.config)
        model = attach(built, qwen3_bf16, 1, device="cpu", dtype=dtype)
        assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
        assert torch.equal(_logits(model), _logits(ref))
        streamer_of(model).close()


# -- diffusers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    from lazystream.synthetic import build_zimage

    return build_zimage(tmp_path_factory.mktemp("z") / "z", max_shard_size="200KB")


def _zimage_out(model):
    from lazystream.synthetic import zimage_config, zimage_inputs

    x, t, cap = zimage_inputs(zimage_config("tiny"), sizes=((8, 8),), cap_lens=(7,))
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    with torch.no_grad():
        return torch.cat([s.flatten() for s in model([v.to(dtype) for v in x], t, [c.to(dtype) for c in cap])[0]])


@pytest.mark.parametrize("kwargs", [{"torch_dtype": torch.bfloat16}, {"dtype": torch.bfloat16},
                                    {"dtype": torch.float32, "torch_dtype": torch.bfloat16},
                                    {"rope_theta": 32.0}],
                         ids=["torch_dtype", "dtype", "dtype-over-torch_dtype", "config-override"])
def test_diffusers_keywords_as_diffusers_applies_them(zimage, kwargs):
    from diffusers import ZImageTransformer2DModel

    ref = ZImageTransformer2DModel.from_pretrained(zimage, **kwargs).eval()
    model = LazyStreamModel.from_pretrained(zimage, 1, device="cpu", **kwargs)
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    assert dict(model.config) == dict(ref.config)
    assert torch.equal(_zimage_out(model), _zimage_out(ref))
    streamer_of(model).close()


def test_diffusers_string_dtype_is_float32_with_the_librarys_warning(zimage):
    """diffusers takes only a torch.dtype: anything else loads float32, with a warning."""
    from diffusers import ZImageTransformer2DModel

    ref = ZImageTransformer2DModel.from_pretrained(zimage, torch_dtype="bfloat16")
    with pytest.warns(UserWarning, match="is not a `torch.dtype`. Defaulting to `torch.float32`"):
        model = LazyStreamModel.from_pretrained(zimage, 1, device="cpu", torch_dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {p.dtype for p in ref.parameters()} == {torch.float32}
    streamer_of(model).close()


def test_from_single_file_takes_torch_dtype_as_diffusers_does(tmp_path):
    from diffusers import ZImageTransformer2DModel

    from lazystream.synthetic.single_file import build_zimage_single_file

    file = build_zimage_single_file(tmp_path / "z.safetensors", config_folder=tmp_path / "transformer")
    kwargs = {"config": str(tmp_path), "subfolder": "transformer", "torch_dtype": torch.bfloat16}
    ref = ZImageTransformer2DModel.from_single_file(str(file), **kwargs).eval()
    model = LazyStreamModel.from_single_file(file, 1, device="cpu", **kwargs)
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    assert torch.bfloat16 in {p.dtype for p in model.parameters()}  # the keyword took effect
    assert torch.equal(_zimage_out(model), _zimage_out(ref))
    streamer_of(model).close()


def test_a_class_that_loads_by_its_own_path_is_refused(qwen3_bf16):
    from lazystream.errors import UnsupportedOperationError

    from lazystream.library_load import _patched

    streamer_of(LazyStreamModel.from_pretrained(qwen3_bf16, 1, device="cpu", load=False)).close()  # hook installed
    library_code = _patched["_load_pretrained_model"].__func__  # transformers' own, as a copy of it would be

    class OwnLoader(Qwen3ForCausalLM):
        @staticmethod
        def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
            return library_code(model, state_dict, checkpoint_files, load_config, expected_keys)

    with pytest.raises(UnsupportedOperationError, match="overrides transformers' _load_pretrained_model"):
        LazyStreamModel.from_pretrained(qwen3_bf16, 1, device="cpu", model_cls=OwnLoader)


def test_a_missing_tensor_is_refused_before_the_library_initializes_it(tmp_path, monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    from lazystream.errors import MissingTensorsError

    path = build_qwen3(tmp_path / "q", max_shard_size="60KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    shard = path / json.loads(index_path.read_text())["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    state = load_file(shard)
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))

    def initialized(*args, **kwargs):
        raise AssertionError("the library was left to allocate and initialize the missing tensor")

    monkeypatch.setattr(PreTrainedModel, "_move_missing_keys_from_meta_to_device", initialized)
    with pytest.raises(MissingTensorsError, match=r"1 tensor\(s\) of Qwen3ForCausalLM are in no shard: "
                                                  r"\['model.layers.2.mlp.up_proj.weight'\]"):
        LazyStreamModel.from_pretrained(path, 1, device="cpu")
