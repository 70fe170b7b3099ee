"""The layouts libraries convert at load, read from the libraries themselves.

transformers 5 assembles some parameters from several stored tensors (its weight
conversion mapping: stacked MoE experts, fused gate/up projections, renamed keys);
diffusers converts single-file checkpoints with one function per model class. Both run
here on :class:`~lazystream.source.Traced` tensors, so each parameter's value comes out
as byte runs of the checkpoint, and the streamer copies those runs like any other.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from .adapters import library_of, match_prefix
from .errors import UnsupportedConversionError
from .header import TensorRecord
from .source import ConversionNotStreamableError, SourceMap, TensorSource, Traced, source_of, trace


def sources_for(model: nn.Module, records: Mapping[str, TensorRecord]) -> SourceMap:
    """Each tensor's source, named as ``model`` names it, with the conversions its
    library applies when it loads ``records``.

    Raises:
        UnsupportedConversionError: the library computes some values (not views,
            concatenations or stacks of stored bytes); the error names them.
    """
    if library_of(model) == "transformers":
        return transformers_sources(model, records)
    return SourceMap({name: TensorSource.of(rec, name) for name, rec in match_prefix(model, records).items()})


def transformers_sources(model: nn.Module, records: Mapping[str, TensorRecord]) -> SourceMap:
    """Sources as transformers' ``from_pretrained`` renames and converts the checkpoint for
    ``model``: its conversion mapping (per class and model type), base_model_prefix added
    or removed, then each converter's own operations run on traced tensors."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model, None, None)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    expected = model.state_dict(keep_vars=True)
    prefix = model.base_model_prefix
    to_load: dict[str, object] = {}
    unused: list[str] = []
    # The same steps, in the same order, as convert_and_load_state_dict_in_model.
    for key in sorted(records, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=expected)
        if renamed not in expected:
            unused.append(renamed)
            continue
        if pattern is not None:
            transform = to_load.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
        else:
            transform = to_load.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        traced = trace(records[key])
        transform.add_tensor(renamed, key, pattern, lambda traced=traced: traced)
    results: dict[str, object] = {}
    for first, transform in to_load.items():
        values = transform.convert(first, model=model, config=model.config, hf_quantizer=None, loading_info=None)
        for target, value in values.items():
            results[target] = value[0] if isinstance(value, list) else value
    return _sources(model, results, unused)


def single_file_sources(model: nn.Module, records: Mapping[str, TensorRecord],
                        convert: Callable[[dict[str, Traced]], Mapping[str, object]],
                        ignored: Iterable[str] = ()) -> SourceMap:
    """Sources as a diffusers single-file loader converts ``records``: ``convert`` is its
    checkpoint mapping function with its arguments bound (it takes and returns a state
    dict); ``ignored``: patterns of unused names the model class expects (not reported)."""
    expected = model.state_dict(keep_vars=True)
    checkpoint = {name: trace(rec) for name, rec in records.items()}
    if set(checkpoint) != set(expected):  # as diffusers' _should_convert_state_dict_to_diffusers
        checkpoint = dict(convert(checkpoint))
    unused = [name for name in checkpoint if name not in expected
              and not any(re.search(pattern, name) for pattern in ignored)]
    return _sources(model, {n: v for n, v in checkpoint.items() if n in expected}, unused)


def _sources(model: nn.Module, results: Mapping[str, object], unused: list[str]) -> SourceMap:
    sources, failed = {}, {}
    for name, value in results.items():
        try:
            sources[name] = source_of(name, value)
        except ConversionNotStreamableError as exc:
            failed[name] = str(exc)
    if failed:
        raise unsupported_conversion(model, failed)
    return SourceMap(sources, unused)


def unsupported_conversion(model: nn.Module, failed: Mapping[str, str]) -> UnsupportedConversionError:
    """The error for tensors (name -> why) the library computes at load."""
    listed = "; ".join(f"{name}: {why}" for name, why in list(failed.items())[:5])
    return UnsupportedConversionError(
        f"{type(model).__name__}: the library computes {len(failed)} tensor(s) from the checkpoint at load, which "
        f"lazystream cannot stream as byte runs of the file ({listed}"
        + (" ..." if len(failed) > 5 else "")
        + "); save the model once with save_pretrained in a layout the library loads as is, or load it "
        "without lazystream",
        tensor=next(iter(failed)),
    )
