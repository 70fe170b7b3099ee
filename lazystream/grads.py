"""Gradients through a streamed model: into inputs and adapters they flow as on the
library's model; into the checkpoint's weights, or through a streamed block (whose
weights live in a reused buffer), they are refused with what to do instead."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import UnsupportedOperationError


class GradGuard:
    """Keeps each bound parameter's requires_grad the user's, and refuses backward into
    it: a gradient would land on the tensor bound for that call, not on the parameter the
    user holds. Forget it when the bound tensors are dropped (unload)."""

    def __init__(self):
        self._refusing: set[int] = set()

    def sync(self, name: str, param: nn.Parameter, wanted: bool) -> None:
        if param.requires_grad != wanted:
            param.requires_grad_(wanted)
        if wanted and id(param) not in self._refusing:
            param.register_hook(functools.partial(_refuse_weight_grad, name))
            self._refusing.add(id(param))

    def forget(self) -> None:
        self._refusing.clear()


def _refuse_weight_grad(name: str, grad: torch.Tensor) -> None:
    raise UnsupportedOperationError(
        f"backward into checkpoint weight {name!r}: lazystream binds the checkpoint's weights afresh on every call, so "
        "a gradient could not reach the parameter you hold. Freeze them (model.requires_grad_(False), as peft does "
        "for the base model), or run inference under torch.no_grad() / torch.inference_mode()",
        tensor=name,
    )


def refuse_backward(output: object, path: str) -> None:
    """Make a backward pass through streamed block ``path``'s ``output`` raise."""
    def refuse(grad: torch.Tensor) -> None:
        raise UnsupportedOperationError(
            f"backward through streamed block {path!r}: its weights live in a reused buffer, so autograd "
            "cannot keep them. Run inference under torch.no_grad() or torch.inference_mode(), or keep this "
            "block resident (raise keep_gpu)"
        )

    if isinstance(output, torch.Tensor):
        if output.requires_grad:
            output.register_hook(refuse)
    elif isinstance(output, (tuple, list)):
        for item in output:
            refuse_backward(item, path)
    elif isinstance(output, dict):
        for item in output.values():
            refuse_backward(item, path)
