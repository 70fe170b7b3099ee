"""What a checkpoint-backed parameter is between calls: a :class:`CheckpointWeight`.

During a call every parameter the checkpoint holds is a plain tensor on the device (a
view of the resident arena or of a slot). Between calls, and while the model is
unloaded, it is a ``CheckpointWeight``: a tensor with no storage of its own that reports
the device, dtype and shape the parameter has during a call, whose values are read when
something reads them (from the resident arena when it is loaded, else from the
checkpoint), and which refuses every in-place write. So code that inspects a model
between calls (peft creating adapters on the weights' device and dtype, ``state_dict``,
``save_pretrained``, ``.to()``, ``model.dtype``) sees what it would see on the library's
own model, and a write that a reload from the checkpoint would silently undo (a fused
LoRA, ``load_state_dict`` into the model) is refused before it changes anything.

Each parameter keeps one ``CheckpointWeight`` for the model's whole life: users holding
``model.named_parameters()`` between calls hold the same objects across calls, unloads,
re-plans and ``.to()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ReadOnlyWeightError, UnsupportedOperationError

# Dtypes each dtype converts into without losing a value: a cast through them changes
# nothing, so a chain of casts can skip them (bfloat16 -> float32 -> float16 rounds as
# bfloat16 -> float16 does).
_EXACT_INTO: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
    torch.float8_e4m3fn: (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    torch.float8_e5m2: (torch.float16, torch.float32, torch.float64),
}


def cast_chain(stored: torch.dtype, casts: tuple[torch.dtype, ...]) -> tuple[torch.dtype, ...]:
    """The casts that give the values of ``stored`` cast through ``casts`` in turn, less
    the steps that change nothing. ``()`` when the values stay as stored."""
    chain = [stored]
    for dtype in casts:
        if dtype == chain[-1]:
            continue
        if len(chain) > 1 and chain[-1] in _EXACT_INTO.get(chain[-2], ()):
            chain.pop()  # the last step lost nothing: casting from before it rounds the same
            if dtype == chain[-1]:
                continue
        chain.append(dtype)
    return tuple(chain[1:])


@dataclass(frozen=True)
class ParameterKind:
    """What a library makes of a parameter's stored bytes beyond a plain tensor: its
    parameter class (diffusers' ``GGUFParameter``) and the state that lives on the
    parameter object outside its data (a GGUF tensor's ``quant_type``). The bound tensor
    of a call, the host value (``state_dict``) and the between-calls weight all carry it,
    so the library's own forward (which dequantizes) sees what it sees on its own model.

    ``label`` names the format of the stored bytes, for plans (``"Q4_K"``).
    """

    cls: type
    state: tuple[tuple[str, object], ...]
    label: str

    @classmethod
    def of(cls, param: torch.Tensor, label: str) -> ParameterKind:
        """The kind of ``param``, a library's parameter (on the meta device, say)."""
        return cls(type(param), tuple(vars(param).items()), label)

    def wrap(self, value: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        """``value`` (no copy) as a parameter of this kind."""
        param = torch.Tensor._make_subclass(self.cls, value, requires_grad)
        param.__dict__.update(self.state)
        return param


def as_parameter(value: torch.Tensor, requires_grad: bool, kind: ParameterKind | None) -> nn.Parameter:
    """``value`` (no copy) as the parameter the library's model holds: of ``kind`` when
    the stored bytes have one, else a plain ``nn.Parameter``."""
    return nn.Parameter(value, requires_grad) if kind is None else kind.wrap(value, requires_grad)


def apply_casts(value: torch.Tensor, chain: tuple[torch.dtype, ...]) -> torch.Tensor:
    for dtype in chain:
        value = value.to(dtype)
    return value


@dataclass
class WeightSource:
    """Where a parameter's values come from; shared by its CheckpointWeight and its aliases.

    ``read`` gives the stored value on the host (a zero-copy view of the shard where it
    can); ``chain`` the casts from the stored dtype to the parameter's; ``bound`` the
    parameter's tensor on the device while it is resident and loaded.
    """

    name: str
    read: Callable[[], torch.Tensor]
    chain: tuple[torch.dtype, ...]
    bound: torch.Tensor | None = None
    kind: ParameterKind | None = None
    # ``epoch[0]`` moves at every state_dict() of the model; within one, a tied weight's
    # host value is given once (see host_value).
    epoch: list[int] = field(default_factory=lambda: [0])
    _host: tuple[weakref.ref, int, tuple, int] | None = None

    def host_value(self) -> torch.Tensor:
        """The parameter's values on the host, with their own storage. Within one
        ``state_dict()`` the same tensor each time: a tied weight then has one storage, as
        on the library's model, and save_pretrained writes it once."""
        if self._host is not None:
            ref, epoch, chain, version = self._host
            value = ref()
            if value is not None and (epoch, chain, version) == (self.epoch[0], self.chain, value._version):
                return value
        with torch.inference_mode(False), torch.no_grad():
            value = apply_casts(self.read(), self.chain)
            if self.kind is not None:
                value = self.kind.wrap(value, False)
        self._host = (weakref.ref(value), self.epoch[0], self.chain, value._version)
        return value

    def value_on(self, device: torch.device) -> torch.Tensor:
        if self.bound is not None:
            return self.bound
        with torch.inference_mode(False), torch.no_grad():
            value = self.read()
            if device.type != "cpu":
                value = value.to(device)
            return apply_casts(value, self.chain)


class CheckpointWeight(torch.Tensor):
    """A parameter whose values the checkpoint holds, between calls. See the module text.

    ``isinstance(w, nn.Parameter)`` is true. Reading it works like reading the parameter
    (values are read on demand); ``detach()`` (which ``state_dict`` uses) gives its values
    on the host, a zero-copy view of the shard when no cast is needed; any in-place write,
    ``.data = ...`` included, raises :class:`~lazystream.errors.ReadOnlyWeightError`.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    _source: WeightSource

    @staticmethod
    def __new__(cls, source: WeightSource, shape: torch.Size | None = None, dtype: torch.dtype | None = None,
                device: torch.device | None = None, requires_grad: bool = False) -> CheckpointWeight:
        if not isinstance(source, WeightSource):  # type(param)(tensor), as Parameter is called
            raise UnsupportedOperationError(
                "a checkpoint weight of a streamed model is being replaced by a new tensor of its type (accelerate's "
                "set_module_tensor_to_device, an offloading or quantization hook?); lazystream would keep streaming "
                "the checkpoint's values into it. Load the model without lazystream for that workflow"
            )
        weight = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device,
                                                     requires_grad=requires_grad)
        weight._source = source
        weight._is_param = True  # an nn.Parameter for isinstance and module registration
        if source.kind is not None:  # state such as a GGUF quant_type reads as on the library's parameter
            weight.__dict__.update(source.kind.state)
        return weight

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]._alias()
        for i, arg in enumerate(func._schema.arguments):
            info = arg.alias_info
            if info is not None and info.is_write:
                target = args[i] if i < len(args) else kwargs.get(arg.name)
                if isinstance(target, CheckpointWeight):
                    raise target._refuse(f"{func.__name__} writes to it in place")
        return func(*_unwrap(args), **_unwrap(kwargs))

    # -- what differs from a plain tensor ----------------------------------------------

    def _alias(self) -> CheckpointWeight:
        return CheckpointWeight(self._source, self.shape, self.dtype, self.device)

    def _refuse(self, what: str) -> ReadOnlyWeightError:
        return refuse_write([self._source.name], what)

    def detach(self) -> torch.Tensor:
        """The values on the host (``state_dict`` and ``save_pretrained`` call this)."""
        return self._source.host_value()

    @property
    def data(self) -> CheckpointWeight:
        return self._alias()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if value is self or (isinstance(value, CheckpointWeight) and value._source is self._source
                             and value.dtype == self.dtype and value.device == self.device):
            return
        raise self._refuse("an assignment to .data, or a .to() of a part of the model, replaces its values; move or "
                           "cast the whole model instead, which lazystream re-plans for")

    def numpy(self, *, force: bool = False):
        return self._source.host_value().numpy(force=force)

    def tolist(self):
        return self._source.host_value().tolist()

    def __reduce_ex__(self, protocol):
        return _rebuild_parameter, (self._source.host_value(), self.requires_grad)

    def __deepcopy__(self, memo):
        return as_parameter(self._source.value_on(self.device).clone(), self.requires_grad, self._source.kind)

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"Parameter streamed by lazystream ({self._source.name}):\n{self._source.value_on(self.device)!r}"


def refuse_write(names: list[str], what: str) -> ReadOnlyWeightError:
    """The error for an in-place change of the checkpoint weights ``names``."""
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return ReadOnlyWeightError(
        f"{shown} {'is a weight' if len(names) == 1 else 'are weights'} lazystream loads from the checkpoint ({what}). "
        "lazystream reloads weights from the checkpoint (each streamed block on every call, resident ones after "
        "unload() or a re-plan), so an in-place change could not last and is refused; nothing was changed. Keep LoRA "
        "adapters unfused (they are exact and stay resident), or change the weights with the library's own loader, "
        "save_pretrained, and stream that checkpoint",
        tensor=names[0],
    )


def set_metadata(weight: CheckpointWeight, dtype: torch.dtype, device: torch.device) -> None:
    """Give ``weight`` (the same object) a new dtype and device, as ``.to()`` would."""
    if weight.dtype != dtype or weight.device != device:
        template = CheckpointWeight(weight._source, weight.shape, dtype, device)
        torch.Tensor.data.__set__(weight, template)


def _unwrap(obj):
    if isinstance(obj, CheckpointWeight):
        return obj._source.value_on(obj.device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _rebuild_parameter(value: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(value, requires_grad)
