"""lazystream: run Hugging Face models larger than the GPU by keeping N blocks resident
and streaming the rest straight from the safetensors shards."""

from .checkpoint import Checkpoint
from .errors import LazyStreamError
from .header import TensorRecord

__all__ = ["Checkpoint", "LazyStreamError", "TensorRecord"]
