"""The keywords of the libraries' own loaders, read from the installed libraries, and
lazystream's answer to each: honoured (passed to the library, or applied as it applies
them) or refused by name with what to do. Nothing is dropped."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import UnsupportedKeywordError, UnsupportedQuantizationError

_KEEP_GPU = "lazystream places the weights itself: pass keep_gpu= (and max_gpu_memory=) instead"

# What lazystream cannot honour, and what to do instead. A keyword the library takes and
# this table does not name is passed to the library (or, where lazystream builds the
# model itself, applied as the library applies it).
REFUSED: dict[str, str] = {
    "device_map": _KEEP_GPU,
    "max_memory": "lazystream plans device memory itself: pass max_gpu_memory= (and keep_gpu='auto')",
    "offload_folder": "lazystream streams from the checkpoint's own files; there is nothing to offload to disk",
    "offload_state_dict": "lazystream streams from the checkpoint's own files; there is nothing to offload",
    "offload_buffers": _KEEP_GPU,
    "state_dict": "lazystream streams from safetensors files: save the state dict with save_pretrained and "
                  "load that folder",
    "gguf_file": "lazystream streams safetensors checkpoints; GGUF files are dequantized at load by the library",
    "tp_plan": "tensor parallelism is not streamed: load without lazystream",
    "tp_size": "tensor parallelism is not streamed: load without lazystream",
    "device_mesh": "tensor parallelism is not streamed: load without lazystream",
    "distributed_config": "distributed loading is not streamed: load without lazystream",
    "parallel_config": "parallel loading is not streamed: load without lazystream",
    "adapter_kwargs": "load the base model with lazystream, then add the adapter with model.load_adapter(...)",
    "adapter_name": "load the base model with lazystream, then add the adapter with model.load_adapter(...)",
    "use_flashpack": "lazystream streams safetensors checkpoints",
    "flashpack_kwargs": "lazystream streams safetensors checkpoints",
    "original_config": "pass config= (a diffusers config folder or repo) instead of an original (LDM) config",
    "pretrained_model_link_or_path": "pass the file (or its URL) as the first argument",
}

# Values that change nothing: a refused keyword set to one of them is accepted.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "device_map": (None,), "max_memory": (None,), "offload_folder": (None,), "offload_state_dict": (None, False),
    "offload_buffers": (None, False), "state_dict": (None,), "gguf_file": (None,), "tp_plan": (None,),
    "tp_size": (None,), "device_mesh": (None,), "distributed_config": (None,), "parallel_config": (None,),
    "adapter_kwargs": (None, {}), "adapter_name": (None, "default"), "use_flashpack": (None, False),
    "flashpack_kwargs": (None, {}), "original_config": (None,),
    "pretrained_model_link_or_path": (None,),
}

# Keywords whose values lazystream can honour only in part.
_ONLY = {
    "use_safetensors": ((None, True), "lazystream reads safetensors only: leave use_safetensors unset"),
    "ignore_mismatched_sizes": ((False,), "lazystream loads every tensor as stored; a tensor of another shape is an "
                                          "error, not a random initialization"),
    "force_download": ((False,), "download the files again with `hf download --force-download`, then load"),
    "proxies": ((None,), "set HTTPS_PROXY in the environment: huggingface_hub uses it"),
    "disable_mmap": ((None, False), "choose how lazystream reads the files with io=IOConfig(...)"),
    "low_cpu_mem_usage": ((None, True), "lazystream never holds the model in host memory"),
}


def library_keywords(func: Callable) -> list[str]:
    """The keywords ``func`` (a library's ``from_pretrained`` or ``from_single_file``)
    takes: its named parameters and the names it pops from ``**kwargs``, read from the
    installed source."""
    func = inspect.unwrap(getattr(func, "__func__", func))
    params = inspect.signature(func).parameters
    # Past ``cls`` and the checkpoint's path (passed first, by position).
    names = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][2:]
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        source = ""
    popped = re.findall(r"kwargs\.(?:pop|get)\(\s*[\"'](\w+)[\"']", source)
    return list(dict.fromkeys(names + popped))


def check_keywords(kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse, by name, each keyword of ``kwargs`` lazystream cannot honour with the
    library's effect; a ``quantization_config`` names its method.

    Raises:
        UnsupportedKeywordError: the keyword, and what to do instead.
        UnsupportedQuantizationError: a ``quantization_config`` keyword.
    """
    if kwargs.get("quantization_config") is not None:
        refuse_quantization(kwargs["quantization_config"], f"{where}(quantization_config=...)", keyword=True)
    for name, value in kwargs.items():
        if name in REFUSED and not _is_neutral(value, _NEUTRAL.get(name, (None,))):
            raise UnsupportedKeywordError(f"{where}: {name}={_short(value)} is not supported by lazystream: "
                                          f"{REFUSED[name]}")
        if name in _ONLY and not _is_neutral(value, _ONLY[name][0]):
            raise UnsupportedKeywordError(f"{where}: {name}={_short(value)} is not supported by lazystream: "
                                          f"{_ONLY[name][1]}")


def _is_neutral(value: Any, neutral: Iterable[Any]) -> bool:
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- quantization ---------------------------------------------------------------------

# Quantization methods of pre-quantized transformers checkpoints whose packed weights and
# quantization state lazystream streams as stored, into the modules the library's own
# quantizer builds (its forward dequantizes on the device). fp8: fine-grained FP8
# (``weight`` float8 + ``weight_scale_inv`` per block), transformers' FP8Linear. Plain
# float8 safetensors weights without a quantization_config are cast like any other
# dtype, which is not a quantization method.
STREAMED_QUANTIZATION: tuple[str, ...] = ("fp8",)


def quantization_method(config: Any) -> str:
    """The method a ``quantization_config`` (a dict, or a library's config object) names,
    with bitsandbytes' bit width."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    method = get("quant_method", None)
    method = getattr(method, "value", method)
    if method is None:  # diffusers' PipelineQuantizationConfig, or a config of an unknown shape
        backend = get("quant_backend", None)
        method = backend if backend is not None else type(config).__name__
    method = str(method)
    if method == "bitsandbytes":
        bits = "4-bit" if get("load_in_4bit", False) or get("_load_in_4bit", False) else \
            "8-bit" if get("load_in_8bit", False) or get("_load_in_8bit", False) else None
        method += f" {bits}" if bits else ""
    return method


def refuse_quantization(config: Any, where: str, *, keyword: bool = False, path=None, todo: str | None = None,
                        streamed: tuple[str, ...] = STREAMED_QUANTIZATION) -> None:
    """Raise :class:`UnsupportedQuantizationError` for ``config`` (unless its method is
    one of ``streamed``, in a checkpoint): before anything is loaded, naming the method.
    A ``quantization_config`` keyword is always refused: the library would quantize (or
    dequantize, or re-configure) at load, computing weights on the host. ``todo``: what
    to do instead, where the default advice does not fit."""
    method = quantization_method(config)
    if method in streamed and not keyword:
        return
    names = ", ".join(f"{m} (pre-quantized transformers checkpoints)" for m in STREAMED_QUANTIZATION) + \
        ", gguf (diffusers single files, from_single_file(..., quantization_config=GGUFQuantizationConfig(...)))"
    if keyword:
        raise UnsupportedQuantizationError(
            f"{where}: quantization method {method!r} is not streamed by lazystream when given as a keyword (the "
            f"library would quantize or re-configure the weights at load, computing them on the host); streamed "
            f"methods: {names}. " + (todo or "Load the unquantized checkpoint with lazystream without "
            "quantization_config, stream a checkpoint saved pre-quantized by the library, or quantize without "
            "lazystream"), path=path)
    raise UnsupportedQuantizationError(
        f"{where}: quantization method {method!r} is not streamed by lazystream" + ("" if method in
        STREAMED_QUANTIZATION else " (loading it as plain weights would give another model)") + f"; streamed "
        f"methods: {names}. " + (todo or "Load it with the library's own from_pretrained (with device_map / "
        "offloading), or stream an unquantized (e.g. bfloat16) checkpoint of the same model"), path=path)


def refuse_quantized_config(config: Mapping | Any, path, streamed: tuple[str, ...] = STREAMED_QUANTIZATION,
                            why: str = "") -> None:
    """Refuse a checkpoint whose config (dict or config object) carries a ``quantization_config``
    of a method not in ``streamed`` (``why``: the reason it is not, where it is one lazystream
    streams elsewhere)."""
    qc = config.get("quantization_config") if isinstance(config, Mapping) else getattr(config, "quantization_config",
                                                                                        None)
    if qc:
        refuse_quantization(qc, f"{path}: the checkpoint's config has a quantization_config{why}", path=path,
                            streamed=streamed)


def refuse_quantizer_state(quantizer: Any, path) -> None:
    """Refuse where the library's quantizer, as set up for this machine, computes weights at
    load instead of taking the stored bytes: quantizing unquantized weights, or
    dequantizing (transformers dequantizes fine-grained fp8 at load without a CUDA GPU of
    compute capability 8.9 or more, or with ``dequantize=True``)."""
    if quantizer is None:
        return
    config = quantizer.quantization_config
    method = quantization_method(config)
    if method not in STREAMED_QUANTIZATION:  # refused before; a quantizer of another origin is refused here
        refuse_quantization(config, f"{path}: transformers' quantizer", path=path)
    if not quantizer.pre_quantized:
        raise UnsupportedQuantizationError(
            f"{path}: transformers would quantize the weights with {method!r} at load (computed on the host); "
            f"lazystream streams {method} checkpoints saved pre-quantized", path=path)
    if getattr(config, "dequantize", False):
        raise UnsupportedQuantizationError(
            f"{path}: transformers dequantizes this {method!r} checkpoint at load here (it does so without a CUDA "
            "GPU of compute capability 8.9 or more, or with dequantize=True): the weights would be computed on the "
            "host, not streamed as stored. Stream it where the library keeps its fp8 modules (such a GPU), or stream "
            "an unquantized checkpoint of the same model", path=path)
