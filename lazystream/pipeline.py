"""A whole diffusers pipeline whose large components are streamed, taking turns on the device.

A pipeline runs in phases: the text encoder, then the denoiser for every step, then the
VAE. Each phase begins at the first call of its component after another phase's; it
unloads every other streamed component before its own loads, so the device holds one
phase's memory at a time, and the end of the pipeline call ends the last phase. A
streamed component's phase spans a session of its streamer, so the end of each denoising
step prefetches the first streamed blocks of the next; the session ends before the call
that, by the component's previous phase, is the last one, so no prefetch is wasted at
the switch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .io import IOConfig
from .model import LazyStreamModel, resolve_device, streamer_of
from .plan import check_args
from .streamer import Streamer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_ATTR = "_lazystream_phases"
# The methods through which a pipeline runs a component (VAEs are called by encode/decode).
_ENTRY_POINTS = ("forward", "encode", "decode")
_STREAMABLE = ("transformers", "diffusers")


class LazyStreamPipeline:
    """Namespace of :meth:`from_pretrained`; the pipeline it returns is a subclass of its own."""

    @staticmethod
    def from_pretrained(
        repo_or_path: str | os.PathLike,
        keep_gpu: Mapping[str, int | str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
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

        Streamed components take turns on the device (see :class:`Phases`): peak device
        memory is the largest phase plus the small components, not the sum.

        Args:
            repo_or_path: a local folder or a Hugging Face repo id holding model_index.json.
            keep_gpu: component name -> blocks kept resident, an int or "auto", e.g.
                ``{"transformer": 22, "text_encoder": 20}``. Each component must be a
                transformers or diffusers model.
            device: default CUDA when available, else CPU.
            dtype: the dtype of every component (``dtype`` of diffusers); default
                each checkpoint's own.
            pipeline_cls: default the class model_index.json names.
            phases: the components whose calls begin a phase, in the order the pipeline
                runs them; default its ``model_cpu_offload_seq``. A component outside
                them (a ControlNet called at every step) runs inside the current phase.
            single_files: component name (one of ``keep_gpu``) -> a single-file checkpoint
                in the original layout (a path, or a hub file URL) to stream instead of
                the repo's weights, as :meth:`LazyStreamModel.from_single_file` with the
                repo's subfolder as its config; e.g. ``{"transformer": "z_image_turbo_bf16.safetensors"}``.
            placement, prefetch, io: as in :meth:`LazyStreamModel.from_pretrained`, for
                every streamed component.
            max_gpu_memory, activation_reserve: the budget of each "auto" component, as
                in :meth:`LazyStreamModel.from_pretrained`. Phases do not overlap, so each
                component gets the whole budget; the default (the free device memory)
                is read as the component loads, with the small components on the
                device and the other streamed ones unloaded.
            variant, revision, cache_dir, local_files_only, token: as in ``from_pretrained``
                of diffusers.
            pipeline_kwargs: passed on to ``pipeline_cls.from_pretrained`` (a component
                object to use instead of loading it, say).

        Returns:
            The pipeline, as an instance of ``Streamed<its class>``: a subclass whose
            ``__call__`` ends the last phase (also on an exception) and whose ``device`` is
            ``device`` while the streamed components are unloaded (diffusers would read the
            meta device off them). ``lazystream.pipeline.phases_of(pipe)`` gives its
            :class:`Phases` (streamers, per-phase stats, unload, close). Do not call
            ``pipe.to()`` or another offloading method on it.

        Raises:
            ValueError: a bad keep_gpu, placement, prefetch or phases, or a keep_gpu name
                that is no streamable component of the pipeline (before any weight is read).
            LazyStreamError: a streamed component's checkpoint is missing or invalid.

        Example:
            >>> pipe = LazyStreamPipeline.from_pretrained(
            ...     "Tongyi-MAI/Z-Image-Turbo", keep_gpu={"transformer": 22, "text_encoder": 20},
            ...     dtype=torch.bfloat16)
            >>> image = pipe("a lighthouse at dawn", num_inference_steps=9, guidance_scale=0.0).images[0]
        """
        import diffusers

        names = _check_keep_gpu(keep_gpu, placement, prefetch, pipeline_kwargs)
        single_files = dict(single_files or {})
        if not set(single_files) <= set(names):
            raise ValueError(f"single_files names {sorted(set(single_files) - set(names))}, which keep_gpu does not "
                             "stream; give each single-file component a keep_gpu too")
        hub = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
        index = (pipeline_cls or diffusers.DiffusionPipeline).load_config(repo_or_path, **hub)
        if pipeline_cls is None:
            pipeline_cls = _pipeline_class(index, repo_or_path)
        classes = {name: _component_class(index, name, repo_or_path) for name in names}
        order = _phase_order(phases, pipeline_cls, index, repo_or_path)
        device = resolve_device(device)

        dtype_kwargs = {} if dtype is None else {"dtype": dtype}
        pipe = pipeline_cls.from_pretrained(repo_or_path, **{name: None for name in names}, variant=variant,
                                            **dtype_kwargs, **hub, **pipeline_kwargs)
        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                component.to(device)

        # Only the first phase's component fills its resident set now; the others load
        # when their phase starts, so loading never holds two at once.
        first = next((name for name in order if name in names), None)
        streamed: dict[str, nn.Module] = {}
        try:
            for name in sorted(names, key=lambda n: n == first):
                common = dict(device=device, dtype=dtype, model_cls=classes[name], placement=placement,
                              prefetch=prefetch, io=io, max_gpu_memory=max_gpu_memory,
                              activation_reserve=activation_reserve, load=name == first, cache_dir=cache_dir,
                              local_files_only=local_files_only, token=token)
                if name in single_files:
                    streamed[name] = LazyStreamModel.from_single_file(
                        single_files[name], keep_gpu[name], config=os.fspath(repo_or_path), subfolder=name,
                        config_revision=revision, **common)
                else:
                    streamed[name] = LazyStreamModel.from_pretrained(
                        repo_or_path, keep_gpu[name], subfolder=name, variant=variant, revision=revision, **common)
            pipe.register_modules(**streamed)
            Phases(pipe, streamed, order, device)
        except BaseException:
            for model in streamed.values():
                streamer_of(model).close()
            raise
        return pipe


