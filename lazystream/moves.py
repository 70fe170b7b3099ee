"""What ``model.to()``, ``.cuda()``, ``.half()`` and the like would do to each streamed
weight: ``Module._apply`` gets an opaque function, so it is run on an empty tensor of each
weight's current dtype and device, and the result says where the weight goes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .errors import UnsupportedOperationError
from .plan import TensorPlacement
from .weights import cast_chain


@dataclass(frozen=True)
class Conversion:
    """Where ``fn`` sends the checkpoint weights: one device, and each weight's casts
    from its stored dtype (see :func:`lazystream.weights.cast_chain`)."""

    device: torch.device
    casts: dict[str, tuple[torch.dtype, ...]]
    dtype: torch.dtype  # what fn makes of the model's default dtype

    def changes(self, device: torch.device, placements: Mapping[str, TensorPlacement]) -> bool:
        return self.device != device or any(self.casts[n] != t.casts for n, t in placements.items())


def probe(fn: Callable[[torch.Tensor], torch.Tensor], placements: Mapping[str, TensorPlacement],
          device: torch.device, dtype: torch.dtype) -> Conversion:
    """Run ``fn`` on an empty tensor like each weight; raise before anything changes if it
    fails or sends weights to different devices."""
    results: dict[torch.dtype, tuple[torch.device, torch.dtype]] = {}

    def apply(current: torch.dtype) -> tuple[torch.device, torch.dtype]:
        if current not in results:
            with torch.no_grad():
                out = fn(torch.empty(0, dtype=current, device=device))
            if not isinstance(out, torch.Tensor):
                raise UnsupportedOperationError(
                    f"this operation turns a weight into a {type(out).__name__}, which lazystream cannot stream; "
                    "load the model without lazystream for it"
                )
            results[current] = (_with_index(out.device), out.dtype)
        return results[current]

    casts, devices = {}, set()
    for name, t in placements.items():
        new_device, new_dtype = apply(t.dtype)
        devices.add(new_device)
        casts[name] = cast_chain(t.source.dtype, (*t.casts, new_dtype))
    if len(devices) > 1:
        raise UnsupportedOperationError(
            f"this operation would spread the weights over {sorted(map(str, devices))}; lazystream streams a model "
            "onto one device"
        )
    new_device = devices.pop() if devices else device
    return Conversion(new_device, casts, apply(dtype)[1])


def _with_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
