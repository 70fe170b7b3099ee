"""Synthetic checkpoints: the real Qwen3 and Z-Image architectures with seeded random weights,
written by the libraries' own ``save_pretrained`` (config.json, safetensors shards, index json).

Parameters are created on the meta device (buffers such as RoPE ``inv_freq`` are computed for
real), then each one is filled once, in the target dtype, from a seeded generator: a checkpoint
never needs more than one copy of its weights in RAM, and equal arguments give equal file bytes
(for the same torch, transformers and diffusers versions).
Needs the ``transformers`` extra for Qwen3 and the ``diffusers`` extra for Z-Image.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel, Qwen3Config

Progress = Callable[[str], None]

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3": {
        # ~37K parameters per layer, ~180K in all: 0.73 MB in float32.
        "tiny": {
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "vocab_size": 256,
            "max_position_embeddings": 512,
            "rope_theta": 1_000_000.0,
        },
        # 367.6M parameters: 1.47 GB in float32 (untied lm_head).
        "medium": {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "intermediate_size": 3072,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "rope_theta": 1_000_000.0,
        },
        # Qwen3-8B: 8.19B parameters, 16.4 GB in bfloat16.
        "real": {
            "hidden_size": 4096,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 12288,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rope_theta": 1_000_000.0,
        },
    },
    "zimage": {
        # 0.83M parameters (the fixed 256→1024→dim timestep MLP alone is 0.33M): 3.3 MB in float32.
        # axes_lens bound the RoPE positions: captions up to 32 tokens, latents up to 64x64.
        "tiny": {
            "in_channels": 4,
            "dim": 64,
            "n_layers": 4,
            "n_refiner_layers": 2,
            "n_heads": 2,
            "n_kv_heads": 2,
            "cap_feat_dim": 32,
            "axes_dims": [8, 12, 12],
            "axes_lens": [64, 32, 32],
        },
        # 377.4M parameters: 1.51 GB in float32.
        "medium": {
            "in_channels": 16,
            "dim": 1280,
            "n_layers": 14,
            "n_refiner_layers": 2,
            "n_heads": 10,
            "n_kv_heads": 10,
            "cap_feat_dim": 1024,
            "axes_dims": [32, 48, 48],
            "axes_lens": [1024, 512, 512],
        },
        # Z-Image Turbo transformer: 6.15B parameters, 12.3 GB in bfloat16.
        "real": {
            "in_channels": 16,
            "dim": 3840,
            "n_layers": 30,
            "n_refiner_layers": 2,
            "n_heads": 30,
            "n_kv_heads": 30,
            "cap_feat_dim": 2560,
            "axes_dims": [32, 48, 48],
            "axes_lens": [1024, 512, 512],
        },
    },
}


def _resolve_size(family: str, size: str | Mapping[str, Any],
                  presets: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The preset named ``size`` (of ``presets``, default ``SIZES[family]``), or ``size``
    merged onto the "tiny" preset (deep copies)."""
    presets = presets if presets is not None else SIZES[family]
    if isinstance(size, str):
        if size not in presets:
            raise ValueError(f"unknown {family} size {size!r}; expected one of {sorted(presets)} or a dict")
        return copy.deepcopy(presets[size])
    return copy.deepcopy({**presets["tiny"], **size})


def qwen3_config(size: str | Mapping[str, Any] = "tiny") -> Qwen3Config:
    """The ``Qwen3Config`` of a preset, or of overrides merged onto "tiny"."""
    from transformers import Qwen3Config

    return Qwen3Config(**_resolve_size("qwen3", size))


def zimage_config(size: str | Mapping[str, Any] = "tiny") -> dict[str, Any]:
    """The ``ZImageTransformer2DModel`` keyword arguments of a preset, or of overrides merged onto "tiny"."""
    return _resolve_size("zimage", size)


