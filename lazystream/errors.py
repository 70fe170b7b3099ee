"""Exception types. Each names the file (``.path``) and, where one applies, the
tensor (``.tensor``); its message says what was expected, what was found, and what
to do. Each also subclasses the builtin that fits, so ``except ValueError`` works."""

from __future__ import annotations

import os


class LazyStreamError(Exception):
    """Base of every error lazystream raises on purpose."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, tensor: str | None = None):
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.tensor = tensor


# -- finding the checkpoint ---------------------------------------------------------


class CheckpointNotFoundError(LazyStreamError, FileNotFoundError):
    """The folder or Hugging Face repo does not exist, or holds no weights."""

    # FileNotFoundError.__init__ would reinterpret the arguments as (errno, strerror).
    __init__ = LazyStreamError.__init__
    __str__ = Exception.__str__


class HubUnreachableError(LazyStreamError, ConnectionError):
    """The Hugging Face Hub could not be reached to find a repo that is not in the cache."""

    __init__ = LazyStreamError.__init__  # ConnectionError (an OSError) would reinterpret the arguments
    __str__ = Exception.__str__


class UnsupportedFormatError(LazyStreamError, ValueError):
    """The checkpoint has weights, but not in safetensors."""


class MissingShardError(LazyStreamError, FileNotFoundError):
    """An index names a shard file that is not there."""

    __init__ = LazyStreamError.__init__
    __str__ = Exception.__str__


class InvalidConfigError(LazyStreamError, ValueError):
    """A ``config.json`` that is not a JSON object."""


class InvalidIndexError(LazyStreamError, ValueError):
    """A ``*.safetensors.index.json`` that is not the expected JSON."""


class IndexMismatchError(LazyStreamError, ValueError):
    """The index says a shard holds a tensor that the shard's header does not have."""


# -- one shard's header -------------------------------------------------------------


class HeaderError(LazyStreamError, ValueError):
    """Base for a safetensors header that fails validation."""


class TruncatedShardError(HeaderError):
    """The file ends before its 8-byte length prefix or before its header ends."""


class HeaderTooLargeError(HeaderError):
    """The length prefix announces a header larger than the cap."""


class HeaderNotJSONError(HeaderError):
    """The header is not UTF-8 JSON, or not a JSON object."""


class UnknownDtypeError(HeaderError):
    """A tensor's dtype is not one torch can hold."""


class InvalidShapeError(HeaderError):
    """A tensor's shape is not a list of non-negative integers."""


class InvalidOffsetsError(HeaderError):
    """A tensor's ``data_offsets`` is not ``[begin, end]`` with ``0 <= begin <= end``."""


class TensorSizeMismatchError(HeaderError):
    """A tensor's byte range does not match its shape and dtype."""


class OffsetOutOfRangeError(HeaderError):
    """A tensor's bytes reach past the end of the file's data section."""


class OverlappingTensorsError(HeaderError):
    """Two tensors claim the same bytes."""


# -- matching the checkpoint to the model -------------------------------------------


class UnknownModelClassError(LazyStreamError, ValueError):
    """The config names a class that neither transformers nor diffusers has."""


class BlocksNotFoundError(LazyStreamError, ValueError):
    """``blocks=`` names no module list, or no repeated blocks can be found."""


class MissingTensorsError(LazyStreamError, KeyError):
    """The model has parameters that the checkpoint does not hold."""

    __str__ = Exception.__str__  # KeyError would show the message quoted

    @classmethod
    def of(cls, model_name: str, missing: list[str]) -> MissingTensorsError:
        """The error for ``missing`` (sorted names) of the model class ``model_name``."""
        return cls(
            f"{len(missing)} tensor(s) of {model_name} are in no shard: {missing[:10]}"
            + (" ..." if len(missing) > 10 else "")
            + "; the checkpoint is incomplete or for another model (the library would initialize them at random)",
            tensor=missing[0],
        )


class ShapeMismatchError(LazyStreamError, ValueError):
    """A checkpoint tensor's shape differs from the model's parameter."""


class UnsupportedConversionError(LazyStreamError, ValueError):
    """The library computes a tensor from the checkpoint at load (beyond views,
    concatenations and stacks of stored bytes), so it cannot be streamed as byte runs."""


class UnusedTensorsError(LazyStreamError, ValueError):
    """The checkpoint holds tensors the library's model would load (its own ignore lists
    applied) that lazystream would leave unused: the model would differ from the library's."""


class UnsupportedQuantizationError(LazyStreamError, ValueError):
    """A checkpoint's ``quantization_config`` or a loading keyword names a quantization
    method lazystream does not stream; loading it as anything else would give another model."""


class UnsupportedKeywordError(LazyStreamError, TypeError):
    """A keyword of the library's loader that lazystream cannot honour with the library's
    effect (``device_map``, say); the message says what to do instead."""


class OtherOffloaderError(LazyStreamError, ValueError):
    """The model already carries offloading hooks (accelerate, diffusers, lazystream)."""


class UnavailableDeviceError(LazyStreamError, ValueError):
    """The device asked for is not one torch knows, or this machine or torch build lacks it."""


class DeviceMemoryError(LazyStreamError, MemoryError):
    """The plan does not fit in the device's free memory."""


# -- after opening ------------------------------------------------------------------


class ShardChangedError(LazyStreamError, RuntimeError):
    """A shard was truncated, rewritten, replaced or removed after it was mapped."""


class ClosedError(LazyStreamError, RuntimeError):
    """The object was closed; nothing can be read through it any more."""


# -- using a streamed model -----------------------------------------------------------


class UnsupportedOperationError(LazyStreamError, RuntimeError):
    """Something done to a streamed model that streaming cannot honour; raised before
    anything changed, with what to do instead."""


class ReadOnlyWeightError(UnsupportedOperationError):
    """An in-place write to a weight lazystream reloads from the checkpoint (a fused LoRA,
    ``load_state_dict`` into the model, a write to ``param.data``)."""


# -- moving bytes -----------------------------------------------------------------------


class StagingMemoryError(LazyStreamError, MemoryError):
    """The host staging ring (pinned memory on CUDA) could not be allocated."""


class HostRegisterError(LazyStreamError, RuntimeError):
    """``IOConfig(mode="register")`` could not page-lock a shard mapping for the device."""
