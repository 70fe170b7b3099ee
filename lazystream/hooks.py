"""Where the streamer meets the model: the root forward wrapped (one enter and exit around
every call), a pre- and a post-forward hook on each streamed block, and ``load_state_dict``
refusing to overwrite checkpoint weights in place."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from .plan import StreamPlan
from .tensors import ModelTensors
from .weights import refuse_write


def wrap_forward(forward: Callable, enter: Callable[[], None], exit_: Callable[[bool], None]) -> Callable:
    """``forward`` between ``enter()`` and ``exit_(completed)``. The root call is wrapped, not
    hooked: torch runs always_call hooks only for an Exception, and a KeyboardInterrupt must
    release the lock and the slots too."""

    @functools.wraps(forward)
    def streamed_forward(*args, **kwargs):
        enter()
        completed = False
        try:
            out = forward(*args, **kwargs)
            completed = True
            return out
        finally:
            exit_(completed)

    return streamed_forward


def wrap_load_state_dict(load: Callable, model: nn.Module, tensors: ModelTensors) -> Callable:
    @functools.wraps(load)
    def load_state_dict(state_dict, *args, **kwargs):
        """Refuse, before anything is copied, to overwrite checkpoint weights in place
        (torch would refuse each on its own, after loading the others)."""
        assign = kwargs.get("assign", args[1] if len(args) > 1 else False)
        if not assign:
            weights = {id(w) for w in tensors.weights.values()}
            hit = [name for name, p in model.named_parameters(remove_duplicate=False)
                   if id(p) in weights and name in state_dict]
            if hit:
                raise refuse_write(hit, "load_state_dict would copy new values into it")
        return load(state_dict, *args, **kwargs)

    return load_state_dict


class BlockHooks:
    """The hooks on the streamed blocks: ``pre(index, module, args)`` and
    ``post(index, module, args, output)``, the latter also when the forward raised."""

    def __init__(self, pre: Callable, post: Callable):
        self._pre, self._post = pre, post
        self._handles: dict[int, tuple] = {}  # block index -> its hook handles

    def update(self, model: nn.Module, plan: StreamPlan) -> None:
        """Hook the streamed blocks of ``plan``, and only them: under torch.compile each hook
        is a graph break, and a resident block needs none."""
        modules = dict(model.named_modules())
        for block in plan.blocks:
            handles = self._handles.pop(block.index, None)
            if block.resident:
                for handle in handles or ():
                    handle.remove()
                continue
            if handles is None:
                module = modules[block.path]
                handles = (module.register_forward_pre_hook(_bind_index(self._pre, block.index)),
                           module.register_forward_hook(_bind_index(self._post, block.index), always_call=True))
            self._handles[block.index] = handles


def _bind_index(hook, index: int):
    def bound(*args):
        return hook(index, *args)

    return bound
