"""GGUF single files as city96 and ComfyUI users get them: a random-weight diffusers model
in its original key layout, each 2-D weight whose rows fit the format's blocks quantized
(Q8_0, Q4_0, Q4_K, ... mixed per tensor), the rest float16 (2-D) or float32 (norms,
biases), written with the ``gguf`` package's ``GGUFWriter``.

``gguf.quants.quantize`` implements Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (and BF16); for the
K-quants it has only ``dequantize``, so their blocks are written as random valid bytes
(finite float16 super-block scales, random sub-scales and quants): the file is then not a
quantization of the random model, but every reader (diffusers, llama.cpp) decodes it, and
that is all a test of streaming against diffusers' own load needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import fill_random_weights, zimage_config
from .single_file import original_zimage_state

# Z-Image's weight name pieces -> the format written: a mix as city96's files have.
MIXED: tuple[tuple[str, str], ...] = (
    (".attention.qkv.", "Q8_0"), (".attention.out.", "Q4_K"), (".feed_forward.w1.", "Q4_0"),
    (".feed_forward.w3.", "Q4_K"), ("adaLN_modulation", "Q8_0"),
)


def mixed_format(name: str, shape: tuple[int, ...]) -> str:
    """The format :data:`MIXED` gives ``name``: quantized where it names it and the row
    length fits, else F16 for matrices and F32 for vectors."""
    for piece, fmt in MIXED:
        if piece in name and _fits(fmt, shape):
            return fmt
    return "F16" if len(shape) == 2 else "F32"


def uniform_format(fmt: str) -> Callable[[str, tuple[int, ...]], str]:
    """``fmt`` for every linear weight whose rows fit its blocks (as city96's files: other
    matrices, such as pad tokens, F16; vectors F32)."""
    return lambda name, shape: (fmt if name.endswith(".weight") and _fits(fmt, shape)
                                else "F16" if len(shape) == 2 else "F32")


def _fits(fmt: str, shape: tuple[int, ...]) -> bool:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
    return len(shape) == 2 and shape[-1] % block == 0


def encode(value: torch.Tensor, fmt: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    """(array, raw dtype) to pass to ``GGUFWriter.add_tensor`` for ``value`` in ``fmt``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[fmt]
    array = value.detach().float().numpy()
    if fmt == "F32":
        return array.astype(np.float32), None
    if fmt == "F16":
        return array.astype(np.float16), None
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except NotImplementedError:  # K-quants: random valid blocks (see the module text)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(array.shape[0], array.shape[1] // block, size), dtype=np.uint8)
        scales = rng.uniform(1e-3, 1e-2, size=(array.shape[0], array.shape[1] // block, 2)).astype(np.float16)
        blocks[..., :4] = scales.view(np.uint8)  # d and dmin, the super-block scales
        return blocks.reshape(array.shape[0], -1), qtype


def build_zimage_gguf(path: str | os.PathLike[str], size: str | Mapping[str, Any] = "tiny", *,
                      formats: Callable[[str, tuple[int, ...]], str] = mixed_format, seed: int = 0,
                      prefix: str = "model.diffusion_model.",
                      config_folder: str | os.PathLike[str] | None = None) -> Path:
    """Write a random-weight ``ZImageTransformer2DModel`` to the GGUF file ``path`` in
    Z-Image's original layout (``prefix`` as ComfyUI writes it), each tensor in the format
    ``formats(name, shape)`` gives; ``config_folder`` receives the diffusers config.json."""
    from diffusers import ZImageTransformer2DModel

    return build_gguf(ZImageTransformer2DModel, zimage_config(size), original_zimage_state, path, formats=formats,
                      seed=seed, prefix=prefix, config_folder=config_folder)


def build_flux2_gguf(path: str | os.PathLike[str], size: str | Mapping[str, Any] = "tiny", *,
                     formats: Callable[[str, tuple[int, ...]], str] = uniform_format("Q8_0"), seed: int = 0,
                     prefix: str = "", config_folder: str | os.PathLike[str] | None = None) -> Path:
    """Write a random-weight ``Flux2Transformer2DModel`` to the GGUF file ``path`` in FLUX.2's
    original layout (see :func:`build_zimage_gguf`)."""
    from diffusers import Flux2Transformer2DModel

    from .single_file import flux2_config, original_flux2_state

    return build_gguf(Flux2Transformer2DModel, flux2_config(size), original_flux2_state, path, formats=formats,
                      seed=seed, prefix=prefix, config_folder=config_folder)


def build_gguf(cls, config: Mapping[str, Any], original: Callable[..., dict[str, torch.Tensor]],
               path: str | os.PathLike[str], *, formats: Callable[[str, tuple[int, ...]], str], seed: int,
               prefix: str, config_folder: str | os.PathLike[str] | None) -> Path:
    """A random-weight ``cls(**config)``, its state put in the original layout by
    ``original(state, prefix)``, written to ``path`` with each tensor in ``formats(name, shape)``."""
    import gguf
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(**config)
    fill_random_weights(model, torch.float32, seed)
    state = original(model.state_dict(), prefix)
    rng = np.random.default_rng(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch=cls.__name__)
    for name, value in state.items():
        array, raw = encode(value, formats(name, tuple(value.shape)), rng)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if config_folder is not None:
        model.save_config(config_folder)
    return out
