"""Whether lazystream's hooks run under a torch.compile that records CUDA graphs
(``mode="reduce-overhead"``, or inductor's ``triton.cudagraphs`` option).

A streamed block cannot be replayed from a CUDA graph: its weights sit in a slot that holds
another block at the next call, and inductor's CUDA graph trees take parameters for static
inputs (a graph recorded for one slot address re-records, or replays, whatever that slot
holds then). The hooks are graph breaks, so they run eagerly between the compiled pieces,
where no stream capture is active: ``torch.cuda.is_current_stream_capturing()`` is False
there. What tells is the compiled context above them on the Python stack: dynamo's wrapper
of the compiled module or function (``compile_wrapper``, ``_fn`` in older torch, in
torch/_dynamo/eval_frame.py) holds its context, whose ``compiler_config`` is the backend's
configuration, or the backend itself (inductor's wrapper keeps its options in ``config``).
"""

from __future__ import annotations

import os
import sys

_EVAL_FRAME = os.path.join("_dynamo", "eval_frame.py")


def compiled_for_cuda_graphs() -> bool:
    """Whether a torch.compile'd caller up the stack records CUDA graphs."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith(_EVAL_FRAME) and {"self", "callback"} & {*code.co_varnames, *code.co_freevars}:
            config = _compiler_config(frame.f_locals)
            if config is not None and config.get("triton.cudagraphs"):
                return True
        frame = frame.f_back
    return False


def _compiler_config(local: dict) -> dict | None:
    """The compiled caller's backend configuration: its context's ``compiler_config``, else
    (torch before it had one) the innermost backend's own ``config`` (inductor's options)."""
    context = local.get("self")
    context = getattr(context, "dynamo_ctx", context)  # an OptimizedModule's __call__
    config = getattr(context, "compiler_config", None)
    if isinstance(config, dict):
        return config
    backend = getattr(context, "callback", None) or local.get("callback")
    for _ in range(16):  # the wrappers dynamo puts around the backend
        inner = getattr(backend, "_torchdynamo_orig_backend", None) or getattr(backend, "_torchdynamo_orig_callable",
                                                                              None)
        if inner is None:
            break
        backend = inner
    config = getattr(backend, "config", None)
    return config if isinstance(config, dict) else None


def refuse_cuda_graph_compile(model_name: str, block: str) -> None:
    """Raise where a streamed block runs under a torch.compile that records CUDA graphs.

    Raises:
        UnsupportedOperationError: naming the block and what to use instead.
    """
    if compiled_for_cuda_graphs():
        from .errors import UnsupportedOperationError

        raise UnsupportedOperationError(
            f"streamed block {block} of {model_name} runs under torch.compile with CUDA graphs "
            "(mode='reduce-overhead' or the triton.cudagraphs option): a graph would replay it on whichever block "
            "its slot holds at the next call. Compile without CUDA graphs (torch.compile(model), or "
            "mode='max-autotune-no-cudagraphs'), or keep every block resident (keep_gpu=)"
        )