def zimage_inputs(
    config: Mapping[str, Any],
    *,
    sizes: Sequence[tuple[int, int]] = ((16, 16), (8, 12)),
    cap_lens: Sequence[int] = (7, 20),
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Seeded float32 CPU forward inputs ``(x, t, cap_feats)`` for ``ZImageTransformer2DModel(**config)``.

    One sample per ``(H, W)`` in ``sizes``: a latent [in_channels, 1, H, W], a t in [0, 1) and a
    caption [L, cap_feat_dim]. RoPE positions must stay within ``axes_lens``: H and W even (patch 2),
    H/2 <= axes_lens[1], W/2 <= axes_lens[2], and L rounded up to a multiple of 32, plus 2, <= axes_lens[0].
    """
    lens = config["axes_lens"]
    for (h, w), n in zip(sizes, cap_lens, strict=True):
        if h % 2 or w % 2 or h // 2 > lens[1] or w // 2 > lens[2] or -(-n // 32) * 32 + 2 > lens[0]:
            raise ValueError(f"latent {h}x{w} with a {n}-token caption does not fit axes_lens {lens}")
    generator = torch.Generator().manual_seed(seed)
    x = [torch.randn(config["in_channels"], 1, h, w, generator=generator) for h, w in sizes]
    cap_feats = [torch.randn(n, config["cap_feat_dim"], generator=generator) for n in cap_lens]
    return x, torch.rand(len(sizes), generator=generator), cap_feats


def fill_random_weights(model: torch.nn.Module, dtype: torch.dtype, seed: int) -> int:
    """Replace every parameter with seeded random values in ``dtype``, keeping tied ones tied.

    Weights, biases and embeddings ~ N(0, 0.02); weights of norm modules ~ N(1, 0.02).
    Returns the number of distinct parameter elements.
    """
    generator = torch.Generator().manual_seed(seed)
    filled: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module._parameters.items():
            if param is None:
                continue
            if param not in filled:
                mean = 1.0 if is_norm and name == "weight" else 0.0
                data = torch.empty(param.shape, dtype=dtype).normal_(mean, 0.02, generator=generator)
                filled[param] = torch.nn.Parameter(data, requires_grad=False)
            module._parameters[name] = filled[param]
    return sum(p.numel() for p in filled.values())


def _fill_and_save(
    model: PreTrainedModel | ModelMixin,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    seed: int,
    progress: Progress | None,
    **save_kwargs: Any,
) -> Path:
    """Fill ``model`` with random weights, ``save_pretrained`` it to ``path`` and return the folder.

    Weight files and indexes already in the folder are deleted first: the libraries replace only
    the files they write, so a stale index could otherwise sit beside a new unsharded file.
    """
    report = progress or (lambda line: None)
    name = type(model).__name__
    out = Path(path)
    if stale := [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        report(f"{name}: removing {len(stale)} old weight file(s) from {out}")
        for file in stale:
            file.unlink()
    report(f"{name}: filling parameters with seeded random values (seed={seed}, {dtype})")
    numel = fill_random_weights(model, dtype, seed)
    report(f"{name}: {numel / 1e6:.2f}M parameters, {numel * dtype.itemsize / 2**20:,.1f} MiB; saving to {path}")
    model.save_pretrained(out, **save_kwargs)
    shards = sorted(out.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in shards)
    report(f"{name}: wrote {len(shards)} safetensors file(s), {nbytes:,} bytes, to {out}")
    return out


def build_qwen3(
    path: str | os.PathLike[str],
    size: str | Mapping[str, Any] = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "200KB",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write a random-weight ``Qwen3ForCausalLM`` checkpoint to the folder ``path`` and return it.

    ``tie_word_embeddings`` overrides the config's default (untied); a tied checkpoint holds no
    ``lm_head.weight``. ``progress`` receives one status line per step.
    """
    from accelerate import init_empty_weights
    from transformers import Qwen3ForCausalLM

    config = qwen3_config(size)
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    with init_empty_weights(include_buffers=False):
        model = Qwen3ForCausalLM(config)
    # accelerate re-wraps every parameter registered inside the context, which unties lm_head.
    model.tie_weights()
    return _fill_and_save(model, path, dtype=dtype, seed=seed, progress=progress, max_shard_size=max_shard_size)


def build_zimage(
    path: str | os.PathLike[str],
    size: str | Mapping[str, Any] = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "200KB",
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Write a random-weight ``ZImageTransformer2DModel`` checkpoint to the folder ``path`` and return it.

    ``progress`` receives one status line per step.
    """
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights(include_buffers=False):
        model = ZImageTransformer2DModel(**zimage_config(size))
    return _fill_and_save(
        model,
        path,
        dtype=dtype,
        seed=seed,
        progress=progress,
        max_shard_size=max_shard_size,
        safe_serialization=True,
    )


# -- a whole Z-Image pipeline -----------------------------------------------------------------

# Each component's configuration, merged onto its own preset: the transformer's caption width
# is the text encoder's hidden size, and its latent channels are the VAE's.
PIPELINE_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # 1.1M parameters in all. Captions up to 126 tokens (a byte-level tokenizer spends one per
    # character), images up to 128x128 pixels (a 64x64 latent of 4 channels).
    "tiny": {
        "text_encoder": {**SIZES["qwen3"]["tiny"], "vocab_size": 512},
        "transformer": {**SIZES["zimage"]["tiny"], "cap_feat_dim": 64, "axes_lens": [128, 32, 32]},
        "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4},
    },
    # 335M text encoder (Qwen3Model, 24 layers), 377M transformer (14 + 4 blocks), 3.9M VAE:
    # 2.9 GB in float32.
    "medium": {
        "text_encoder": SIZES["qwen3"]["medium"],
        "transformer": SIZES["zimage"]["medium"],
        "vae": {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "norm_num_groups": 32,
                "latent_channels": 16},
    },
    # Z-Image Turbo: Qwen3-4B text encoder (4.0B, 36 layers), the 6.15B transformer, the Flux
    # VAE (84M): 20.5 GB in bfloat16.
    "real": {
        "text_encoder": {**SIZES["qwen3"]["real"], "hidden_size": 2560, "intermediate_size": 9728,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
        "transformer": SIZES["zimage"]["real"],
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                "latent_channels": 16},
    },
}

# The chat template's parts that ZImagePipeline uses: one user turn, then the assistant's
# generation prompt (Qwen3 writes an empty think block when thinking is switched off).
ZIMAGE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def zimage_pipeline_config(size: str = "tiny") -> dict[str, dict[str, Any]]:
    """Per component (``text_encoder``, ``transformer``, ``vae``) the configuration of a preset."""
    if size not in PIPELINE_SIZES:
        raise ValueError(f"unknown Z-Image pipeline size {size!r}; expected one of {sorted(PIPELINE_SIZES)}")
    return copy.deepcopy(PIPELINE_SIZES[size])


def byte_level_tokenizer():
    """A ``Qwen2Tokenizer`` built offline: one token per byte (no merges), Qwen's special
    tokens and a Qwen3-style chat template. Token ids stay below 259."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0} | {char: i + 1 for i, char in enumerate(sorted(alphabet))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=ZIMAGE_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def build_zimage_pipeline(
    path: str | os.PathLike[str],
    size: str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "200KB",
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Write a random-weight ``ZImagePipeline`` to the folder ``path`` and return it.

    The layout is the real repo's, written by ``ZImagePipeline.save_pretrained``: model_index.json
    and the subfolders text_encoder (``Qwen3Model``), tokenizer (:func:`byte_level_tokenizer`),
    transformer (``ZImageTransformer2DModel``), vae (``AutoencoderKL``) and scheduler
    (``FlowMatchEulerDiscreteScheduler`` with Z-Image Turbo's shift 3). The components are held in
    RAM together while saving (20.5 GB for "real" in bfloat16). Weight files already in the
    subfolders are deleted first.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    report = progress or (lambda line: None)
    config = zimage_pipeline_config(size)
    vae_config = config["vae"]
    levels = len(vae_config["block_out_channels"])
    with init_empty_weights(include_buffers=False):
        text_encoder = Qwen3Model(Qwen3Config(**config["text_encoder"]))
        transformer = ZImageTransformer2DModel(**{**config["transformer"], "in_channels": vae_config["latent_channels"]})
        vae = AutoencoderKL(
            **vae_config,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    for offset, (name, model) in enumerate((("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae))):
        numel = fill_random_weights(model, dtype, seed + offset)
        report(f"{name}: {numel / 1e6:.2f}M parameters, {numel * dtype.itemsize / 2**20:,.1f} MiB")
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_tokenizer(),
        transformer=transformer,
    )
    out = Path(path)
    for sub in ("text_encoder", "transformer", "vae"):
        for file in [*(out / sub).glob("*.safetensors"), *(out / sub).glob("*.safetensors.index.json")]:
            file.unlink()
    pipe.save_pretrained(out, max_shard_size=max_shard_size)
    report(f"ZImagePipeline ({size}, {dtype}) saved to {out}")
    return out
