"""transformers' own ``from_pretrained`` run on data-less tensors; diffusers' keyword rules.

The library resolves the config and its keyword overrides, the dtype (``"auto"``,
strings, ``torch_dtype``), ``_keep_in_fp32_modules``, its conversion mapping, tied
weights, the keys it ignores, kernels and ``generation_config``, and assigns each
parameter what it would assign. lazystream hands it, instead of the tensors of the
shards, :class:`~lazystream.source.Traced` stand-ins that record where each byte comes
from; what the library assigned then says, per parameter, which byte runs to stream and
in which dtype. Only the step that reads the shards is replaced (see
:func:`_install_hook`), for the duration of one call.
"""

from __future__ import annotations

import contextvars
import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import ModelFamily
from .checkpoint import Checkpoint
from .errors import (MissingTensorsError, ShapeMismatchError, UnsupportedKeywordError, UnsupportedOperationError,
                     UnusedTensorsError)
from .keywords import library_keywords, refuse_quantizer_state
from .source import ConversionNotStreamableError, SourceMap, Traced, source_of, trace


@dataclass
class LibraryModel:
    """What the library built: the model (parameters on meta, each in the dtype the
    library gave it; buffers real), each tensor's source, the dtype rules, the main
    dtype, and the library's loading report (``output_loading_info``)."""

    model: nn.Module
    sources: SourceMap
    family: ModelFamily
    dtype: torch.dtype
    loading_info: dict


@dataclass
class _Loading:
    """One load_transformers call: its checkpoint, the device it streams to, and the
    traced tensors handed to the library."""

    ckpt: Checkpoint
    device_type: str
    traced: dict[str, Traced] | None = None


_loading: contextvars.ContextVar[_Loading | None] = contextvars.ContextVar("_loading", default=None)
_install_lock = threading.Lock()
_patched: dict[str, Any] = {}  # what _install_hook replaced, by attribute name


def load_transformers(cls: type[nn.Module], ckpt: Checkpoint, device_type: str, kwargs: Mapping[str, Any]) -> LibraryModel:
    """``cls.from_pretrained(ckpt.folder, **kwargs)`` with the shards' tensors traced.

    Raises:
        MissingTensorsError: the library would initialize some parameters at random.
        ShapeMismatchError: a stored tensor's shape differs from the parameter's.
        UnusedTensorsError: the library loads a checkpoint tensor into something
            lazystream does not stream (a module's extra state, say).
        UnsupportedConversionError: the library computes a value (names it).
    """
    _install_hook()
    loading = _Loading(ckpt, device_type)
    token = _loading.set(loading)
    try:
        # Outside inference mode: a traced tensor made in it could not be wrapped as a
        # Parameter (torch cannot set the version counter of an inference tensor).
        with torch.inference_mode(False):
            model, info = cls.from_pretrained(str(ckpt.folder), **kwargs, output_loading_info=True)
    finally:
        _loading.reset(token)
    if loading.traced is None:  # the class loads its weights by a path of its own: they are in RAM now
        raise UnsupportedOperationError(
            f"{cls.__name__} overrides transformers' _load_pretrained_model, so lazystream cannot supply its "
            "weights as byte runs of the checkpoint; build the model yourself and use lazystream.attach")
    return _take_sources(model, loading, info)


def _install_hook() -> None:
    """Replace ``PreTrainedModel._load_pretrained_model`` once by a wrapper that, inside
    :func:`load_transformers` only, passes the library traced tensors as its state dict
    (and reports mismatched shapes as lazystream does); elsewhere it is the original."""
    from transformers.modeling_utils import PreTrainedModel

    with _install_lock:
        if "_load_pretrained_model" in _patched:
            return
        original = PreTrainedModel.__dict__["_load_pretrained_model"]

        def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
            loading = _loading.get()
            if loading is None:
                return original.__func__(model, state_dict, checkpoint_files, load_config, expected_keys)
            ckpt = loading.ckpt
            # The library's quantizer takes the stored bytes (pre-quantized, its modules kept), or it is refused.
            refuse_quantizer_state(load_config.hf_quantizer, ckpt.folder / "config.json")
            # kernelize (run by from_pretrained after loading) picks kernels for this device
            # rather than for the meta device the traced parameters are on.
            model._kernels_device = loading.device_type
            loading.traced = {name: trace(rec) for name, rec in ckpt.items()}
            info, offload = original.__func__(model, dict(loading.traced), checkpoint_files, load_config,
                                              expected_keys)
            _refuse_missing(model, info)  # before the library allocates and initializes them
            if info.mismatched_keys:
                order = {n: i for i, n in enumerate(model.state_dict())}  # the first in the model's order
                name, stored, expected = min(info.mismatched_keys, key=lambda m: order.get(m[0], len(order)))
                rec = _record_named(ckpt, name)
                raise ShapeMismatchError(
                    f"{rec.file if rec else ckpt.folder}: tensor {name!r} has shape {list(stored)}, but the model's "
                    f"{type(model).__name__} expects {list(expected)}; the config and weights do not match",
                    path=rec.file if rec else ckpt.folder, tensor=name)
            return info, offload

        PreTrainedModel._load_pretrained_model = staticmethod(_load_pretrained_model)
        _patched["_load_pretrained_model"] = original


def _refuse_missing(model: nn.Module, info) -> None:
    """Raise MissingTensorsError where the library would initialize parameters at random,
    before it does (at real size, that is the whole model in RAM): its missing keys, less
    tied pairs of which one is stored, less those its own rules ignore."""
    probe = copy.copy(info)
    probe.missing_keys, probe.unexpected_keys = set(info.missing_keys), set(info.unexpected_keys)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in probe.missing_keys or source not in probe.missing_keys:
            probe.missing_keys -= {target, source}
    model._adjust_missing_and_unexpected_keys(probe)
    _raise_missing(model, probe.missing_keys)


