"""LazyStreamPipeline.from_pretrained: diffusers assembles the pipeline, with the streamed
components passed to it as objects, so its ``__init__`` derives everything from them."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..gguf import gguf_component_configs
from ..io import IOConfig
from ..model import LazyStreamModel, resolve_device, streamer_of
from ..plan import check_args
from .keywords import component_dtype, refuse_keywords, refuse_streamed_quantization, resolve_dtype
from .phases import Phases

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_STREAMABLE = ("transformers", "diffusers")


class LazyStreamPipeline:
    """Namespace of :meth:`from_pretrained`; the pipeline it returns is of the library's class."""

    @staticmethod
    def from_pretrained(
        repo_or_path: str | os.PathLike,
        keep_gpu: Mapping[str, int | str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
        torch_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
        pipeline_cls: type[DiffusionPipeline] | None = None,
        phases: Sequence[str] | None = None,
        single_files: Mapping[str, str | os.PathLike] | None = None,
        placement: str = "spread",
        prefetch: int = 2,
        io: IOConfig | None = None,
        max_gpu_memory: int | str | None = None,
        activation_reserve: int | str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **pipeline_kwargs: Any,
    ) -> DiffusionPipeline:
        """Load a diffusers pipeline whose components named in ``keep_gpu`` are streamed by
        lazystream, each with that many blocks resident, and whose other components
        (VAE, scheduler, tokenizer) are loaded by diffusers and moved to the device.

        The pipeline is assembled by diffusers' own ``pipeline_cls.from_pretrained`` with
        the streamed components passed in as objects, so what its ``__init__`` derives
        from them (``vae_scale_factor``, ``default_sample_size``, image processors) is the
        library's. Streamed components take turns on the device (see :class:`Phases`):
        peak device memory is the largest phase plus the small components, not the sum.

        Args:
            repo_or_path: a local folder or a Hugging Face repo id holding model_index.json.
            keep_gpu: component name -> blocks kept resident, an int or "auto", e.g.
                ``{"transformer": 22, "text_encoder": 20}``. Each component must be a
                transformers or diffusers model.
            device: default CUDA when available, else CPU.
            dtype, torch_dtype: as in diffusers (``torch_dtype`` its deprecated alias): a
                torch.dtype for every component, or a dict per component with a
                ``"default"``, e.g. ``{"transformer": torch.bfloat16, "default": torch.float32}``;
                each streamed component gets the dtype diffusers would give its loader.
            pipeline_cls: default the class model_index.json names.
            phases: the components whose calls begin a phase, in the order the pipeline
                runs them; default its ``model_cpu_offload_seq``. A component outside
                them (a ControlNet called at every step) runs inside the current phase.
            single_files: component name (one of ``keep_gpu``) -> a single-file checkpoint
                in the original layout (a path, or a hub file URL) to stream instead of
                the repo's weights, as :meth:`LazyStreamModel.from_single_file` with the
                repo's subfolder as its config; e.g. ``{"transformer": "z_image_turbo_bf16.safetensors"}``.
                A GGUF file takes ``quantization_config=GGUFQuantizationConfig(compute_dtype=...)``
                (given here; it goes to the GGUF files' loads, not to diffusers' pipeline loader).
            placement, prefetch, io: as in :meth:`LazyStreamModel.from_pretrained`, for
                every streamed component.
            max_gpu_memory, activation_reserve: the budget of each "auto" component, as
                in :meth:`LazyStreamModel.from_pretrained`. Phases do not overlap, so each
                component gets the whole budget; the default (the free device memory)
                is read as the component loads, with the small components on the
                device and the other streamed ones unloaded.
            variant, revision, cache_dir, local_files_only, token: as in ``from_pretrained``
                of diffusers.
            pipeline_kwargs: the other keywords of diffusers' ``from_pretrained``, passed on
                to it: component objects, pipeline arguments, ``quantization_config`` (of
                components diffusers loads), ``use_safetensors``... Those lazystream cannot
                honour are refused (see ``lazystream.pipeline.keywords.REFUSED``).

        Returns:
            The pipeline, an instance of (a subclass bearing the name of) its class, whose
            ``__call__`` also ends the last phase. ``lazystream.pipeline.phases_of(pipe)``
            gives its :class:`Phases` (streamers, per-phase stats, unload, close).

        Raises:
            ValueError: a bad keep_gpu, placement, prefetch or phases, or a keep_gpu name
                that is no streamable component of the pipeline (before any weight is read).
            UnsupportedKeywordError: a keyword lazystream cannot honour (``device_map``...).
            UnsupportedQuantizationError: ``quantization_config`` quantizes a streamed component.
            LazyStreamError: a streamed component's checkpoint is missing or invalid.

        Example:
            >>> pipe = LazyStreamPipeline.from_pretrained(
            ...     "Tongyi-MAI/Z-Image-Turbo", keep_gpu={"transformer": 22, "text_encoder": 20},
            ...     torch_dtype=torch.bfloat16)
            >>> image = pipe("a lighthouse at dawn", num_inference_steps=9, guidance_scale=0.0).images[0]
        """
        import diffusers

        names = _check_keep_gpu(keep_gpu, placement, prefetch, pipeline_kwargs)
        refuse_keywords(pipeline_kwargs)
        dtype = resolve_dtype(dtype, torch_dtype)
        single_files = dict(single_files or {})
        if not set(single_files) <= set(names):
            raise ValueError(f"single_files names {sorted(set(single_files) - set(names))}, which keep_gpu does not "
                             "stream; give each single-file component a keep_gpu too")
        hub = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
        index = (pipeline_cls or diffusers.DiffusionPipeline).load_config(repo_or_path, **hub)
        if pipeline_cls is None:
            pipeline_cls = _pipeline_class(index, repo_or_path)
        classes = {name: _component_class(index, name, repo_or_path) for name in names}
        gguf_configs = gguf_component_configs(pipeline_kwargs, single_files)  # GGUF files' own loads take it
        refuse_streamed_quantization(pipeline_kwargs.get("quantization_config"), classes)
        order = _phase_order(phases, pipeline_cls, index, repo_or_path)
        device = resolve_device(device)
        library_kwargs = {"variant": variant, **hub, **pipeline_kwargs, **({} if dtype is None else {"dtype": dtype})}

        # diffusers loads the other components first and moves them to the device, so
        # that an "auto" component's default budget is read with them there.
        others = pipeline_cls.from_pretrained(repo_or_path, **{name: None for name in names}, **library_kwargs)
        others.to(device)
        # Only the first phase's component fills its resident set now; the others load
        # when their phase starts, so loading never holds two at once.
        first = next((name for name in order if name in names), None)
        streamed: dict[str, nn.Module] = {}
        try:
            for name in sorted(names, key=lambda n: n == first):
                common = dict(device=device, dtype=component_dtype(dtype, name), model_cls=classes[name],
                              placement=placement, prefetch=prefetch, io=io, max_gpu_memory=max_gpu_memory,
                              activation_reserve=activation_reserve, load=name == first, cache_dir=cache_dir,
                              local_files_only=local_files_only, token=token)
                if name in single_files:
                    streamed[name] = LazyStreamModel.from_single_file(
                        single_files[name], keep_gpu[name], config=os.fspath(repo_or_path), subfolder=name,
                        config_revision=revision, quantization_config=gguf_configs.get(name), **common)
                else:
                    streamed[name] = LazyStreamModel.from_pretrained(
                        repo_or_path, keep_gpu[name], subfolder=name, variant=variant, revision=revision, **common)
            # Every component passed as an object: diffusers reads model_index.json and
            # builds the pipeline from them, loading, moving and casting nothing.
            pipe = pipeline_cls.from_pretrained(repo_or_path, **{**library_kwargs, **others.components, **streamed})
            Phases(pipe, streamed, order, device)
        except BaseException:
            for model in streamed.values():
                streamer_of(model).close()
            raise
        return pipe


def _check_keep_gpu(keep_gpu: object, placement: str, prefetch: int, pipeline_kwargs: Mapping[str, Any]) -> list[str]:
    if not isinstance(keep_gpu, Mapping) or not keep_gpu:
        raise ValueError(
            f"keep_gpu must map component names to blocks kept resident, e.g. {{'transformer': 22}}, got {keep_gpu!r}")
    for name, value in keep_gpu.items():
        if not isinstance(name, str):
            raise ValueError(f"keep_gpu keys must be component names (str), got {name!r}")
        if name in pipeline_kwargs:
            raise ValueError(f"component {name!r} is both in keep_gpu and passed as {name}=; give it once")
        check_args(value, placement, prefetch)
    return list(keep_gpu)


def _pipeline_class(index: Mapping[str, Any], repo: str | os.PathLike) -> type[DiffusionPipeline]:
    import diffusers

    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(
            f"{repo}: model_index.json names pipeline class {index.get('_class_name')!r}, which diffusers (as "
            "installed) does not provide; pass pipeline_cls=")
    return cls


def _component_class(index: Mapping[str, Any], name: str, repo: str | os.PathLike) -> type[nn.Module]:
    """The model class model_index.json gives component ``name``, if lazystream can stream it."""
    entry = index.get(name)
    components = sorted(k for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0])
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0]):
        raise ValueError(f"keep_gpu names {name!r}, which is no component of {repo}; its components are {components}")
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name, None) if library in _STREAMABLE else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            f"keep_gpu names {name!r}, a {library}.{class_name}; lazystream streams transformers and diffusers "
            "models only: leave it out of keep_gpu to load it normally")
    return cls


def _phase_order(phases: Sequence[str] | None, cls: type[DiffusionPipeline], index: Mapping[str, Any],
                 repo: str | os.PathLike) -> list[str]:
    if phases is None:
        seq = getattr(cls, "model_cpu_offload_seq", None)
        if not seq:
            raise ValueError(f"{cls.__name__} declares no model_cpu_offload_seq: pass phases=[...], the components "
                             "in the order its __call__ runs them")
        return seq.split("->")
    if isinstance(phases, str) or not all(isinstance(name, str) and name in index for name in phases):
        raise ValueError(f"phases must be a list of component names of {repo}, got {phases!r}")
    return list(phases)
