"""GGUF single files (city96's and ComfyUI's quantized diffusion models): the header read
into the same tensor records as a safetensors header, and each tensor's stored format.

A GGUF file is a header (metadata and tensor infos) followed by an aligned data section;
each tensor is one run of bytes there. Tensors stored as float32 or float16 are records
of those dtypes, as diffusers' ``load_gguf_checkpoint`` gives them plain tensors; every
other type (Q8_0, Q4_K, BF16, ...) is a record of ``uint8`` in the byte shape diffusers
gives its ``GGUFParameter`` (rows, bytes per row), and its type is the record's
``format``. The streamer copies those bytes as stored; diffusers' ``GGUFLinear``
dequantizes them on the device in its own forward.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conversions import unsupported_conversion
from .errors import HeaderError, UnsupportedFormatError, UnsupportedQuantizationError
from .header import ShardHeader, TensorRecord
from .source import SourceMap
from .weights import ParameterKind

GGUF_SUFFIX = ".gguf"

_PLAIN: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16}


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def read_gguf_header(path: str | os.PathLike) -> ShardHeader:
    """Read the tensor infos of the GGUF file at ``path`` (with the ``gguf`` package's
    reader, which maps the file and reads no tensor data).

    Raises:
        UnsupportedFormatError: the ``gguf`` package is not installed.
        HeaderError: the file does not parse as GGUF, or a tensor lies outside it.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UnsupportedFormatError(
            f"{path} is a GGUF file; reading it needs the gguf package (pip install gguf), as diffusers does",
            path=path) from None
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError) as exc:
        raise HeaderError(f"{path}: expected a GGUF file, found one that does not parse ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); the file is corrupt or not GGUF: re-download it", path=path) from None
    file_size = path.stat().st_size
    records = []
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        dtype = _PLAIN.get(kind, torch.uint8)
        nbytes = int(tensor.n_bytes)
        if tensor.data_offset + nbytes > file_size:
            raise HeaderError(f"{path}: tensor {tensor.name!r} occupies bytes [{tensor.data_offset}, "
                              f"{tensor.data_offset + nbytes}) of a {file_size}-byte file; the file is truncated: "
                              "re-download it", path=path, tensor=tensor.name)
        records.append(TensorRecord(name=tensor.name, file=path, offset=int(tensor.data_offset), nbytes=nbytes,
                                    dtype=dtype, shape=tuple(int(d) for d in tensor.data.shape),
                                    format=None if kind in _PLAIN else kind))
    records.sort(key=lambda r: (r.offset, r.nbytes))
    data_start = min((r.offset for r in records), default=file_size)
    return ShardHeader(path=path, records=tuple(records), metadata={}, data_start=data_start, file_size=file_size)


def quantize_skeleton(model: nn.Module, sources: SourceMap, records: Mapping[str, TensorRecord],
                      quantizer: Any) -> SourceMap:
    """Prepare ``model`` (on the meta device) as diffusers' GGUF quantizer prepares it for
    ``from_single_file``, and give each GGUF-stored tensor's source its parameter kind.

    ``quantizer`` is diffusers' own (``DiffusersAutoQuantizer.from_config``): it swaps each
    ``nn.Linear`` whose weight the file stores quantized for a ``GGUFLinear``; each such
    weight then becomes a meta ``GGUFParameter`` of the stored byte shape and quant type,
    after the quantizer's own shape check, as ``load_model_dict_into_meta`` assigns it.

    Raises:
        UnsupportedConversionError: a parameter made of tensors of several formats, or one
            diffusers dequantizes at load (``modules_to_not_convert``, keep-in-fp32 modules).
    """
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter
    from diffusers.utils import get_module_from_name
    from gguf import GGMLQuantizationType

    formats, failed = {}, {}
    for name, source in sources.items():
        found = {records[stored].format for stored in source.stored}
        if len(found) > 1:
            failed[name] = f"made of tensors stored as {sorted(str(f or 'plain') for f in found)}"
        elif None not in found:
            formats[name] = found.pop()
    unsupported = {f for f in formats.values() if GGMLQuantizationType[f] not in SUPPORTED_GGUF_QUANT_TYPES}
    if unsupported:  # diffusers' load_gguf_checkpoint refuses them too, before loading
        raise UnsupportedQuantizationError(
            f"GGUF quantization type(s) {sorted(unsupported)} are not supported by diffusers (as installed), which "
            f"dequantizes {sorted(t.name for t in SUPPORTED_GGUF_QUANT_TYPES)}; use a file in one of those")
    state = {name: GGUFParameter(torch.empty(sources[name].shape, dtype=torch.uint8, device="meta"),
                                 quant_type=GGMLQuantizationType[fmt]) for name, fmt in formats.items()}
    keep = [m for m in (type(model)._keep_in_fp32_modules or []) if m is not None]
    quantizer.preprocess_model(model=model, device_map=None, state_dict=state, keep_in_fp32_modules=keep)
    out = dict(sources)
    for name, param in state.items():
        if any(m in name.split(".") for m in quantizer.modules_to_not_convert):
            failed[name] = "diffusers dequantizes it at load (modules_to_not_convert or a keep-in-fp32 module)"
            continue
        module, leaf = get_module_from_name(model, name)
        skeleton = getattr(module, leaf)
        if skeleton.shape != param.shape:
            quantizer.check_quantized_param_shape(name, skeleton, param)
        module._parameters[leaf] = param
        out[name] = replace(sources[name], kind=ParameterKind.of(param, formats[name]))
    if failed:
        raise unsupported_conversion(model, failed)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return SourceMap(out, sources.unused)


def refuse_unquantized_gguf(records: Mapping[str, TensorRecord], origin) -> None:
    """diffusers loads a GGUF file only with a GGUFQuantizationConfig (without one its
    quantized tensors do not fit the model's parameters): say so before anything loads."""
    if any(rec.format is not None for rec in records.values()):
        raise UnsupportedQuantizationError(
            f"{origin} stores GGUF-quantized tensors; pass quantization_config=GGUFQuantizationConfig("
            "compute_dtype=torch.bfloat16) (from diffusers), as diffusers' from_single_file requires",
            path=origin)


def gguf_component_configs(pipeline_kwargs: dict[str, Any], single_files: Mapping[str, str | os.PathLike]
                           ) -> dict[str, Any]:
    """For a pipeline: a ``quantization_config`` that is diffusers' ``GGUFQuantizationConfig``
    (which diffusers' pipeline loader itself does not take) belongs to the loads of the
    GGUF single-file components, as users pass it to ``from_single_file``: taken out of
    ``pipeline_kwargs`` and returned as component name -> config.

    Raises:
        ValueError: no single file of the pipeline is a GGUF file.
    """
    from diffusers import GGUFQuantizationConfig

    config = pipeline_kwargs.get("quantization_config")
    if not isinstance(config, GGUFQuantizationConfig):
        return {}
    names = [name for name, path in single_files.items() if is_gguf(path)]
    if not names:
        raise ValueError("quantization_config=GGUFQuantizationConfig(...) applies to GGUF single files, and "
                         "single_files names none; pass single_files={'transformer': '<file>.gguf'}")
    del pipeline_kwargs["quantization_config"]
    return dict.fromkeys(names, config)