def _raise_missing(model: nn.Module, missing) -> None:
    missing = sorted(missing or ())
    if missing:
        raise MissingTensorsError.of(type(model).__name__, missing)


def _record_named(ckpt: Checkpoint, name: str):
    return ckpt.get(name) or next((r for n, r in ckpt.items() if name.endswith("." + n) or n.endswith("." + name)),
                                  None)


def _take_sources(model: nn.Module, loading: _Loading, info: dict) -> LibraryModel:
    """Each traced tensor the library assigned becomes a source; the model gets meta
    parameters (and real, empty buffers the streamer fills) in the library's dtypes.
    A checkpoint tensor the library read but assigned to nothing lazystream streams is
    an error; one it never read (its unexpected keys, its ignore lists) is not loaded
    by the library either, and is reported as it reports it."""
    ckpt = loading.ckpt
    _raise_missing(model, info.get("missing_keys"))
    sources, failed, replaced, used = {}, {}, {}, set()
    declared: dict[str, torch.dtype] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for registry in (module._parameters, module._buffers):
            for leaf, t in list(registry.items()):
                if not isinstance(t, Traced):
                    continue
                name = f"{module_name}.{leaf}" if module_name else leaf
                if id(t) not in replaced:
                    try:
                        sources[name] = source_of(name, t)
                    except ConversionNotStreamableError as exc:
                        failed[name] = str(exc)
                    used.update(t.stored_names)
                    replaced[id(t)] = _stand_in(t, registry is module._parameters)
                registry[leaf] = replaced[id(t)]
                if registry is module._parameters:
                    declared[name] = t.dtype
    if failed:
        from .conversions import unsupported_conversion

        raise unsupported_conversion(model, failed)
    traced = loading.traced or {}
    unused = sorted(n for n, t in traced.items() if t.read and n not in used)
    if unused:
        raise UnusedTensorsError(
            f"{ckpt.folder}: transformers loads {len(unused)} checkpoint tensor(s) into {type(model).__name__} that "
            f"lazystream does not stream: {unused[:10]}" + (" ..." if len(unused) > 10 else "")
            + "; the streamed model would differ from the library's. Load it without lazystream",
            path=ckpt.folder, tensor=unused[0])
    dtype = getattr(model.config, "dtype", None) or torch.get_default_dtype()
    # What the library reports as unexpected (after its ignore lists) is reported the same way.
    return LibraryModel(model, SourceMap(sources, sorted(info.get("unexpected_keys") or ())),
                        ModelFamily("transformers", (), declared), dtype, info)


def _stand_in(t: Traced, parameter: bool) -> torch.Tensor:
    if parameter:
        return nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"),
                            requires_grad=t.requires_grad and t.dtype.is_floating_point)
    return torch.empty(t.shape, dtype=t.dtype)


def apply_quantizer(model: nn.Module, path) -> None:
    """For a plan from headers alone: the library's quantizer for the config's
    ``quantization_config`` (its environment check for this machine included), applied to
    the meta skeleton ``model`` as transformers' from_pretrained applies it, so the plan
    sees the library's quantized modules and their stored dtypes. Refused as a load
    refuses it (:func:`~lazystream.keywords.refuse_quantizer_state`)."""
    if not getattr(model.config, "quantization_config", None):
        return
    from transformers.quantizers.auto import get_hf_quantizer

    quantizer, _, _ = get_hf_quantizer(model.config, None, None, True, {})
    refuse_quantizer_state(quantizer, path)
    quantizer.preprocess_model(model=model, dtype=model.dtype, device_map=None, checkpoint_files=None,
                               use_kernels=False)
    model.hf_quantizer = quantizer


# -- diffusers: the rules ModelMixin.from_pretrained applies to its keywords -------------------


def diffusers_arguments(cls, dtype, kwargs: dict) -> tuple[torch.dtype | None, dict]:
    """``dtype`` as diffusers' ModelMixin.from_pretrained resolves it (``dtype`` over
    ``torch_dtype``; anything but a torch.dtype is float32, with the library's warning),
    and the keywords it passes to ``from_config`` as config overrides."""
    kwargs = dict(kwargs)
    dtype = diffusers_dtype(dtype, kwargs.pop("torch_dtype", None))
    if kwargs.pop("output_loading_info", False):
        raise UnsupportedKeywordError(
            f"LazyStreamModel.from_pretrained: output_loading_info=True is not supported for diffusers' "
            f"{cls.__name__}: lazystream refuses missing or mismatched tensors and warns of unused ones instead")
    from diffusers import ModelMixin

    # What ModelMixin.from_pretrained takes for itself is handled above or by check_keywords;
    # the rest goes to from_config, as the library passes it.
    own = set(library_keywords(ModelMixin.from_pretrained))
    return dtype, {k: v for k, v in kwargs.items() if k not in own}


def diffusers_dtype(dtype, torch_dtype) -> torch.dtype | None:
    """As diffusers' from_pretrained and from_single_file: ``dtype`` over ``torch_dtype``;
    anything but a torch.dtype is float32, with the library's warning."""
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is not None and not isinstance(dtype, torch.dtype):
        import warnings

        warnings.warn(f"Passed `torch_dtype` {dtype} is not a `torch.dtype`. Defaulting to `torch.float32` "
                      "(as diffusers does).", stacklevel=4)
        dtype = torch.float32
    return dtype
