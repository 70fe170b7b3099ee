"""Parse and validate one safetensors file's header, completely, before any tensor
byte is touched.

Layout: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON, then the data
section. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets"}``,
offsets relative to the data section; an optional ``"__metadata__"`` maps str to str.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import (
    HeaderNotJSONError,
    HeaderTooLargeError,
    InvalidOffsetsError,
    InvalidShapeError,
    OffsetOutOfRangeError,
    OverlappingTensorsError,
    TensorSizeMismatchError,
    TruncatedShardError,
    UnknownDtypeError,
)

# The safetensors reference implementation refuses headers above 100 MB as well.
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's bytes lie: ``nbytes`` bytes at absolute ``offset`` in ``file``.

    ``format``: how the bytes encode values when not as ``dtype`` (a GGUF quantization
    type such as ``"Q4_K"``, its blocks stored as ``uint8``); None for plain tensors."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    format: str | None = None


@dataclass(frozen=True)
class ShardHeader:
    """A validated header: the tensors in file order, and the file's layout."""

    path: Path
    records: tuple[TensorRecord, ...]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Raises:
        FileNotFoundError: the file does not exist.
        HeaderError: a subclass per failure, carrying ``.path`` and ``.tensor``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TruncatedShardError(
                f"{path}: expected at least 8 bytes (the header length), found {len(prefix)}; "
                "the file is truncated or not safetensors: re-download it",
                path=path,
            )
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            raise HeaderTooLargeError(
                f"{path}: header length is {header_len} bytes, above the {MAX_HEADER_BYTES} byte cap; "
                "the file is corrupt or not safetensors",
                path=path,
            )
        if 8 + header_len > file_size:
            raise TruncatedShardError(
                f"{path}: header says {header_len} bytes follow the length prefix, but the file has "
                f"{file_size - 8}; the file is truncated: re-download it",
                path=path,
            )
        raw = f.read(header_len)
    return parse_header(raw, path=path, file_size=file_size)


def parse_header(raw: bytes, *, path: Path, file_size: int) -> ShardHeader:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes."""
    data_start = 8 + len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderNotJSONError(
            f"{path}: expected a UTF-8 JSON header, found bytes that do not parse ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the file is corrupt or not safetensors",
            path=path,
        ) from None
    if not isinstance(obj, dict):
        raise HeaderNotJSONError(
            f"{path}: expected the header to be a JSON object, found a JSON {type(obj).__name__}", path=path
        )
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderNotJSONError(f"{path}: expected __metadata__ to map strings to strings, found {metadata!r:.200}", path=path)

    data_len = file_size - data_start
    records = [_record(name, entry, path, data_start, data_len) for name, entry in obj.items()]
    records.sort(key=lambda r: (r.offset, r.nbytes))
    _check_no_overlap(records, path)
    return ShardHeader(path=path, records=tuple(records), metadata=metadata, data_start=data_start, file_size=file_size)


def _record(name: str, entry: object, path: Path, data_start: int, data_len: int) -> TensorRecord:
    if not isinstance(entry, dict):
        raise HeaderNotJSONError(
            f"{path}: tensor {name!r}: expected an object with dtype, shape and data_offsets, found {entry!r:.200}",
            path=path,
            tensor=name,
        )
    dtype_name = entry.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise UnknownDtypeError(
            f"{path}: tensor {name!r} has dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}",
            path=path,
            tensor=name,
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidShapeError(
            f"{path}: tensor {name!r}: expected shape to be a list of non-negative integers, found {shape!r:.200}",
            path=path,
            tensor=name,
        )
    if math.prod(max(d, 1) for d in shape) >= 2**63:
        raise InvalidShapeError(
            f"{path}: tensor {name!r}: expected shape dimensions whose product fits in 64 bits, found {shape!r:.200}",
            path=path,
            tensor=name,
        )
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise InvalidOffsetsError(
            f"{path}: tensor {name!r}: expected data_offsets [begin, end] with 0 <= begin <= end, "
            f"found {offsets!r:.200}",
            path=path,
            tensor=name,
        )
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise TensorSizeMismatchError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype_name} needs {expected} bytes, "
            f"but its data_offsets [{begin}, {end}] span {end - begin}",
            path=path,
            tensor=name,
        )
    if end > data_len:
        raise OffsetOutOfRangeError(
            f"{path}: tensor {name!r} occupies data bytes [{begin}, {end}), but the data section holds "
            f"{data_len} bytes; the file is truncated or its header is corrupt: re-download it",
            path=path,
            tensor=name,
        )
    return TensorRecord(name=name, file=path, offset=data_start + begin, nbytes=end - begin, dtype=dtype, shape=tuple(shape))


def _check_no_overlap(records: list[TensorRecord], path: Path) -> None:
    previous: TensorRecord | None = None
    for rec in records:
        if rec.nbytes == 0:
            continue
        if previous is not None and rec.offset < previous.offset + previous.nbytes:
            raise OverlappingTensorsError(
                f"{path}: tensors {previous.name!r} (bytes {previous.offset}..{previous.offset + previous.nbytes}) "
                f"and {rec.name!r} (bytes {rec.offset}..{rec.offset + rec.nbytes}) overlap; expected disjoint "
                "ranges: the header is corrupt",
                path=path,
                tensor=rec.name,
            )
        previous = rec


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
