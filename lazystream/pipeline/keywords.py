"""The keywords of diffusers' ``DiffusionPipeline.from_pretrained`` as a streamed pipeline
takes them: dtypes resolved by diffusers' rules, quantization of a streamed component and
placement keywords refused by name, everything else passed to diffusers."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedKeywordError
from ..keywords import refuse_quantization

# Keywords of DiffusionPipeline.from_pretrained that lazystream cannot honour with
# diffusers' effect, with what to do instead. Refused when given a value other than
# their default (None or False); every other keyword goes to diffusers.
REFUSED: dict[str, str] = {
    "device_map": "lazystream places the pipeline itself: streamed components keep keep_gpu blocks on device=, "
                  "the others move to device=. Leave device_map out and pass device=",
    "max_memory": "the device budget of a streamed component is max_gpu_memory= (with keep_gpu='auto')",
    "offload_folder": "streamed components read their weights from the checkpoint itself; leave offload_folder out",
    "offload_state_dict": "streamed components read their weights from the checkpoint itself; leave "
                          "offload_state_dict out",
    "custom_pipeline": "import the custom pipeline's class and pass it as pipeline_cls=",
    "custom_revision": "import the custom pipeline's class (at that revision) and pass it as pipeline_cls=",
    "load_connected_pipeline": "load each connected pipeline with its own LazyStreamPipeline.from_pretrained",
    "force_download": "lazystream resolves the streamed components' files from the Hugging Face cache; download "
                      "them again first (huggingface_hub.snapshot_download(repo, force_download=True))",
    "proxies": "lazystream resolves the streamed components' files without proxies; download the repo first "
               "(huggingface_hub.snapshot_download(repo, proxies=...)) and load it offline",
}


def refuse_keywords(kwargs: Mapping[str, Any]) -> None:
    """Raise UnsupportedKeywordError for the first keyword of ``kwargs`` that
    :data:`REFUSED` names, with a value other than its default."""
    for name, instead in REFUSED.items():
        if kwargs.get(name) not in (None, False):
            raise UnsupportedKeywordError(
                f"LazyStreamPipeline.from_pretrained cannot honour {name}={kwargs[name]!r}: {instead}")


def resolve_dtype(dtype: Any, torch_dtype: Any) -> Any:
    """``dtype`` and its deprecated alias ``torch_dtype`` as one value, by diffusers' own
    helper (it refuses both at once and warns of ``torch_dtype``)."""
    from diffusers.utils.deprecation_utils import _resolve_dtype

    return _resolve_dtype(dtype, torch_dtype)


def component_dtype(dtype: Any, name: str) -> Any:
    """The dtype ``DiffusionPipeline.from_pretrained`` gives component ``name``'s loader for
    the pipeline's ``dtype``: a dict gives the component's entry, else its "default", else
    float32; a value that is no torch.dtype is float32 (diffusers warns of it); None leaves
    each loader its library's default. diffusers writes this rule inline in
    ``from_pretrained`` (no helper to call); tests/test_pipeline_as_library.py checks it
    against the library's pipeline."""
    if isinstance(dtype, dict):
        return dtype.get(name, dtype.get("default", torch.float32))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return torch.float32
    return dtype


def refuse_streamed_quantization(config: Any, classes: Mapping[str, type[nn.Module]]) -> None:
    """Raise UnsupportedQuantizationError if the ``quantization_config`` of the pipeline
    applies to a streamed component (``classes``: name -> class), as diffusers' own
    ``PipelineQuantizationConfig._resolve_quant_config`` decides. Quantizing the other
    components is diffusers' business."""
    from diffusers import ModelMixin, PipelineQuantizationConfig

    if not isinstance(config, PipelineQuantizationConfig):
        return  # None, or diffusers' own ValueError when it loads
    for name, cls in classes.items():
        try:
            # A copy: resolving records the component in the config's book-keeping.
            applies = copy.deepcopy(config)._resolve_quant_config(is_diffusers=issubclass(cls, ModelMixin),
                                                                  module_name=name) is not None
        except Exception:  # noqa: BLE001 - it built the backend's config for this component (so it applies),
            applies = True  # which failed: the backend's package is missing, say
        if applies:
            # The whole config names the backend; a quant_mapping, each component's own config.
            refuse_quantization(
                config if config.quant_backend else config.quant_mapping[name],
                f"LazyStreamPipeline.from_pretrained(quantization_config=...) quantizes {name!r}, which keep_gpu "
                "streams", keyword=True,
                todo=f"Leave {name!r} out of the quantization (components_to_quantize= or quant_mapping= naming only "
                     f"the components diffusers loads), or out of keep_gpu to let diffusers quantize it")
