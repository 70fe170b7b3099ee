"""Fuzz the safetensors header reader with mutations of one valid file: whatever the bytes,
``read_header`` and ``Checkpoint.open`` either accept the file, and then every record lies
inside it without overlap and every tensor reads, or raise a LazyStreamError naming the
file. Any other exception, a crash or a hang is a bug."""

from __future__ import annotations

import copy
import faulthandler
import itertools
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors.torch import save

from lazystream import Checkpoint
from lazystream.errors import LazyStreamError
from lazystream.header import DTYPES, ShardHeader, read_header

# Hypothesis caches what it learns (constants, unicode tables) in .hypothesis/ under the
# working directory, from the moment this module is collected: keep it out of the source tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "lazystream-hypothesis")

SEED_TENSORS = {
    "embed.weight": torch.arange(24, dtype=torch.float32).reshape(4, 6),
    "norm.weight": torch.ones(6, dtype=torch.bfloat16),
    "proj.weight": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    "mask": torch.tensor([True, False, True]),
    "step": torch.tensor(7, dtype=torch.int64),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
    "scale": torch.tensor([0.5, 2.0], dtype=torch.float8_e4m3fn),
}
SEED = save(SEED_TENSORS, metadata={"format": "pt"})
SEED_HEADER_LEN = int.from_bytes(SEED[:8], "little")
SEED_HEADER = json.loads(SEED[8:8 + SEED_HEADER_LEN])
SEED_DATA = SEED[8 + SEED_HEADER_LEN:]
SEED_OFFSETS = [entry["data_offsets"] for name, entry in SEED_HEADER.items() if name != "__metadata__"]

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine: a failure reproduces
    database=None,  # nothing to keep between runs: the examples are derandomized
    # tmp_path is shared by the examples of one test; each example writes a new file name.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def with_header(header: object, data: bytes = SEED_DATA) -> bytes:
    """A file whose length prefix matches ``header`` (JSON-encoded unless already bytes)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


# -- mutations of the seed file -------------------------------------------------------------

odd_ints = st.one_of(
    st.integers(-4, 64),
    st.integers(0, len(SEED_DATA) + 8),
    st.sampled_from([2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**30]),
    st.integers(),
)
dimensions = st.integers(0, 16) | st.sampled_from([0, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64])
json_scalars = st.one_of(
    st.none(), st.booleans(), odd_ints, st.floats(), st.text(max_size=8), st.sampled_from(list(DTYPES)),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def flipped_bytes(draw) -> bytes:
    """XOR a few bytes of one region: the length prefix, the header or the data."""
    start, end = draw(st.sampled_from([(0, 8), (8, 8 + SEED_HEADER_LEN), (8 + SEED_HEADER_LEN, len(SEED))]))
    out = bytearray(SEED)
    for pos, mask in draw(st.lists(st.tuples(st.integers(start, end - 1), st.integers(1, 255)), min_size=1, max_size=6)):
        out[pos] ^= mask
    return bytes(out)


truncated = st.integers(0, len(SEED) - 1).map(lambda n: SEED[:n])


def splice(draw, original: bytes) -> bytes:
    pos = draw(st.integers(0, len(original)))
    return original[:pos] + draw(st.binary(max_size=32)) + original[pos + draw(st.integers(0, 16)):]


@st.composite
def spliced(draw) -> bytes:
    """Replace a stretch with random bytes: anywhere in the file (the length prefix then
    mostly lies), or inside the header with the prefix fixed, so the result gets parsed."""
    if draw(st.booleans()):
        return splice(draw, SEED)
    return with_header(splice(draw, SEED[8:8 + SEED_HEADER_LEN]))


@st.composite
def random_json_header(draw) -> bytes:
    """Any JSON at all as the header, or an object of tensor-like entries of random fields."""
    entry_keys = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])
    entries = st.dictionaries(entry_keys, json_values, max_size=4) | json_values
    header = draw(json_values | st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), entries, max_size=4))
    return with_header(header, draw(st.sampled_from([b"", SEED_DATA, SEED_DATA[:len(SEED_DATA) // 2]])))


def resize_consistently(draw, entry: dict) -> None:
    """A new shape of odd dimensions, with data_offsets spanning exactly its bytes."""
    shape = draw(st.lists(dimensions, max_size=4))
    begin = entry["data_offsets"][0]
    entry["shape"] = shape
    entry["data_offsets"] = [begin, begin + math.prod(shape) * DTYPES[entry["dtype"]].itemsize]


def shift(draw, entry: dict) -> None:
    """Move the tensor's byte range, keeping its length: it may now overlap another."""
    begin, end = entry["data_offsets"]
    delta = draw(st.integers(-begin, len(SEED_DATA) - end))
    entry["data_offsets"] = [begin + delta, end + delta]


