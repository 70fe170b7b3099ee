"""Single-file checkpoints in the original layouts that ComfyUI and model sites ship
(``z_image_turbo_bf16.safetensors``, ``flux2-dev.safetensors``): a random-weight diffusers
model, its state dict put back into the original key names and fused tensors by the
inverse of diffusers' single-file conversion, written as one safetensors file.
``Model.from_single_file`` of that file gives the model back, tensor for tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import Progress, fill_random_weights, _resolve_size, zimage_config

FLUX2_SIZES: dict[str, dict[str, Any]] = {
    # 0.2M parameters: 2 double-stream and 2 single-stream blocks of width 32.
    "tiny": {
        "patch_size": 1,
        "in_channels": 8,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "timestep_guidance_channels": 16,
        "mlp_ratio": 3.0,
        "axes_dims_rope": [4, 4, 4, 4],
    },
}


def original_zimage_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Z-Image's original layout: fused ``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``,
    ``x_embedder``/``final_layer`` without the patch-size keys (the inverse of diffusers'
    ``convert_z_image_transformer_checkpoint_to_diffusers``)."""
    renames = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
               ".attention.norm_k.": ".attention.k_norm."}
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q." in name:
            parts = [state[name.replace(".to_q.", f".{p}.")] for p in ("to_q", "to_k", "to_v")]
            out[prefix + name.replace(".attention.to_q.", ".attention.qkv.")] = torch.cat(parts)
            continue
        for new, old in renames.items():
            name = name.replace(new, old)
        out[prefix + name] = value
    return out


def original_flux2_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """FLUX.2's original layout: ``double_blocks``/``single_blocks`` with fused ``qkv``,
    ``*_in`` embedders, ``.lin`` modulations, and the final modulation's (shift, scale)
    halves in the original order (the inverse of diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``)."""
    top = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin",
           "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
    double = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
              "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
              "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
              "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
              "ff_context.linear_out": "txt_mlp.2"}
    single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
              "attn.norm_k": "norm.key_norm"}
    fused = {("transformer_blocks", "attn.to_q"): ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
             ("transformer_blocks", "attn.add_q_proj"):
                 ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))}
    return _original_flux_layout(state, prefix, top, double, single, fused)


def original_flux_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """FLUX.1's original layout (``flux1-dev.safetensors``): ``double_blocks`` with fused
    ``qkv``, ``single_blocks`` whose ``linear1`` fuses q, k, v and the MLP input, ``*_in``
    embedders and the final modulation's (shift, scale) halves (the inverse of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers``, which only loads 3072-wide models)."""
    top = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
              "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
              "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
              "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
              "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
    single = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
              "proj_out": "linear2"}
    fused = {("transformer_blocks", "attn.to_q"): ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
             ("transformer_blocks", "attn.add_q_proj"):
                 ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
             ("single_transformer_blocks", "attn.to_q"): ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))}
    return _original_flux_layout(state, prefix, top, double, single, fused)


def _original_flux_layout(state: Mapping[str, torch.Tensor], prefix: str, top: Mapping[str, str],
                          double: Mapping[str, str], single: Mapping[str, str],
                          fused: Mapping[tuple[str, str], tuple[str, tuple[str, ...]]]) -> dict[str, torch.Tensor]:
    """The original FLUX layouts from diffusers' names: ``top`` renames modules outside the
    blocks, ``double``/``single`` those inside ``double_blocks``/``single_blocks``, ``fused``
    (block list, first piece) -> (original name, pieces in order) concatenates pieces; norms
    store ``scale``; the final modulation's halves are swapped to (shift, scale)."""
    out: dict[str, torch.Tensor] = {}
    originals = {"transformer_blocks": ("double_blocks", double), "single_transformer_blocks": ("single_blocks", single)}
    for name, value in state.items():
        module, kind = name.rsplit(".", 1)
        blocks, _, rest = module.partition(".")
        if blocks in originals:
            index, inner = rest.split(".", 1)
            original, names = originals[blocks]
            if (blocks, inner) in fused:
                inner, parts = fused[(blocks, inner)]
                value = torch.cat([state[f"{blocks}.{index}.{p}.{kind}"] for p in parts])
            elif inner in names:
                inner = names[inner]
            else:
                continue  # a piece of a fused tensor, written with its first piece
            kind = "scale" if ".norm." in f".{inner}" else kind
            out[f"{prefix}{original}.{index}.{inner}.{kind}"] = value
        else:
            if module == "norm_out.linear":
                scale, shift = value.chunk(2)
                value = torch.cat([shift, scale])
            out[f"{prefix}{top[module]}.{kind}"] = value
    return out


def write_header_only(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a safetensors file whose header describes ``tensors`` (meta tensors will do) and
    whose data section is a hole: a sparse file of the full size that takes no disk space
    on file systems that keep holes. For planning a real-size checkpoint from its header."""
    from lazystream.header import DTYPES

    names = {dtype: name for name, dtype in DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out = Path(path)
    with open(out, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return out


def build_zimage_single_file(path: str | os.PathLike[str], size: str | Mapping[str, Any] = "tiny", *,
                             dtype: torch.dtype = torch.float32, seed: int = 0, prefix: str = "",
                             config_folder: str | os.PathLike[str] | None = None,
                             progress: Progress | None = None) -> Path:
    """Write a random-weight ``ZImageTransformer2DModel`` to the file ``path`` in Z-Image's
    original layout (``prefix``: e.g. ``"model.diffusion_model."`` as ComfyUI writes it) and
    return it; ``config_folder`` receives the model's diffusers config.json."""
    from diffusers import ZImageTransformer2DModel

    return _build(ZImageTransformer2DModel, zimage_config(size), original_zimage_state, path, dtype=dtype, seed=seed,
                  prefix=prefix, config_folder=config_folder, progress=progress)


def flux2_config(size: str | Mapping[str, Any] = "tiny") -> dict[str, Any]:
    """The ``Flux2Transformer2DModel`` keyword arguments of a preset, or of overrides merged onto "tiny"."""
    return _resolve_size("flux2", size, FLUX2_SIZES)


def build_flux2_single_file(path: str | os.PathLike[str], size: str | Mapping[str, Any] = "tiny", *,
                            dtype: torch.dtype = torch.float32, seed: int = 0, prefix: str = "",
                            config_folder: str | os.PathLike[str] | None = None,
                            progress: Progress | None = None) -> Path:
    """Write a random-weight ``Flux2Transformer2DModel`` to the file ``path`` in FLUX.2's
    original layout and return it; ``config_folder`` receives its diffusers config.json."""
    from diffusers import Flux2Transformer2DModel

    return _build(Flux2Transformer2DModel, flux2_config(size), original_flux2_state, path, dtype=dtype, seed=seed,
                  prefix=prefix, config_folder=config_folder, progress=progress)


def _build(cls, config: Mapping[str, Any], original: Callable[..., dict[str, torch.Tensor]],
           path: str | os.PathLike[str], *, dtype: torch.dtype, seed: int, prefix: str,
           config_folder: str | os.PathLike[str] | None, progress: Progress | None) -> Path:
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    report = progress or (lambda line: None)
    with init_empty_weights(include_buffers=False):
        model = cls(**config)
    numel = fill_random_weights(model, dtype, seed)
    state = original(model.state_dict(), prefix)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: value.contiguous() for name, value in state.items()}, out)
    if config_folder is not None:
        model.save_config(config_folder)
    report(f"{cls.__name__}: {numel / 1e6:.2f}M parameters in the original layout, {len(state)} tensors, to {out}")
    return out
