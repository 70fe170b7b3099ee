"""lazystream: run Hugging Face models larger than the GPU by keeping N blocks resident
and streaming the rest straight from the safetensors shards.

The public names are imported on first use (PEP 562), so that ``import lazystream`` and
``lazystream --help`` do not pay for importing torch; ``from lazystream import X`` works
as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Checkpoint": ".checkpoint",
    "IOConfig": ".io",
    "LazyStreamError": ".errors",
    "LazyStreamModel": ".model",
    "LazyStreamPipeline": ".pipeline",
    "Phases": ".pipeline",
    "Stats": ".telemetry",
    "StreamPlan": ".plan",
    "Streamer": ".streamer",
    "TensorRecord": ".header",
    "attach": ".model",
    "phases_of": ".pipeline",
    "streamer_of": ".model",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; tests/test_cli.py checks it matches _EXPORTS
    from .checkpoint import Checkpoint
    from .errors import LazyStreamError
    from .header import TensorRecord
    from .io import IOConfig
    from .model import LazyStreamModel, attach, streamer_of
    from .pipeline import LazyStreamPipeline, Phases, phases_of
    from .plan import StreamPlan
    from .streamer import Streamer
    from .telemetry import Stats


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lazystream' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
