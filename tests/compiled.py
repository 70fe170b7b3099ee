"""What a compiled streamed model is held to (README, "A streamed model is the library's model").

Backends that run the traced graph eagerly ("eager", "aot_eager") run the same kernels as the
library's model: their outputs are bit-identical to it. Inductor generates kernels from the
graphs it is given; lazystream's hooks break the graph at each streamed block, so inductor
fuses (and so rounds) differently from the library model compiled whole, in a way that
depends on the CPU or GPU it generates for. What holds everywhere is a bound derived from
inductor's own rounding on that machine:

    max|streamed_inductor - library_eager|
        <= K * max|library_inductor - library_eager| + ULPS * eps(dtype) * max|library_eager|

K: the streamed graphs are pieces of the library graph compiled by the same inductor, so
their reassociation error is of the same order as the whole graph's; K = 4 leaves room for
fusion boundaries that fall differently. The ULPS term covers a machine where inductor
happens to round exactly as eager does (the first term then is 0) while the pieces do not.
A wrong weight is far outside it: one row of a streamed block read from the previous block
(what a stale slot gives) moves float32 logits by ~1e-2, against a bound of ~1e-6.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

K = 4
ULPS = 8


def inductor_bound(library_eager: torch.Tensor, library_inductor: torch.Tensor) -> float:
    own = (library_inductor.float() - library_eager.float()).abs().max().item()
    return K * own + ULPS * torch.finfo(library_eager.dtype).eps * library_eager.float().abs().max().item()


def inductor_difference(streamed: torch.Tensor, library_eager: torch.Tensor) -> float:
    return (streamed.float() - library_eager.float()).abs().max().item()


def with_stale_row(path: Path, out: Path, tensor: str, from_tensor: str, row: int = 3) -> Path:
    """A copy of the checkpoint at ``path`` whose ``tensor`` has row ``row`` of ``from_tensor``
    (the previous block's weight, as a slot read before its copy landed would give)."""
    shutil.copytree(path, out)
    source = next(f for f in sorted(out.glob("*.safetensors")) if from_tensor in safe_open(f, "pt").keys())
    with safe_open(source, "pt") as f:
        stale = f.get_tensor(from_tensor)[row].clone()
    shard = next(f for f in sorted(out.glob("*.safetensors")) if tensor in safe_open(f, "pt").keys())
    with safe_open(shard, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata()
    assert not torch.equal(tensors[tensor][row], stale)
    tensors[tensor][row] = stale
    save_file(tensors, shard, metadata=metadata)
    return out


def library_recompiles(model: torch.nn.Module, hooked: list[str], call, calls: int) -> int:
    """Graphs dynamo adds after the first of ``calls`` calls (``call(compiled)``) to the library's
    ``model`` with a graph break before and after each module in ``hooked``, as lazystream's
    hooks make: what torch and the model library recompile at such breaks by themselves
    (transformers 5.17 recompiles a decoder layer once at the second call; 5.25 does not).
    lazystream must add none to it. Resets dynamo before and after."""
    from torch._dynamo.utils import counters

    modules = dict(model.named_modules())
    handles = []
    for name in hooked:
        handles.append(modules[name].register_forward_pre_hook(torch.compiler.disable(lambda m, args: None)))
        handles.append(modules[name].register_forward_hook(torch.compiler.disable(lambda m, args, out: None)))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    call(compiled)
    first = counters["stats"]["unique_graphs"]
    for _ in range(calls - 1):
        call(compiled)
    added = counters["stats"]["unique_graphs"] - first
    for handle in handles:
        handle.remove()
    torch._dynamo.reset()
    counters.clear()
    return added
