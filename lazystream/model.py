"""Public entry points: build a model from a checkpoint, or attach to a built one."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .adapters import (ModelFamily, build_skeleton, default_dtype, family_of, find_blocks, library_dtype, library_of,
                       model_class, require_config)
from .checkpoint import Checkpoint
from .conversions import sources_for
from .header import TensorRecord
from .errors import OtherOffloaderError, UnavailableDeviceError
from .io import IOConfig
from .keywords import check_keywords, refuse_quantized_config
from .library_load import diffusers_arguments, diffusers_dtype, load_transformers
from . import probe
from .planner import PlanRequest, check_within_budget, make_plan, plan_builder
from .plan import StreamPlan
from .source import SourceMap
from .streamer import Streamer

_ATTR = "_lazystream"


class LazyStreamModel:
    """Namespace of :meth:`from_pretrained`; the model it returns is of its own class."""

    @staticmethod
    def from_pretrained(
        repo_or_path: str | os.PathLike,
        keep_gpu: int | str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | dict | None = None,
        subfolder: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        model_cls: type[nn.Module] | None = None,
        blocks: str | Sequence[str] | None = None,
        placement: str = "spread",
        prefetch: int = 2,
        io: IOConfig | None = None,
        max_gpu_memory: int | str | None = None,
        activation_reserve: int | str | None = None,
        load: bool = True,
        **kwargs,
    ) -> nn.Module:
        """Load a transformers or diffusers model with ``keep_gpu`` blocks resident on
        the device and every other block streamed from the safetensors shards, as the
        library's own ``from_pretrained`` loads it: a line from a model card works with
        ``keep_gpu`` added.

        A transformers model is built by transformers' own ``from_pretrained``, run on
        data-less tensors that record where each byte comes from (see
        :mod:`lazystream.library_load`): it resolves the dtype, the config and its keyword
        overrides, ``_keep_in_fp32_modules``, tied weights, ignored keys, kernels and
        ``generation_config`` exactly as it does for its own model.

        Args:
            repo_or_path: a local folder or a Hugging Face repo id.
            keep_gpu: blocks kept resident (int >= 0; more than the model has: all), or
                "auto": as many as fit max_gpu_memory with the slots and activations.
            device: default CUDA when available, else CPU.
            dtype: as the library's ``dtype`` (or ``torch_dtype``): transformers takes a
                torch.dtype, "auto" (its default), a string such as "bfloat16" or a dict
                per sub-config; diffusers a torch.dtype (default float32). Tensors stored
                in another dtype are cast as the library's own loader would
                (keep-in-fp32 modules stay float32), on the device: float8 weights
                stream as float8 bytes.
            subfolder, variant, revision, cache_dir, local_files_only, token: as in
                ``from_pretrained`` of transformers and diffusers.
            model_cls: the class to build, e.g. a subclass; default the config's.
            blocks: path(s) of the block lists; default found from the class.
            placement: "first" (the first keep_gpu blocks resident), "spread" (evenly
                spaced), or "cost" (the blocks that save the most predicted time; the
                first call is timed once per machine and checkpoint to calibrate it).
            prefetch: device slots for streamed blocks (>= 1).
            io: how bytes travel (threads, staging ring); see :class:`IOConfig`.
            max_gpu_memory: the budget of keep_gpu="auto", bytes or a string such as
                "6GiB"; default the free device memory less 5%.
            activation_reserve: device memory keep_gpu="auto" leaves for activations;
                default measured on the first call (until then 10% of the budget).
            load: fill the resident set now (default); else at the first call or
                ``streamer_of(model).load()`` — for components that run later.
            kwargs: the other keywords of the library's ``from_pretrained``
                (``torch_dtype``, ``attn_implementation``, ``generation_config``,
                ``output_loading_info``, config overrides, ...), honoured as the library
                honours them; those lazystream cannot honour (``device_map``,
                ``quantization_config``, ...) are refused by name, see
                :data:`lazystream.keywords.REFUSED`.

        Returns:
            An instance of the model's own class (with ``output_loading_info=True``,
            transformers': ``(model, loading_info)``). ``lazystream.streamer_of(model)``
            gives its controller (plan, stats, load/unload, session, close).

        Raises:
            ValueError: bad keep_gpu, placement, prefetch or memory size (before
                anything is read).
            UnsupportedKeywordError: a keyword lazystream cannot honour (names it).
            UnsupportedQuantizationError: the checkpoint's config or a keyword names a
                quantization method lazystream does not stream (before anything is loaded).
            DeviceMemoryError: the plan does not fit the device (with the keep_gpu that would).
            LazyStreamError: the checkpoint cannot be found or is invalid; its subclasses
                name the file and tensor.

        Example:
            >>> model = LazyStreamModel.from_pretrained("Qwen/Qwen3-8B", keep_gpu=20)
            >>> out = model.generate(input_ids.cuda(), max_new_tokens=32)
        """
        request = PlanRequest.of(keep_gpu, placement, prefetch, max_gpu_memory, activation_reserve)
        check_keywords(kwargs, "LazyStreamModel.from_pretrained")
        ckpt = Checkpoint.open(repo_or_path, subfolder=subfolder, variant=variant, revision=revision,
                               cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        try:
            config = require_config(ckpt.config, ckpt.folder)
            refuse_quantized_config(config, ckpt.folder / "config.json")
            cls = model_cls or model_class(config, ckpt.folder / "config.json")
            if library_of(cls) == "transformers":  # its quantizer builds the modules of the methods streamed
                return _from_transformers(cls, ckpt, request, repo_or_path, device=device, dtype=dtype,
                                          variant=variant, blocks=blocks, io=io, load=load, kwargs=kwargs)
            refuse_quantized_config(config, ckpt.folder / "config.json", streamed=(),
                                    why=" (lazystream streams quantized transformers checkpoints only)")
            dtype, overrides = diffusers_arguments(cls, dtype, kwargs)
            dtype = dtype or default_dtype(library_of(cls), config, ckpt)
            model = build_skeleton(cls, config, dtype, overrides)
            if hasattr(model, "register_to_config"):  # as diffusers' from_pretrained records it
                model.register_to_config(_name_or_path=repo_or_path)
            _attach(model, ckpt, request, device=device, dtype=dtype, blocks=blocks, io=io, owns_checkpoint=True,
                    built_here=True, load=load)
        except BaseException:
            ckpt.close()
            raise
        return model

    @staticmethod
    def from_single_file(
        path_or_repo_file: str | os.PathLike,
        keep_gpu: int | str,
        *,
        config: str | os.PathLike | None = None,
        subfolder: str | None = None,
        model_cls: type[nn.Module] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        config_revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        blocks: str | Sequence[str] | None = None,
        placement: str = "spread",
        prefetch: int = 2,
        io: IOConfig | None = None,
        max_gpu_memory: int | str | None = None,
        activation_reserve: int | str | None = None,
        load: bool = True,
        **kwargs,
    ) -> nn.Module:
        """Load a diffusers model from one safetensors file in its original layout (as
        ComfyUI and model sites ship them: original key names, fused qkv), as diffusers'
        ``Model.from_single_file`` does, with ``keep_gpu`` blocks resident and the others
        streamed from the file. Each parameter diffusers' conversion assembles (a split
        of a fused qkv, swapped halves) is read as byte runs of the file.

        Args:
            path_or_repo_file: a local file, or ``https://huggingface.co/<repo>/blob/main/<file>``
                (from the Hugging Face cache when offline).
            keep_gpu: as in :meth:`from_pretrained`.
            config: a repo id or folder holding the model's diffusers config.json (with
                ``subfolder``); default, as diffusers: the repo its key names identify,
                at the class's default subfolder (needs ``model_cls``).
            subfolder: the config's subfolder in ``config``.
            model_cls: the diffusers class; default the one the config names.
            dtype: as diffusers' from_single_file (``torch_dtype=`` too, ``dtype`` first):
                default float32; otherwise every floating tensor in dtype (its final
                ``.to(dtype)`` includes keep-in-fp32 modules), cast on the device;
                anything but a torch.dtype is float32, with diffusers' warning.
            revision: the file's revision on the hub; ``config_revision``: the config's.
            device, cache_dir, local_files_only, token, blocks, placement, prefetch, io,
                max_gpu_memory, activation_reserve, load: as in :meth:`from_pretrained`.
            kwargs: keyword arguments of diffusers' from_single_file: the conversion
                function's, and model config values; those lazystream cannot honour
                (``device_map``, ``original_config``, ...) are refused by name.
                ``quantization_config``: ``GGUFQuantizationConfig(compute_dtype=...)`` for a
                ``.gguf`` file (its quantized tensors stream as stored; diffusers' GGUF
                modules dequantize them in their forward); any other method is refused.

        Returns:
            An instance of the model's class; ``lazystream.streamer_of(model)`` controls it.

        Raises:
            ValueError: bad keep_gpu, placement, prefetch or memory size.
            CheckpointNotFoundError, UnsupportedFormatError: no such file, or neither
                safetensors nor GGUF.
            UnsupportedQuantizationError: a quantization method other than GGUF, or a GGUF
                file without its GGUFQuantizationConfig.
            UnknownModelClassError: no class given or named, or one diffusers cannot load
                from a single file.
            UnsupportedConversionError: diffusers computes some values at load (names them).

        Example:
            >>> model = LazyStreamModel.from_single_file(
            ...     "z_image_turbo_bf16.safetensors", keep_gpu=22, config="Tongyi-MAI/Z-Image-Turbo",
            ...     subfolder="transformer", dtype=torch.bfloat16)
        """
        from .single_file import open_single_file

        request = PlanRequest.of(keep_gpu, placement, prefetch, max_gpu_memory, activation_reserve)
        quantization_config = kwargs.pop("quantization_config", None)  # GGUF: see single_file._quantizer
        check_keywords(kwargs, "LazyStreamModel.from_single_file")
        dtype = diffusers_dtype(dtype, kwargs.pop("torch_dtype", None))
        opened = open_single_file(path_or_repo_file, config=config, subfolder=subfolder, model_cls=model_cls,
                                  dtype=dtype, quantization_config=quantization_config, revision=revision, config_revision=config_revision,
                                  cache_dir=cache_dir, local_files_only=local_files_only, token=token, **kwargs)
        try:
            _attach(opened.model, opened.checkpoint, request, device=device, dtype=opened.dtype, blocks=blocks, io=io,
                    owns_checkpoint=True, load=load, sources=opened.sources, family=opened.family)
        except BaseException:
            opened.checkpoint.close()
            raise
        return opened.model


def _from_transformers(cls, ckpt: Checkpoint, request: PlanRequest, repo_or_path, *, device, dtype, variant, blocks,
                       io, load, kwargs: dict):
    """transformers' from_pretrained builds the model (see load_transformers); it is then
    attached with the sources and dtypes the library gave each tensor."""
    kwargs = dict(kwargs)
    output_loading_info = kwargs.pop("output_loading_info", False)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if variant is not None:
        kwargs["variant"] = variant
    loaded = load_transformers(cls, ckpt, resolve_device(device).type, kwargs)
    # The library names the model by what it was given (a repo id), not by the snapshot folder.
    loaded.model.config.name_or_path = os.fspath(repo_or_path)
    _attach(loaded.model, ckpt, request, device=device, dtype=loaded.dtype, blocks=blocks, io=io,
            owns_checkpoint=True, load=load, sources=loaded.sources, family=loaded.family)
    return (loaded.model, loaded.loading_info) if output_loading_info else loaded.model


def attach(
    model: nn.Module,
    repo_or_path: str | os.PathLike | Checkpoint,
    keep_gpu: int | str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    blocks: str | Sequence[str] | None = None,
    placement: str = "spread",
    prefetch: int = 2,
    io: IOConfig | None = None,
    max_gpu_memory: int | str | None = None,
    activation_reserve: int | str | None = None,
    **resolve_kwargs,
) -> nn.Module:
    """Stream the weights of ``repo_or_path`` into an already built ``model`` (for
    example built on the meta device, or a subclass). Its parameters found in the
    checkpoint are dropped from host memory; the others (and buffers) stay resident.

    Arguments as in :meth:`LazyStreamModel.from_pretrained`; ``resolve_kwargs`` are
    subfolder, variant, revision, cache_dir, token, local_files_only. ``dtype`` (default
    the library's: transformers "auto") is resolved by the library's own rules
    (:func:`lazystream.adapters.library_dtype`).

    Returns:
        ``model`` itself.
    """
    request = PlanRequest.of(keep_gpu, placement, prefetch, max_gpu_memory, activation_reserve)
    owns = not isinstance(repo_or_path, Checkpoint)
    ckpt = Checkpoint.open(repo_or_path, **resolve_kwargs) if owns else repo_or_path
    try:
        if ckpt.config is not None:
            refuse_quantized_config(ckpt.config, ckpt.folder / "config.json", streamed=(),
                                    why=" (attach streams into a model built without the library's quantizer: load "
                                        "it with LazyStreamModel.from_pretrained, whose library builds its "
                                        "quantized modules)")
        _attach(model, ckpt, request, device=device, dtype=library_dtype(library_of(model), dtype, ckpt.config, ckpt),
                blocks=blocks, io=io, owns_checkpoint=owns)
    except BaseException:
        if owns:
            ckpt.close()
        raise
    return model


def streamer_of(model: nn.Module) -> Streamer:
    """The :class:`Streamer` controlling a model loaded by lazystream."""
    streamer = getattr(model, _ATTR, None)
    if streamer is None:
        raise ValueError(f"this {type(model).__name__} was not loaded by lazystream")
    return streamer


def checkpoint_dtype(ckpt: Mapping[str, TensorRecord]) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes, float8 aside (no model
    can be built in it); float32 if none. Loading without ``dtype=`` follows the model's
    library instead (see :func:`lazystream.adapters.default_dtype`)."""
    return default_dtype("torch", None, ckpt)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (default CUDA when available, else the CPU); a CUDA
    device gets its index.

    Raises:
        UnavailableDeviceError: not a device name, or a CUDA device this machine lacks
            (checked here: torch would fail later with an AssertionError or a bad ordinal).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UnavailableDeviceError(
            f"device={device!r} is not a device torch knows; expected e.g. 'cuda', 'cuda:1' or 'cpu'"
        ) from None
    if resolved.type != "cuda":
        return resolved
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if resolved.index is None and count:
        return torch.device("cuda", torch.cuda.current_device())
    if resolved.index is None or resolved.index >= count:
        why = (f"this torch build ({torch.__version__}) has no CUDA" if torch.version.cuda is None
               else "torch finds no CUDA device (driver, CUDA_VISIBLE_DEVICES)" if count == 0
               else f"this machine has {count} CUDA device(s)")
        available = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
        raise UnavailableDeviceError(
            f"device={str(device)!r} is not available: {why}; available here: {available}. "
            "Pass one of those, or leave the device unset (CUDA when available, else the CPU)"
        )
    return resolved


def make_model_plan(model: nn.Module, records: Mapping[str, TensorRecord], request: PlanRequest, *,
                    device: torch.device, dtype: torch.dtype, blocks, built_here: bool, measure: bool,
                    checkpoint_id: str, shard: Path | None, sources: SourceMap | None = None,
                    family: ModelFamily | None = None):
    """The plan for ``model`` and, when a calibration call is still needed, the callback
    that re-plans with its result. ``measure``: run the bandwidth probe (cached per
    machine; ``shard`` is a local file to time reads of) even where the plan does not
    need it, for its predicted time. ``sources`` and ``family``: a loader's own (a
    single-file conversion's), instead of those of the model's library for ``records``."""
    build = plan_builder(model, sources if sources is not None else sources_for(model, records),
                         find_blocks(model, blocks), dtype=dtype,
                         family=family or family_of(model, dtype, built_here=built_here), device=device)
    return plan_with(build, request, device=device, dtype=dtype, measure=measure, checkpoint_id=checkpoint_id,
                     shard=shard)


def plan_with(build, request: PlanRequest, *, device: torch.device, dtype: torch.dtype, measure: bool,
              checkpoint_id: str, shard: Path | None, casts: Mapping[str, tuple[torch.dtype, ...]] | None = None,
              held: int = 0):
    """make_model_plan with the tensors already matched (``build`` from plan_builder), on
    ``device`` and, after a ``.to()`` of the model, with each tensor's ``casts``. ``held``:
    device bytes the model holds on ``device`` now, given back before the new plan loads."""
    build = functools.partial(build, on=device, casts=casts, default=dtype)
    if not (measure or request.keep_gpu == "auto" or request.placement == "cost"):
        return build(keep_gpu=request.keep_gpu, placement=request.placement, prefetch=request.prefetch), None
    bw = probe.bandwidth(device, shard)
    cache = probe.calibration_path(device, checkpoint_id, dtype)
    calibration = probe.load_calibration(cache)
    plan = make_plan(request, build, device=device, bandwidth=bw, calibration=calibration, held=held)
    if calibration is not None or not request.needs_calibration:
        return plan, None

    def on_calibrated(measured: probe.Calibration) -> StreamPlan:
        probe.save_calibration(cache, measured)
        # Called at the end of the first call, with ``plan`` loaded on the device; the new
        # plan replaces it (freed before the new one loads).
        return make_plan(request, build, device=device, bandwidth=bw, calibration=measured, held=plan.device_bytes)

    return plan, on_calibrated


def checkpoint_id(ckpt: Checkpoint) -> str:
    """Names one checkpoint on this machine (its shards' paths and sizes)."""
    return "|".join(f"{p.resolve()}:{p.stat().st_size}" for p in sorted(ckpt.shard_paths))


def _attach(model, ckpt, request: PlanRequest, *, device, dtype, blocks, io, owns_checkpoint,
            built_here=False, load=True, sources=None, family=None) -> None:
    _refuse_other_offloaders(model)
    device = resolve_device(device)
    build = plan_builder(model, sources if sources is not None else sources_for(model, ckpt), find_blocks(model, blocks),
                         dtype=dtype, family=family or family_of(model, dtype, built_here=built_here), device=device)
    made: list[Streamer] = []  # a re-plan of a loaded model (a .to()) counts what it holds as free
    ident = checkpoint_id(ckpt)

    def replan(*, device: torch.device, dtype: torch.dtype, casts=None):
        held = made[0].stats().device_bytes if made and made[0].device == device else 0
        return plan_with(build, request, measure=False, checkpoint_id=ident, shard=ckpt.shard_paths[0],
                         device=device, dtype=dtype, casts=casts, held=held)

    plan, on_calibrated = replan(device=device, dtype=dtype)
    check_within_budget(plan, request)
    streamer = Streamer(model, ckpt, plan, io or IOConfig(), owns_checkpoint=owns_checkpoint,
                        on_calibrated=on_calibrated, replan=replan)
    made.append(streamer)
    try:
        if load:
            streamer.load()
    except BaseException:
        streamer.close()
        raise
    # First in the model's attributes, so that copying or pickling the model meets the
    # streamer's refusal before it has copied a single weight.
    attributes = dict(model.__dict__)
    model.__dict__.clear()
    model.__dict__[_ATTR] = streamer
    model.__dict__.update(attributes)


def _refuse_other_offloaders(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, _ATTR, None) is not None:
            raise OtherOffloaderError(f"module {name or type(model).__name__!r} is already streamed by lazystream")
        diffusers_hooks = getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
        for attr, owner, present in (("_hf_hook", "accelerate", hasattr(module, "_hf_hook")),
                                     ("_diffusers_hook", "diffusers", bool(diffusers_hooks))):
            if present:
                raise OtherOffloaderError(
                    f"module {name or type(model).__name__!r} already carries {owner} offloading hooks ({attr}); "
                    "lazystream would fight them over the weights: load the model without that offloading"
                )
