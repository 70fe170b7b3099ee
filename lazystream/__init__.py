"""lazystream: run Hugging Face models larger than the GPU by keeping N blocks resident
and streaming the rest straight from the safetensors shards."""

from .checkpoint import Checkpoint
from .errors import LazyStreamError
from .header import TensorRecord
from .io import IOConfig
from .model import LazyStreamModel, attach, streamer_of
from .pipeline import LazyStreamPipeline, Phases, phases_of
from .plan import StreamPlan
from .streamer import Streamer
from .telemetry import Stats

__all__ = [
    "Checkpoint",
    "IOConfig",
    "LazyStreamError",
    "LazyStreamModel",
    "LazyStreamPipeline",
    "Phases",
    "Stats",
    "StreamPlan",
    "Streamer",
    "TensorRecord",
    "attach",
    "phases_of",
    "streamer_of",
]