def phases_of(pipe: DiffusionPipeline) -> Phases:
    """The :class:`Phases` of a pipeline loaded by :meth:`LazyStreamPipeline.from_pretrained`.

    Raises:
        ValueError: the pipeline was not loaded by lazystream.
    """
    phases = getattr(pipe, _ATTR, None)
    if phases is None:
        raise ValueError(f"this {type(pipe).__name__} was not loaded by LazyStreamPipeline.from_pretrained")
    return phases


@dataclass
class PhaseStats:
    """One phase: from the first call of ``component`` after another phase's, to the next
    phase or the end of the pipeline call."""

    component: str
    calls: int = 0  # outermost calls of the component's entry points (forward, encode, decode)
    switch_seconds: float = 0.0  # unloading the other streamed components, loading this one
    seconds: float = 0.0  # the whole phase, switch included
    # Each streamed component's device bytes at the end of the phase: nothing unloads
    # inside a phase, so this is the most it held during it.
    device_bytes: dict[str, int] = field(default_factory=dict)


class Phases:
    """Makes a pipeline's streamed components take turns on the device.

    Built by :meth:`LazyStreamPipeline.from_pretrained`; get it with :func:`phases_of`.
    It wraps each component's entry points (``forward``, ``encode``, ``decode``) and
    turns the pipeline into an instance of ``Streamed<its class>``, recording what it
    changed; :meth:`close` restores it.

    ``streamers`` maps each streamed component to its :class:`~lazystream.Streamer`;
    ``order`` names the components that begin a phase; ``last_call`` lists the phases of
    the latest pipeline call; ``device`` is where the components run.

    Example:
        >>> phases = phases_of(pipe)
        >>> image = pipe("a lighthouse at dawn", num_inference_steps=9, guidance_scale=0.0).images[0]
        >>> print(phases)            # per phase: calls, time, switch time, device bytes held
        >>> phases.unload()          # free the device between images
        >>> phases.close()
    """

    def __init__(self, pipe: DiffusionPipeline, streamed: Mapping[str, nn.Module], order: Sequence[str],
                 device: torch.device):
        if getattr(pipe, _ATTR, None) is not None:
            raise ValueError(f"this {type(pipe).__name__} already has lazystream phases")
        self.pipe = pipe
        self.device = device
        self.streamers: dict[str, Streamer] = {name: streamer_of(model) for name, model in streamed.items()}
        self.order = tuple(order)
        self.last_call: list[PhaseStats] = []
        self._active: PhaseStats | None = None
        self._phase_start = 0.0
        self._call_ended = True
        self._calls: dict[str, int] = {}  # calls of each streamed component in this phase
        self._expected: dict[str, int] = {}  # ... in the phase it last ran in
        self._sessions: dict[str, contextlib.AbstractContextManager] = {}
        self._lock = threading.RLock()
        self._local = threading.local()
        self._patched: list[tuple[nn.Module, str, bool, Callable]] = []  # module, name, was in its __dict__, previous
        self._pipeline_cls = type(pipe)
        self._closed = False
        # Phase switches load and unload weights: torch.compile must run them, not trace
        # them (marked here, not at import: torch.compiler.disable imports torch._dynamo).
        self._begin_call = torch.compiler.disable(self._begin_call)
        for name, component in pipe.components.items():
            if isinstance(component, nn.Module):
                for method in _ENTRY_POINTS:
                    if callable(getattr(component, method, None)):
                        self._patch(component, method, functools.partial(self._wrap_entry, name))
        object.__setattr__(pipe, _ATTR, self)
        pipe.__class__ = _streamed_class(self._pipeline_cls)

    # -- public -------------------------------------------------------------------------

    @property
    def active(self) -> str | None:
        """The component whose phase runs now (None between pipeline calls)."""
        return None if self._active is None else self._active.component

    def unload(self) -> None:
        """End the current phase and give back the device memory of every streamed
        component; the next call of one loads it again."""
        with self._lock:
            self._end_phase()
            for streamer in self.streamers.values():
                streamer.unload()

    def close(self) -> None:
        """Restore the pipeline's class and every wrapped method, and close the streamers
        (idempotent). The streamed components cannot run afterwards."""
        with self._lock:
            if self._closed:
                return
            self._end_phase()
            self.pipe.__class__ = self._pipeline_cls
            for module, name, was_own, previous in reversed(self._patched):
                if was_own:
                    setattr(module, name, previous)
                else:
                    delattr(module, name)
            self._patched.clear()
            for streamer in self.streamers.values():
                streamer.close()
            self._closed = True

    def __str__(self) -> str:
        mib = 2**20
        lines = [f"phases {' -> '.join(self.order)}; streamed: " + ", ".join(
            f"{name} (keep_gpu={s.plan.keep_gpu}, {s.plan.device_bytes / mib:.1f} MiB)" for name, s in self.streamers.items())]
        for p in self.last_call:
            held = ", ".join(f"{name} {nbytes / mib:.1f}" for name, nbytes in p.device_bytes.items())
            lines.append(f"  {p.component}: {p.calls} call(s), {p.seconds * 1e3:.1f} ms (switch "
                         f"{p.switch_seconds * 1e3:.1f} ms); device MiB: {held}")
        return "\n".join(lines)

    # -- wrapping -----------------------------------------------------------------------

    def _patch(self, module: nn.Module, name: str, wrap: Callable[[Callable], Callable]) -> None:
        previous = getattr(module, name)
        self._patched.append((module, name, name in vars(module), previous))
        setattr(module, name, wrap(previous))

    def _wrap_entry(self, component: str, method: Callable) -> Callable:
        @functools.wraps(method)
        def entry(*args, **kwargs):
            depth = self._depths()
            if not depth.get(component):  # an entry point called by another (forward -> decode) is one call
                self._begin_call(component)
            depth[component] = depth.get(component, 0) + 1
            try:
                return method(*args, **kwargs)
            finally:
                depth[component] -= 1

        return entry

    def _depths(self) -> dict[str, int]:
        """This thread's nesting depth of entry-point calls, per component."""
        if not hasattr(self._local, "depths"):
            self._local.depths = {}
        return self._local.depths

    # -- phases -------------------------------------------------------------------------

    def _begin_call(self, component: str) -> None:
        with self._lock:
            if component in self.order and component != self.active:
                self._switch(component)
            if self._active is not None and self._active.component == component:
                self._active.calls += 1
            if component in self.streamers:
                self._follow_session(component)

    def _switch(self, component: str) -> None:
        start = time.perf_counter()
        self._end_phase()
        for name, streamer in self.streamers.items():
            if name != component:
                streamer.unload()
        if component in self.streamers:
            self.streamers[component].load()
        if self._call_ended:
            self.last_call, self._call_ended = [], False
        self._active = PhaseStats(component, switch_seconds=time.perf_counter() - start)
        self._phase_start = start
        self.last_call.append(self._active)

    def _end_call(self) -> None:
        with self._lock:
            self._end_phase()
            self._call_ended = True

    def _end_phase(self) -> None:
        if self._active is not None:
            self._active.seconds = time.perf_counter() - self._phase_start
            self._active.device_bytes = {name: s.stats().device_bytes for name, s in self.streamers.items()}
            self._active = None
        self._expected.update(self._calls)
        self._calls.clear()
        for name in list(self._sessions):
            self._sessions.pop(name).__exit__(None, None, None)

    def _follow_session(self, component: str) -> None:
        """Keep the component's session open while another call is expected in this phase:
        its end then prefetches the next call's first streamed blocks. Expected: as many
        calls as in its previous phase (unknown at first: a session throughout)."""
        calls = self._calls[component] = self._calls.get(component, 0) + 1
        wanted = calls < self._expected.get(component, math.inf)
        session = self._sessions.get(component)
        if wanted and session is None:
            session = self.streamers[component].session()
            session.__enter__()
            self._sessions[component] = session
        elif not wanted and session is not None:
            self._sessions.pop(component).__exit__(None, None, None)


_STREAMED_CLASSES: dict[type, type] = {}


def _streamed_class(cls: type[DiffusionPipeline]) -> type[DiffusionPipeline]:
    """``Streamed<cls>``: ``__call__`` ends the last phase, ``device`` is the phases' device."""
    if cls not in _STREAMED_CLASSES:
        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                phases_of(self)._end_call()

        def device(self) -> torch.device:
            return phases_of(self).device

        name = f"Streamed{cls.__name__}"
        _STREAMED_CLASSES[cls] = type(name, (cls,), {
            "__call__": __call__, "device": property(device), "__module__": __name__, "__qualname__": name,
            "__doc__": f"{cls.__name__} with components streamed by lazystream (see lazystream.pipeline.Phases).",
        })
    return _STREAMED_CLASSES[cls]


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
