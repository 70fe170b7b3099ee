"""Single-file checkpoints (as ComfyUI and most model sites ship them: original key
names, fused projections), loaded as diffusers' ``from_single_file`` loads them: the
same config resolution, conversion function and dtype rules, each parameter's value
read as byte runs of the one file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import ModelFamily, build_skeleton
from .checkpoint import Checkpoint
from .conversions import single_file_sources
from .errors import UnknownModelClassError
from .header import TensorRecord
from .resolve import resolve_single_file
from .source import SourceMap, trace


@dataclass
class SingleFileModel:
    """A single file's model ready to attach: the skeleton, each parameter's source and
    the dtype rules (what :func:`convert_single_file` gives), and the open checkpoint
    (what :func:`open_single_file` adds)."""

    model: nn.Module
    sources: SourceMap
    family: ModelFamily
    dtype: torch.dtype
    checkpoint: Checkpoint | None = None


def open_single_file(
    path_or_url: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    quantization_config: Any = None,
    **kwargs: Any,
) -> SingleFileModel:
    """Resolve and open the file, then :func:`convert_single_file` its tensors (see
    :meth:`lazystream.LazyStreamModel.from_single_file` for the arguments).

    Raises:
        UnsupportedQuantizationError: a quantization method other than GGUF (before the
            file is looked for).
        CheckpointNotFoundError, UnsupportedFormatError: no such file, or neither
            safetensors nor GGUF.
        And those of :func:`convert_single_file`.
    """
    _refuse_other_quantization(quantization_config)
    ckpt = Checkpoint(resolve_single_file(path_or_url, revision=revision, cache_dir=cache_dir, token=token,
                                          local_files_only=local_files_only))
    try:
        opened = convert_single_file(ckpt, origin=path_or_url, cache_dir=cache_dir, local_files_only=local_files_only,
                                     token=token, quantization_config=quantization_config, **kwargs)
    except BaseException:
        ckpt.close()
        raise
    opened.checkpoint = ckpt
    return opened


def convert_single_file(
    records: Mapping[str, TensorRecord],
    *,
    origin: str | os.PathLike,
    config: str | os.PathLike | None = None,
    subfolder: str | None = None,
    model_cls: type[nn.Module] | None = None,
    dtype: torch.dtype | None = None,
    config_revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    quantization_config: Any = None,
    **kwargs: Any,
) -> SingleFileModel:
    """Resolve the model config as diffusers' ``from_single_file`` does, build the
    skeleton, and trace diffusers' conversion of ``records`` (the file's tensors, from
    ``origin``: named in errors) into each parameter's source. Reads headers only.

    ``quantization_config``: diffusers' ``GGUFQuantizationConfig`` (for a GGUF file): the
    skeleton gets diffusers' GGUF modules, and each quantized tensor streams as stored.

    Raises:
        UnknownModelClassError: neither model_cls nor a config names a class diffusers
            loads from single files.
        UnsupportedConversionError: the conversion computes values (not byte runs).
        UnsupportedQuantizationError: a quantization method other than GGUF, or a GGUF
            file without its GGUFQuantizationConfig.
    """
    from diffusers.loaders.single_file_model import (
        SINGLE_FILE_LOADABLE_CLASSES,
        _get_mapping_function_kwargs,
        _get_single_file_loadable_mapping_class,
    )
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    if config is None:
        if model_cls is None:
            raise UnknownModelClassError(
                f"{origin}: a single-file checkpoint does not name its model class; pass model_cls= "
                "(e.g. ZImageTransformer2DModel) or config= (a repo or folder whose config.json names it)",
                path=origin,
            )
        found = fetch_diffusers_config({name: trace(rec) for name, rec in records.items()})  # from names, shapes
        config = found["pretrained_model_name_or_path"]
        mapping = SINGLE_FILE_LOADABLE_CLASSES.get(_get_single_file_loadable_mapping_class(model_cls) or "", {})
        subfolder = mapping.get("default_subfolder") or subfolder or found.get("subfolder")
    model_config, model_cls = _model_config(os.fspath(config), subfolder, model_cls, config_revision,
                                            cache_dir, local_files_only, token, kwargs)
    mapping_name = _get_single_file_loadable_mapping_class(model_cls)
    if mapping_name is None:
        raise UnknownModelClassError(
            f"{model_cls.__name__} has no single-file conversion in diffusers (as installed); it loads "
            f"{', '.join(SINGLE_FILE_LOADABLE_CLASSES)} from single files",
            path=origin,
        )
    convert = SINGLE_FILE_LOADABLE_CLASSES[mapping_name]["checkpoint_mapping_fn"]
    convert_kwargs = _get_mapping_function_kwargs(convert, **kwargs)
    quantizer = _quantizer(quantization_config, records, origin)
    if quantizer is not None:
        return _quantized(model_cls, model_config, records, convert, convert_kwargs, quantizer, dtype)
    # diffusers builds the model in torch's default dtype, loads each tensor cast to
    # dtype (or to its parameter's dtype without one), then casts the whole model with
    # .to(dtype): keep-in-fp32 modules and floating buffers end in dtype too.
    model = build_skeleton(model_cls, model_config, torch.get_default_dtype())
    if dtype is not None:
        nn.Module.to(model, dtype)  # nn.Module's: ModelMixin.to warns about keep-in-fp32 modules
    sources = single_file_sources(
        model, records, lambda checkpoint: convert(config=model_config, checkpoint=checkpoint, **convert_kwargs),
        ignored=getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return SingleFileModel(model, sources, ModelFamily("diffusers", ()), dtype or torch.get_default_dtype())


def _quantizer(quantization_config: Any, records: Mapping[str, TensorRecord], origin) -> Any:
    """diffusers' own quantizer for a GGUF ``quantization_config`` (None without one);
    any other method is refused by name."""
    from .gguf import refuse_unquantized_gguf

    if quantization_config is None:
        refuse_unquantized_gguf(records, origin)
        return None
    _refuse_other_quantization(quantization_config)
    from diffusers.quantizers import DiffusersAutoQuantizer

    quantizer = DiffusersAutoQuantizer.from_config(quantization_config)
    quantizer.validate_environment()
    return quantizer


def _refuse_other_quantization(quantization_config: Any) -> None:
    from .keywords import quantization_method, refuse_quantization

    if quantization_config is not None and quantization_method(quantization_config) != "gguf":
        refuse_quantization(quantization_config, "LazyStreamModel.from_single_file(quantization_config=...)",
                            keyword=True)


def _quantized(model_cls, model_config: dict, records: Mapping[str, TensorRecord], convert, convert_kwargs,
               quantizer, dtype: torch.dtype | None) -> SingleFileModel:
    """The GGUF path of diffusers' from_single_file: the model stays in torch's default
    dtype (no final ``.to``), each plain tensor loads cast to the quantizer's dtype (float32
    in keep-in-fp32 modules), and quantized weights load as stored into GGUF modules."""
    from .gguf import quantize_skeleton

    dtype = quantizer.update_torch_dtype(dtype)
    model = build_skeleton(model_cls, model_config, torch.get_default_dtype())
    sources = single_file_sources(
        model, records, lambda checkpoint: convert(config=model_config, checkpoint=checkpoint, **convert_kwargs),
        ignored=getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    sources = quantize_skeleton(model, sources, records, quantizer)
    keep = tuple(m for m in (model_cls._keep_in_fp32_modules or ()) if m is not None)
    return SingleFileModel(model, sources, ModelFamily("diffusers", keep), dtype)


def _model_config(config: str, subfolder: str | None, model_cls: type[nn.Module] | None, config_revision,
                  cache_dir, local_files_only: bool, token, kwargs: Mapping[str, Any]) -> tuple[dict, type[nn.Module]]:
    """The model config as diffusers' from_single_file loads it (with the model's own
    keyword arguments of ``kwargs`` merged in), and the class it names."""
    import diffusers

    from .resolve import is_offline

    loader = model_cls if model_cls is not None else _any_model_config()
    model_config = dict(loader.load_config(config, subfolder=subfolder, local_files_only=is_offline(local_files_only),
                                           token=token, revision=config_revision, cache_dir=cache_dir))
    if model_cls is None:
        name = model_config.get("_class_name")
        model_cls = getattr(diffusers, str(name), None)
        if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
            raise UnknownModelClassError(
                f"the config of {config!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
                + f" names model class {name!r}, which diffusers (as installed) does not provide; pass model_cls=",
                path=config,
            )
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES, _get_single_file_loadable_mapping_class

    mapping = SINGLE_FILE_LOADABLE_CLASSES.get(_get_single_file_loadable_mapping_class(model_cls) or "", {})
    kwargs = dict(kwargs)
    for legacy, new in mapping.get("legacy_kwargs", {}).items():
        if legacy in kwargs:
            kwargs[new] = kwargs.pop(legacy)
    expected, optional = model_cls._get_signature_keys(model_cls)
    model_config.update({k: v for k, v in kwargs.items() if k in expected or k in optional})
    return model_config, model_cls


def _any_model_config() -> type:
    """A ConfigMixin that reads a diffusers model's config.json before its class is known."""
    import diffusers
    from diffusers.configuration_utils import ConfigMixin

    return type("ModelConfig", (ConfigMixin,), {"config_name": diffusers.ModelMixin.config_name})
