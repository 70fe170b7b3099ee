"""The model's tensors as the streamer sees them, kept up to date as users change the model.

Each checkpoint tensor has one :class:`~lazystream.weights.CheckpointWeight`, registered
under every (module, attribute) that holds it (tied weights have several; peft moves a
``Linear``'s weight under ``base_layer`` without changing the module that holds it). Every
other parameter and buffer is *kept*: it lives in the model as it is and moves to the device
at load and back to the host at unload, so adapters and buffers added after load are
honoured and nothing of theirs is lost across an unload.

Users change a model between calls (peft injects adapter modules, diffusers adds hooks);
torch's global registration hooks bump a counter on every module, parameter and buffer
registered anywhere, and the streamer rescans its model when the counter moved.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .errors import OtherOffloaderError
from .plan import StreamPlan
from .source import TensorSource
from .weights import CheckpointWeight, WeightSource, set_metadata

# Bumped by torch's global hooks whenever a module of a streamed model registers a module,
# parameter or buffer: a model whose scan is older than this may have changed.
_registrations = 0
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the modules of every streamed model


def _count_registration(module: nn.Module, name: str, value: object) -> None:
    global _registrations
    # Inside a compiled forward, and for modules of no streamed model (transformers slices a
    # ModuleList into a new one on every forward), a registration changes no model of ours;
    # under torch.compile the early return keeps this hook out of graphs and guards.
    if not torch.compiler.is_compiling() and module in _watched:
        _registrations += 1


def _watch_registrations() -> None:
    if getattr(_watch_registrations, "done", False):
        return
    from torch.nn.modules import module as torch_module

    torch_module.register_module_module_registration_hook(_count_registration)
    torch_module.register_module_parameter_registration_hook(_count_registration)
    torch_module.register_module_buffer_registration_hook(_count_registration)
    _watch_registrations.done = True


Alias = tuple[nn.Module, str]
Binding = tuple[dict, str, CheckpointWeight, torch.Tensor]  # a module's _parameters, name, weight, tensor


class ModelTensors:
    """Where each checkpoint weight is registered, and the model's kept tensors.

    Made for a model and its first plan: every checkpoint parameter of ``plan`` gets its
    CheckpointWeight (reading values through ``read(source)``) under every name it has,
    and buffers the checkpoint holds get their values.
    """

    def __init__(self, model: nn.Module, plan: StreamPlan, read: Callable[[TensorSource], torch.Tensor]):
        self.model = model
        self.sources: dict[str, WeightSource] = {}
        self.weights: dict[str, CheckpointWeight] = {}
        aliases = _aliases(model)
        device = torch.device(plan.device)
        epoch = [0]  # shared by the sources: moved by every state_dict() of the model
        model.register_state_dict_pre_hook(lambda *args: epoch.__setitem__(0, epoch[0] + 1))
        for name, t in plan.placements.items():
            (module, leaf), *_ = aliases[name]
            source = self.sources[name] = WeightSource(name, functools.partial(read, t.source), t.casts, epoch=epoch,
                                                       kind=t.source.kind)
            weight = CheckpointWeight(source, t.source.shape, t.dtype, device, module._parameters[leaf].requires_grad)
            for module, leaf in aliases[name]:
                module._parameters[leaf] = weight
            self.weights[name] = weight
        with torch.inference_mode(False), torch.no_grad():
            for src in plan.checkpoint_buffers:  # buffers whose values the checkpoint holds: once, on the host
                buffer = model.get_buffer(src.name)
                buffer.data = read(src).to(buffer.dtype, copy=True)
        self._names = {id(w): name for name, w in self.weights.items()}
        self.aliases: dict[str, list[Alias]] = {}
        self.kept: list[torch.Tensor] = []  # each kept tensor once
        self._registries: list[dict] = []
        self._attributes: list[tuple[str, dict]] = []
        self.generation = 0  # bumped by every rescan: bindings made before it are stale
        self._layout = 0
        self._hooked: tuple[str, str] | None = None
        self._scanned = -1
        self.stale = False  # an alias no longer held its weight when it was bound
        _watch_registrations()
        self.rescan()

    # -- what the model holds ----------------------------------------------------------

    def refresh(self) -> bool:
        """Rescan if the model may have changed since the last scan; True if it did.

        Additions show in torch's registration counter; deletions (peft's
        ``delete_adapter``, ``del module.x``) only in the sizes of the modules' registries.
        """
        if self.stale or self._scanned != _registrations:
            self.rescan()
            return True
        layout, self._hooked = self._walk()
        if layout != self._layout:
            self.rescan()
            return True
        return False

    def rescan(self) -> None:
        aliases: dict[str, list[Alias]] = {name: [] for name in self.weights}
        kept: dict[int, torch.Tensor] = {}
        modules: dict[int, tuple[str, nn.Module]] = {}
        for prefix, module in self.model.named_modules(remove_duplicate=False):
            modules.setdefault(id(module), (prefix, module))
            for leaf, tensor in module._parameters.items():
                name = self._names.get(id(tensor))
                if name is not None:
                    aliases[name].append((module, leaf))
                elif tensor is not None:
                    kept.setdefault(id(tensor), tensor)
            for tensor in module._buffers.values():
                if tensor is not None:
                    kept.setdefault(id(tensor), tensor)
        self.aliases = {name: list(dict.fromkeys(found)) for name, found in aliases.items()}
        self.kept = list(kept.values())
        self._registries = [r for _, m in modules.values() for r in (m._modules, m._parameters, m._buffers)]
        self._attributes = [(name, m.__dict__) for name, m in modules.values()]
        _watched.update(module for _, module in modules.values())
        self._layout, self._hooked = self._walk()
        self._scanned, self.stale = _registrations, False
        self.generation += 1

    def _walk(self) -> tuple[int, tuple[str, str] | None]:
        """The registries' total size, and the first module carrying another offloader's
        hooks. Runs before every call: kept to loops over prepared lists."""
        size = sum(map(len, self._registries))
        for name, attributes in self._attributes:
            if "_hf_hook" in attributes:
                return size, (name, "accelerate (_hf_hook)")
            if "_diffusers_hook" in attributes and getattr(attributes["_diffusers_hook"], "hooks", None):
                return size, (name, "diffusers (_diffusers_hook)")
        return size, None

    def refuse_other_offloaders(self) -> None:
        """Raise if accelerate or diffusers hooks were added to any module since load
        (as found by the last refresh or rescan)."""
        if self._hooked is not None:
            name, owner = self._hooked
            raise OtherOffloaderError(
                f"module {name or type(self.model).__name__!r} gained {owner} hooks after lazystream loaded the "
                "model (an offloading or layerwise-casting method?); they would fight lazystream over the "
                "weights. Remove them, or load the model without lazystream for that workflow",
            )

    def kept_nbytes(self, granule: int) -> int:
        return sum(-(-t.nbytes // granule) * granule for t in self.kept)

    # -- during a call -----------------------------------------------------------------

    def bindings(self, tensors: dict[str, torch.Tensor]) -> list[Binding]:
        """Where to register each of ``tensors`` (by checkpoint name) for a call; valid
        until the next rescan (see ``generation``)."""
        return [(module._parameters, leaf, self.weights[name], tensor)
                for name, tensor in tensors.items() for module, leaf in self.aliases[name]]

    def bind(self, bindings: list[Binding]) -> None:
        """Register each tensor where its weight is, for the call."""
        for params, leaf, weight, tensor in bindings:
            if params.get(leaf) is weight:
                params[leaf] = tensor
            else:  # replaced behind the registration hooks' back: rescan before the next call
                self.stale = True

    def unbind(self, bindings: list[Binding]) -> None:
        for params, leaf, weight, tensor in bindings:
            if params.get(leaf) is tensor:
                params[leaf] = weight

    # -- between calls -----------------------------------------------------------------

    def retarget(self, plan: StreamPlan) -> None:
        """Give each weight the dtype, casts and device ``plan`` gives it (after ``.to()``)."""
        for name, t in plan.placements.items():
            self.sources[name].chain = t.casts
            set_metadata(self.weights[name], t.dtype, torch.device(plan.device))

    def move_kept(self, device: torch.device) -> None:
        """Move every kept tensor to ``device``, keeping each object (as ``Module.to`` does)."""
        with torch.inference_mode(False), torch.no_grad():
            for tensor in self.kept:
                if tensor.device != device:
                    tensor.data = tensor.data.to(device)

    def apply_to_kept(self, fn) -> None:
        """Run ``nn.Module._apply(fn)`` on the model with the checkpoint weights hidden, so
        buffers and adapters change exactly as on the library's model."""
        hidden = [(module, leaf, module._parameters[leaf]) for found in self.aliases.values()
                  for module, leaf in found]
        for module, leaf, _ in hidden:
            module._parameters[leaf] = None
        try:
            type(self.model)._apply(self.model, fn)
        finally:
            for module, leaf, weight in hidden:
                module._parameters[leaf] = weight
        self.rescan()


def _aliases(model: nn.Module) -> dict[str, list[Alias]]:
    """Every (module, attribute) under which each parameter is registered, keyed by each
    of its qualified names (tied weights have several)."""
    by_id: dict[int, list[Alias]] = {}
    names: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module._parameters.items():
            if param is not None:
                by_id.setdefault(id(param), []).append((module, leaf))
                names.setdefault(id(param), []).append(f"{prefix}.{leaf}" if prefix else leaf)
    return {name: list(dict.fromkeys(by_id[key])) for key, ns in names.items() for name in ns}
