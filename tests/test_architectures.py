"""One check over many architectures: a tiny random-weight checkpoint of each, saved by
the library itself (sharded small, so blocks straddle files) or written in a single-file
original layout, is streamed with keep_gpu 0, 1 and all; every forward (and, for causal
LMs, every generated token) equals the library's own loader's, bit for bit.

Covered: transformers Llama, Mistral, Qwen2, Qwen3 (also float8-stored), Gemma2, Phi3,
GPT-2, T5 encoder, CLIP text, BERT, Qwen3-MoE and Mixtral (experts stacked at load);
diffusers Flux, SD3, Wan, UNet2DCondition and Z-Image (also float8-stored); single files in
the original layout of Z-Image (ComfyUI key prefix) and FLUX.2 (fused qkv, swapped
modulation halves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lazystream import LazyStreamModel, streamer_of
from lazystream.synthetic import fill_random_weights, zimage_config, zimage_inputs
from lazystream.synthetic.single_file import build_flux2_single_file, build_zimage_single_file

SHARD = "40KB"
LM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=128, max_position_embeddings=64)


@dataclass(frozen=True)
class Arch:
    """How to build, load and call one architecture."""

    make: Callable[[], Any] | None  # the model, built by its library (random weights are filled in)
    inputs: Callable[[], dict[str, Any]]
    output: Callable[[Any], torch.Tensor] = lambda out: out[0]
    causal: bool = False  # also compare generate()
    # Writes a single file into a folder; gives it, its class and the load arguments.
    single_file: Callable[[Path], tuple[Path, type, dict[str, Any]]] | None = None
    dtype: torch.dtype = torch.float32  # of the random weights
    convert: Callable[[Any], None] = lambda model: None  # changes the filled model before it is saved


def _transformers(config_cls: str, model_cls: str, **config) -> Callable[[], Any]:
    def make():
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))

    return make


def _diffusers(model_cls: str, **config) -> Callable[[], Any]:
    def make():
        import diffusers

        return getattr(diffusers, model_cls)(**config)

    return make


def _ids(vocab: int = 128, length: int = 9) -> Callable[[], dict[str, Any]]:
    return lambda: {"input_ids": torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(0))}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux_inputs() -> dict[str, Any]:
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=1)
    txt_ids = torch.zeros(7, 3)
    return dict(hidden_states=_randn(2, 16, 8), encoder_hidden_states=_randn(2, 7, 32, seed=1),
                pooled_projections=_randn(2, 32, seed=2), timestep=torch.tensor([0.25, 0.75]), img_ids=img_ids,
                txt_ids=txt_ids)


def _flux2_inputs() -> dict[str, Any]:
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4, torch.zeros(16)], dim=1)
    txt_ids = torch.stack([torch.zeros(7), torch.zeros(7), torch.zeros(7), torch.arange(7.0)], dim=1)
    return dict(hidden_states=_randn(2, 16, 8), encoder_hidden_states=_randn(2, 7, 32, seed=1),
                timestep=torch.tensor([0.25, 0.75]), img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5, 3.5]))


def _flat_samples(out: Any) -> torch.Tensor:
    """Z-Image returns one sample per input size: compare them all at once."""
    return torch.cat([sample.flatten() for sample in out[0]])


def _zimage_inputs() -> dict[str, Any]:
    x, t, cap = zimage_inputs(zimage_config("tiny"))
    return dict(x=x, t=t, cap_feats=cap)


def _zimage_single_file(folder: Path) -> tuple[Path, type, dict[str, Any]]:
    from diffusers import ZImageTransformer2DModel

    file = build_zimage_single_file(folder / "z_image_tiny.safetensors", prefix="model.diffusion_model.",
                                    config_folder=folder / "transformer")
    return file, ZImageTransformer2DModel, dict(config=str(folder), subfolder="transformer")


def _flux2_single_file(folder: Path) -> tuple[Path, type, dict[str, Any]]:
    from diffusers import Flux2Transformer2DModel

    file = build_flux2_single_file(folder / "flux2_tiny.safetensors", config_folder=folder / "config")
    return file, Flux2Transformer2DModel, dict(config=str(folder / "config"))


def _blocks_to_fp8(model: Any) -> None:
    """Store the block linear weights in float8_e4m3fn (a transformers config says bfloat16)."""
    if not isinstance(model.config, dict):
        model.config.dtype = torch.bfloat16
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            module.weight = torch.nn.Parameter(module.weight.data.to(torch.float8_e4m3fn), requires_grad=False)


ARCHS: dict[str, Arch] = {
    "llama": Arch(_transformers("LlamaConfig", "LlamaForCausalLM", **LM), _ids(), lambda o: o.logits, causal=True),
    "mistral": Arch(_transformers("MistralConfig", "MistralForCausalLM", **LM), _ids(), lambda o: o.logits,
                    causal=True),
    "qwen2": Arch(_transformers("Qwen2Config", "Qwen2ForCausalLM", **LM), _ids(), lambda o: o.logits, causal=True),
    "qwen3": Arch(_transformers("Qwen3Config", "Qwen3ForCausalLM", head_dim=16, **LM), _ids(), lambda o: o.logits,
                  causal=True),
    "qwen3-fp8": Arch(_transformers("Qwen3Config", "Qwen3ForCausalLM", head_dim=16, **LM), _ids(), lambda o: o.logits,
                      causal=True, dtype=torch.bfloat16, convert=_blocks_to_fp8),
    "gemma2": Arch(_transformers("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, sliding_window=8, **LM), _ids(),
                   lambda o: o.logits, causal=True),
    "phi3": Arch(_transformers("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, original_max_position_embeddings=64,
                               **LM), _ids(), lambda o: o.logits, causal=True),
    "gpt2": Arch(_transformers("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=3, n_head=4, n_positions=64,
                               vocab_size=128, bos_token_id=0, eos_token_id=0), _ids(), lambda o: o.logits,
                 causal=True),
    "t5-encoder": Arch(_transformers("T5Config", "T5EncoderModel", d_model=64, d_ff=96, d_kv=16, num_layers=3,
                                     num_heads=4, vocab_size=128), _ids(), lambda o: o.last_hidden_state),
    "clip-text": Arch(_transformers("CLIPTextConfig", "CLIPTextModel", hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=3, num_attention_heads=4, vocab_size=128,
                                    max_position_embeddings=16), _ids(), lambda o: o.last_hidden_state),
    "bert": Arch(_transformers("BertConfig", "BertModel", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, vocab_size=128, max_position_embeddings=64), _ids(),
                 lambda o: o.last_hidden_state),
    "qwen3-moe": Arch(_transformers("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=16, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, **LM),
                      _ids(), lambda o: o.logits, causal=True),
    "mixtral": Arch(_transformers("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                                  **LM), _ids(), lambda o: o.logits, causal=True),
    "flux": Arch(_diffusers("FluxTransformer2DModel", patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                            pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)), _flux_inputs),
    "sd3": Arch(_diffusers("SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                           caption_projection_dim=16, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16),
                lambda: dict(hidden_states=_randn(2, 4, 8, 8), encoder_hidden_states=_randn(2, 7, 32, seed=1),
                             pooled_projections=_randn(2, 32, seed=2), timestep=torch.tensor([10, 500]))),
    "wan": Arch(_diffusers("WanTransformer3DModel", num_attention_heads=2, attention_head_dim=12, in_channels=4,
                           out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
                lambda: dict(hidden_states=_randn(2, 4, 2, 8, 8), timestep=torch.tensor([10, 500]),
                             encoder_hidden_states=_randn(2, 7, 32, seed=1))),
    "unet2d-condition": Arch(
        _diffusers("UNet2DConditionModel", block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                   in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
                   attention_head_dim=8),
        lambda: dict(sample=_randn(2, 4, 16, 16), timestep=torch.tensor([10, 500]),
                     encoder_hidden_states=_randn(2, 7, 32, seed=1))),
    "zimage": Arch(_diffusers("ZImageTransformer2DModel", **zimage_config("tiny")), _zimage_inputs,
                   _flat_samples),
    # diffusers loads it in float32 (its default): float8 bytes stream and are cast on the device.
    "zimage-fp8": Arch(_diffusers("ZImageTransformer2DModel", **zimage_config("tiny")), _zimage_inputs,
                       _flat_samples, dtype=torch.bfloat16, convert=_blocks_to_fp8),
    "zimage-single-file": Arch(None, _zimage_inputs, _flat_samples, single_file=_zimage_single_file),
    "flux2-single-file": Arch(None, _flux2_inputs, single_file=_flux2_single_file),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tmp_path_factory.mktemp("architectures")


@pytest.mark.parametrize("name", ARCHS)
def test_streams_bit_exact_at_every_keep_gpu(name, folders):
    arch = ARCHS[name]
    folder = folders / name
    if arch.single_file is not None:
        path, cls, kwargs = arch.single_file(folder)
        ref = cls.from_single_file(str(path), **kwargs).eval()
        load = lambda keep: LazyStreamModel.from_single_file(path, keep, device="cpu", **kwargs)  # noqa: E731
    else:
        model = arch.make()
        fill_random_weights(model, arch.dtype, seed=0)
        arch.convert(model)
        model.save_pretrained(folder, max_shard_size=SHARD)
        assert len(list(folder.glob("*.safetensors"))) > 2  # blocks straddle shard files
        ref = type(model).from_pretrained(folder).eval()
        load = lambda keep: LazyStreamModel.from_pretrained(folder, keep, device="cpu")  # noqa: E731
    inputs = arch.inputs()
    with torch.no_grad():
        want = arch.output(ref(**inputs))
        tokens = ref.generate(**inputs, max_new_tokens=4, do_sample=False) if arch.causal else None
    blocks = None
    for keep in (0, 1, "all"):
        model = load(10**6 if keep == "all" else keep)
        plan = streamer_of(model).plan
        blocks = blocks or len(plan.blocks)
        assert len(plan.streamed) == {0: blocks, 1: blocks - 1, "all": 0}[keep]
        with torch.no_grad():
            got = arch.output(model(**inputs))
            assert got.dtype == want.dtype and torch.equal(got, want), f"{name}: keep_gpu={keep} differs"
            if arch.causal:
                assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens), \
                    f"{name}: keep_gpu={keep} generates other tokens"
        if keep == 0:
            assert plan.block_share >= 0.5, f"{name}: blocks hold only {plan.block_share:.0%} of the weights"
            assert streamer_of(model).stats().last_call.blocks_streamed >= blocks
        streamer_of(model).close()