@st.composite
def mutated_entries(draw) -> bytes:
    """The seed's header with some tensors changed: a field set to an odd value (a dtype
    string, a shape or offsets of random ints, huge and negative among them), a field
    dropped, a consistent resize, a shifted range, a tensor added; then the data section
    kept, cut or extended."""
    header = copy.deepcopy(SEED_HEADER)
    names = [n for n in header if n != "__metadata__"]
    field_values = {
        "dtype": st.sampled_from(list(DTYPES)) | st.text(max_size=6) | json_values,
        "shape": st.lists(odd_ints, max_size=4) | json_values,
        "data_offsets": st.lists(odd_ints, min_size=2, max_size=2) | st.lists(odd_ints, max_size=3) | json_values,
    }
    for _ in range(draw(st.integers(1, 2))):
        entry = header[draw(st.sampled_from(names))]
        how = draw(st.sampled_from(["set", "set", "drop", "resize", "shift"]))
        untouched = entry.get("data_offsets") in SEED_OFFSETS and str(entry.get("dtype")) in DTYPES
        if how in ("resize", "shift") and untouched:
            (resize_consistently if how == "resize" else shift)(draw, entry)
        elif how == "drop":
            entry.pop(draw(st.sampled_from(list(field_values))), None)
        else:
            field = draw(st.sampled_from(list(field_values)))
            entry[field] = draw(field_values[field])
    if draw(st.integers(0, 4)) == 0:
        header[draw(st.text(max_size=6))] = {k: draw(v) for k, v in field_values.items()}
    if draw(st.integers(0, 9)) == 0:
        header["__metadata__"] = draw(json_values)
    data = draw(st.sampled_from([SEED_DATA, SEED_DATA[:-1], SEED_DATA + b"\0" * 8, b""]))
    return with_header(header, data)


mutated_files = st.one_of(flipped_bytes(), truncated, spliced(), random_json_header(), mutated_entries())


# -- checks -----------------------------------------------------------------------------------

_file_numbers = itertools.count()


def write_as_new_file(folder: Path, content: bytes, name: str) -> Path:
    """Put ``content`` at ``folder/name`` through a new inode, so no mapping of an earlier
    example's file can see its bytes change."""
    folder.mkdir(exist_ok=True)
    staging = folder.parent / f"staging-{next(_file_numbers)}"
    staging.write_bytes(content)
    os.replace(staging, folder / name)
    return folder / name


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_records_inside_and_disjoint(h: ShardHeader, content: bytes) -> None:
    assert h.file_size == len(content)
    assert h.data_start == 8 + int.from_bytes(content[:8], "little")
    end_of_previous = h.data_start
    for rec in h.records:  # in file order
        assert rec.nbytes == math.prod(rec.shape) * rec.dtype.itemsize
        assert h.data_start <= rec.offset and rec.offset + rec.nbytes <= h.file_size, rec
        if rec.nbytes:
            assert rec.offset >= end_of_previous, f"{rec.name} overlaps the tensor before it"
            end_of_previous = rec.offset + rec.nbytes


def assert_names_the_file(err: LazyStreamError, path: Path) -> None:
    assert err.path == str(path)
    assert str(path) in str(err)


@pytest.fixture(autouse=True)
def fail_if_hung():
    """A hang is a failure too: dump every thread's stack and exit after 120 s."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_seed_file_reads_back(tmp_path):
    path = write_as_new_file(tmp_path / "model", SEED, "model.safetensors")
    assert_records_inside_and_disjoint(read_header(path), SEED)
    with Checkpoint.open(path.parent) as ckpt:
        assert set(ckpt) == set(SEED_TENSORS)
        for name, expected in SEED_TENSORS.items():
            assert torch.equal(as_bytes(ckpt.tensor(name)), as_bytes(expected))


@FUZZ
@given(content=mutated_files)
def test_read_header_accepts_valid_files_and_refuses_the_rest(tmp_path, content):
    path = write_as_new_file(tmp_path / "files", content, "model.safetensors")
    try:
        h = read_header(path)
    except LazyStreamError as err:
        event(type(err).__name__)  # --hypothesis-show-statistics shows how often each error was hit
        assert_names_the_file(err, path)
    else:
        event("accepted")
        assert_records_inside_and_disjoint(h, content)


@FUZZ
@given(content=mutated_files)
# Always tried, as random search seldom builds it: an empty tensor whose other dimensions
# overflow what torch can hold (no bytes to read, yet torch.empty refuses the shape).
@example(content=with_header({"a": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, b""))
def test_checkpoint_opens_only_files_whose_every_tensor_reads(tmp_path, content):
    path = write_as_new_file(tmp_path / "model", content, "model.safetensors")
    try:
        ckpt = Checkpoint.open(path.parent)
    except LazyStreamError as err:
        assert_names_the_file(err, path)
    else:
        with ckpt:
            for name, rec in ckpt.items():
                t = ckpt.tensor(name)
                assert (t.dtype, t.shape) == (rec.dtype, rec.shape)
                assert as_bytes(t).numpy().tobytes() == content[rec.offset:rec.offset + rec.nbytes]
