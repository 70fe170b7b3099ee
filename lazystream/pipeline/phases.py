"""Streamed components of a diffusers pipeline taking turns on the device.

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
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..model import streamer_of
from ..streamer import Streamer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_ATTR = "_lazystream_phases"
# Each streamed component's Phases: a pipeline made by from_pipe shares the components, not the attribute.
_OF_COMPONENT: weakref.WeakKeyDictionary[nn.Module, Phases] = weakref.WeakKeyDictionary()
# The methods through which a pipeline runs a component (VAEs are called by encode/decode).
_ENTRY_POINTS = ("forward", "encode", "decode")


def phases_of(pipe: DiffusionPipeline) -> Phases:
    """The :class:`Phases` of a pipeline loaded by :meth:`LazyStreamPipeline.from_pretrained`,
    or of one made from it by ``from_pipe`` (it shares the streamed components and their phases).

    Raises:
        ValueError: the pipeline has no component streamed by LazyStreamPipeline.
    """
    phases = getattr(pipe, _ATTR, None)
    if phases is None:
        phases = next((_OF_COMPONENT[c] for c in pipe.components.values()
                       if isinstance(c, nn.Module) and c in _OF_COMPONENT), None)
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
    makes the pipeline an instance of a subclass of its class whose ``__call__`` ends the
    last phase (it bears the class's name: see :func:`_streamed_class`), recording what
    it changed; :meth:`close` restores it. A pipeline made from this one by ``from_pipe``
    (of a class or an ``AutoPipeline*``), or built from its components, shares the
    streamed components, so its calls switch the same phases (``phases_of`` gives them
    for either pipeline), and it becomes an instance of the same kind of subclass of its
    own class as it registers them (see :func:`_install_adoption`): its calls end the last
    phase too.

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
        _OF_COMPONENT.update(dict.fromkeys(streamed.values(), self))
        pipe.__class__ = _streamed_class(self._pipeline_cls)
        _install_adoption()

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
    """A subclass of ``cls`` whose ``__call__`` ends the last phase (also on an exception).

    It bears ``cls``'s name, qualified name and module, so what diffusers derives from the
    class of a pipeline (``_class_name`` in model_index.json and the config, ``repr``,
    ``AutoPipeline*.from_pipe``'s lookup by class name) is the library's.
    """
    if cls not in _STREAMED_CLASSES:
        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                phases_of(self)._end_call()

        _STREAMED_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        })
    return _STREAMED_CLASSES[cls]


_adoption_lock = threading.Lock()
_adoption_installed = False


def _install_adoption() -> None:
    """Wrap ``DiffusionPipeline.register_modules`` once (every pipeline's ``__init__``
    registers its components through it): a pipeline that registers a component streamed
    by open :class:`Phases` (made by ``from_pipe``, of a class or an ``AutoPipeline*``, or
    from ``pipe.components`` by hand) becomes an instance of :func:`_streamed_class` of its
    class, so its calls end the last phase as the original pipeline's do. Elsewhere it is
    the library's method, unchanged in effect."""
    global _adoption_installed
    from diffusers import DiffusionPipeline

    with _adoption_lock:
        if _adoption_installed:
            return
        original = DiffusionPipeline.register_modules

        @functools.wraps(original)
        def register_modules(self, **kwargs):
            original(self, **kwargs)
            cls = type(self)
            if cls in _STREAMED_CLASSES.values():
                return
            for module in kwargs.values():
                phases = _OF_COMPONENT.get(module) if isinstance(module, nn.Module) else None
                if phases is not None and not phases._closed:
                    self.__class__ = _streamed_class(cls)
                    return

        DiffusionPipeline.register_modules = register_modules
        _adoption_installed = True
