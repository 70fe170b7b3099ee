"""A parameter's source: the byte runs of the checkpoint that, laid at their offsets,
make its value. A stored tensor is one run; a tensor the library assembles at load
(stacked experts, a fused projection) is several; a piece of a split tensor is a part
of one. The streamer only ever copies runs, so a conversion changes the runs, never it.

Conversions are read from the libraries themselves: their conversion code runs on
:class:`Traced` tensors, which hold no data, only where each byte of their value comes
from. A view (a split, a slice, a transpose) is worked out by running the op on a meta
tensor, which keeps view offsets and strides; a concatenation or stack joins the runs.
Any other op (arithmetic, a dtype change inside a conversion, a gather) cannot be
expressed as byte runs: its result is poisoned, and the reason names the op.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import _pytree

from .header import TensorRecord
from .weights import ParameterKind

# A conversion whose result would take more copies than this per tensor (an element-wise
# transpose, say) is not streamed: that many small copies would cost more than they save.
MAX_RUNS = 1 << 16


@dataclass(frozen=True)
class ByteRun:
    """``nbytes`` stored bytes at absolute ``offset`` in ``file``, laid at byte ``dest`` of
    the value."""

    file: Path
    offset: int
    nbytes: int
    dest: int


@dataclass(frozen=True)
class TensorSource:
    """Where the value of the model's tensor ``name`` comes from.

    Its ``runs``, laid at their ``dest`` offsets, cover ``[0, nbytes)`` exactly once and
    make the value, row-major, in the stored ``dtype`` and of ``shape`` (the model's).
    ``stored`` names the checkpoint tensors the runs lie in. ``fresh``: the library's
    loader makes the value a new tensor (a stack, a concatenation, a copy), not a view
    of the mapped file (a stored tensor, or a piece of one split along its first
    dimension); on the CPU that decides its alignment, and so the kernels that read it.
    ``kind``: the library's parameter class and state for bytes it does not hold as a
    plain tensor (a GGUF quantized tensor), None for plain tensors.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    runs: tuple[ByteRun, ...]
    stored: tuple[str, ...]
    fresh: bool = False
    kind: ParameterKind | None = None

    @classmethod
    def of(cls, rec: TensorRecord, name: str | None = None) -> TensorSource:
        """A stored tensor as it is: one run (none if it is empty)."""
        runs = (ByteRun(rec.file, rec.offset, rec.nbytes, 0),) if rec.nbytes else ()
        return cls(name or rec.name, rec.dtype, rec.shape, runs, (rec.name,))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def file(self) -> Path | None:
        """The file of its first run, for messages."""
        return self.runs[0].file if self.runs else None

    def within(self, start: int, stop: int) -> list[ByteRun]:
        """The runs of value bytes ``[start, stop)``, with ``dest`` counted from ``start``."""
        out = []
        for run in self.runs:
            lo, hi = max(start, run.dest), min(stop, run.dest + run.nbytes)
            if lo < hi:
                out.append(ByteRun(run.file, run.offset + lo - run.dest, hi - lo, lo - start))
        return out


class SourceMap(dict[str, TensorSource]):
    """The model's tensor name -> its :class:`TensorSource`; ``unused`` names the
    checkpoint tensors (as the library names them after conversion) that no tensor of
    the model is made from."""

    def __init__(self, sources: Mapping[str, TensorSource] | Iterable[tuple[str, TensorSource]] = (),
                 unused: Iterable[str] = ()):
        super().__init__(sources)
        self.unused = tuple(unused)


class ConversionNotStreamableError(Exception):
    """Raised inside tracing; carried on a poisoned :class:`Traced` as its reason."""


# -- tracing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """A row-major value as consecutive pieces (file, offset, nbytes) of stored bytes;
    ``fresh``: a new tensor, not a view of the stored bytes."""

    pieces: tuple[tuple[Path, int, int], ...]
    starts: tuple[int, ...]  # each piece's first byte in the value
    fresh: bool

    @classmethod
    def of(cls, pieces: Iterable[tuple[Path, int, int]], fresh: bool) -> _Layout:
        merged: list[tuple[Path, int, int]] = []
        for file, offset, nbytes in pieces:
            if nbytes == 0:
                continue
            if merged and merged[-1][0] == file and merged[-1][1] + merged[-1][2] == offset:
                merged[-1] = (file, merged[-1][1], merged[-1][2] + nbytes)
            else:
                merged.append((file, offset, nbytes))
        starts, end = [], 0
        for piece in merged:
            starts.append(end)
            end += piece[2]
        return cls(tuple(merged), tuple(starts), fresh)

    def slab(self, start: int, nbytes: int) -> Iterable[tuple[Path, int, int]]:
        """The pieces of value bytes ``[start, start + nbytes)``."""
        i = bisect.bisect_right(self.starts, start) - 1
        stop = start + nbytes
        while nbytes and i < len(self.pieces) and self.starts[i] < stop:
            file, offset, size = self.pieces[i]
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i] + size)
            yield file, offset + lo - self.starts[i], hi - lo
            i += 1


class Traced(torch.Tensor):
    """A data-less tensor that knows where each byte of its value comes from.

    Its ``dtype`` is what the library sees (it may cast on load: the runs stay in
    ``stored_dtype``); ``stored_names`` are the checkpoint tensors it is made from. A poisoned
    one (``reason`` set, on it or on the tensor it is a view of, its ``base``) came out of
    an op that byte runs cannot express, or was changed in place.
    """

    byte_layout: _Layout | None
    stored_dtype: torch.dtype
    stored_names: tuple[str, ...]
    reason: str | None
    base: Traced | None
    read: bool  # an op ran on it: a loader took its value (one it skips is never touched)

    @staticmethod
    def __new__(cls, shape, dtype: torch.dtype, stored_dtype: torch.dtype, layout: _Layout | None,
                names: tuple[str, ...], reason: str | None = None, base: Traced | None = None):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=torch.device("meta"))
        t.byte_layout, t.stored_dtype, t.stored_names, t.reason, t.base = layout, stored_dtype, names, reason, base
        t.read = False
        return t

    @property
    def poison(self) -> str | None:
        """Why its value is not byte runs of the checkpoint (None: it is)."""
        return self.reason or (self.base.reason if self.base is not None else None)

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def of(cls, rec: TensorRecord) -> Traced:
        return cls(rec.shape, rec.dtype, rec.dtype, _Layout.of([(rec.file, rec.offset, rec.nbytes)], False),
                   (rec.name,))

    def __repr__(self) -> str:
        return f"Traced({list(self.shape)}, {self.dtype}, from {list(self.stored_names)[:3]}" + \
               (f", not streamable: {self.reason})" if self.reason else ")")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        traced = [a for a in _pytree.tree_leaves((args, kwargs)) if isinstance(a, Traced)]
        for t in traced:
            t.read = True
        names = tuple(dict.fromkeys(n for t in traced for n in t.stored_names))
        metas = _pytree.tree_map_only(torch.Tensor, _meta_of, (args, kwargs))
        moved = "device" in metas[1]
        if moved:  # a loader's move to its device: the value stays data-less, on meta
            metas = (metas[0], {**metas[1], "device": torch.device("meta")})
        out = func(*metas[0], **metas[1])  # shapes and dtypes as the op gives them
        written = _written(func, args, kwargs)
        if written:  # the library keeps using the tensor it changed (or its base): poison them
            for t in written:
                t.reason = f"{func.overloadpacket.__name__} changes it in place"
                if t.base is not None:
                    t.base.reason = t.reason
            return written[0] if len(written) == 1 else tuple(written)
        poisoned = next((t.poison for t in traced if t.poison), None)
        if poisoned is None:
            try:
                layouts, view_of = _trace(func, args, kwargs, metas, out, moved)
            except ConversionNotStreamableError as exc:
                poisoned = str(exc)
        stored = traced[0].stored_dtype
        if poisoned is not None:
            return _pytree.tree_map_only(torch.Tensor, lambda m: Traced(m.shape, m.dtype, stored, None, names, poisoned),
                                         out)
        base = None if view_of is None else view_of if view_of.base is None else view_of.base
        it = iter(layouts)
        return _pytree.tree_map_only(torch.Tensor, lambda m: Traced(m.shape, m.dtype, stored, next(it), names,
                                                                     base=base), out)


def _written(func, args, kwargs) -> list[Traced]:
    """The traced arguments an in-place or ``out=`` op writes to."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            out += [t for t in _pytree.tree_leaves(value) if isinstance(t, Traced)]
    return out


def _meta_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous meta stand-in: views of it keep their offsets and strides."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def trace(rec: TensorRecord) -> Traced:
    """A :class:`Traced` stand-in for the stored tensor ``rec``."""
    return Traced.of(rec)


def source_of(name: str, value: object) -> TensorSource:
    """The source of a conversion's result ``value`` for the model's tensor ``name``.

    Raises:
        ConversionNotStreamableError: ``value`` is not a traced tensor whose bytes are runs
            of the checkpoint; the message says why.
    """
    if not isinstance(value, Traced):
        raise ConversionNotStreamableError(f"the conversion made it a {type(value).__name__}, not a checkpoint tensor")
    if value.poison:
        raise ConversionNotStreamableError(value.poison)
    itemsize = value.stored_dtype.itemsize
    runs = tuple(ByteRun(f, o, n, s) for (f, o, n), s in zip(value.byte_layout.pieces, value.byte_layout.starts))
    if len(runs) > MAX_RUNS:
        raise ConversionNotStreamableError(f"its value is {len(runs)} separate pieces of the checkpoint "
                                           f"(more than {MAX_RUNS}): an element-wise reordering")
    assert sum(r.nbytes for r in runs) == value.numel() * itemsize
    return TensorSource(name, value.stored_dtype, tuple(value.shape), runs, value.stored_names,
                        value.byte_layout.fresh)


# Ops whose result holds the same values: new tensors (a copy, or a cast whose bytes the
# streamer's own cast makes on the device), and views under another shape.
_COPIES = {"clone", "_to_copy", "contiguous", "lift_fresh_copy"}
_SAME = {"lift_fresh", "detach", "alias", "_unsafe_view", "view", "reshape", "_reshape_alias"}
_JOINS = {"cat", "stack"}


def _trace(func, args, kwargs, metas, out, moved: bool = False) -> tuple[list[_Layout], Traced | None]:
    """The layout of each tensor ``func`` returns, in pytree order, and the tensor they
    are views of (None: new tensors). ``moved``: a loader's ``.to(device, dtype)`` of a
    stored tensor, which stays the mapped tensor where nothing changes; the streamer
    makes any cast itself, so it is not a new tensor either."""
    name = func.overloadpacket.__name__
    if moved and name == "_to_copy":
        name = "alias"
    tensors = [a for a in _pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    if any(not isinstance(t, Traced) for t in tensors):
        raise ConversionNotStreamableError(f"{name} mixes it with a tensor the checkpoint does not hold")
    if len({t.stored_dtype for t in tensors}) > 1:
        raise ConversionNotStreamableError(f"{name} joins tensors stored in different dtypes "
                                           f"({sorted({str(t.stored_dtype) for t in tensors})})")
    if name in _JOINS:
        return [_join(name, args, kwargs)], None
    outs = [m for m in _pytree.tree_leaves(out) if isinstance(m, torch.Tensor)]
    if name in _COPIES | _SAME and len(tensors) == 1 and len(outs) == 1 and outs[0].numel() == tensors[0].numel():
        layout = tensors[0].byte_layout
        return [_Layout(layout.pieces, layout.starts, layout.fresh or name in _COPIES)], \
            None if name in _COPIES else tensors[0]
    schema_returns = func._schema.returns
    if len(tensors) == 1 and schema_returns and all(r.alias_info is not None for r in schema_returns):
        if any(m.element_size() != tensors[0].element_size() for m in outs):
            raise ConversionNotStreamableError(f"{name} reinterprets its bytes as another dtype")
        base = [m for m in _pytree.tree_leaves(metas) if isinstance(m, torch.Tensor)][0]
        return [_strided(tensors[0], m, base) for m in outs], tensors[0]
    raise ConversionNotStreamableError(f"{name} computes new values (only views, copies, concatenations and stacks "
                                       "can be read as byte runs)")


def _join(name: str, args, kwargs) -> _Layout:
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if name == "stack":
        dim = dim % (tensors[0].dim() + 1)
        shapes = [(*t.shape[:dim], 1, *t.shape[dim:]) for t in tensors]
    else:
        tensors = [t for t in tensors if not (t.dim() == 1 and t.numel() == 0)]  # cat skips legacy empty tensors
        dim = dim % tensors[0].dim()
        shapes = [tuple(t.shape) for t in tensors]
    itemsize = tensors[0].stored_dtype.itemsize
    outer = math.prod(shapes[0][:dim])
    slabs = [math.prod(s[dim:]) * itemsize for s in shapes]
    if outer * len(tensors) > MAX_RUNS:
        raise ConversionNotStreamableError(f"{name} along dim {dim} interleaves {outer * len(tensors)} pieces")
    pieces = []
    for o in range(outer):
        for t, slab in zip(tensors, slabs):
            pieces.extend(t.byte_layout.slab(o * slab, slab))
    return _Layout.of(pieces, fresh=True)


def _strided(t: Traced, view: torch.Tensor, base: torch.Tensor) -> _Layout:
    """The layout of ``view``, a view of the meta stand-in ``base`` of ``t``."""
    itemsize = t.stored_dtype.itemsize
    if view.numel() == 0:
        return _Layout.of([], t.byte_layout.fresh)
    sizes, strides = list(view.shape), list(view.stride())
    offset = view.storage_offset() - base.storage_offset()
    # The trailing dims laid out contiguously form one block; the others index blocks.
    block, d = 1, len(sizes)
    while d > 0 and (sizes[d - 1] == 1 or strides[d - 1] == block):
        block *= sizes[d - 1]
        d -= 1
    outer_sizes, outer_strides = sizes[:d], strides[:d]
    n_blocks = math.prod(outer_sizes)
    if n_blocks > MAX_RUNS:
        raise ConversionNotStreamableError(f"a view of it reorders it into {n_blocks} separate pieces")
    starts = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(outer_sizes, outer_strides):
        starts = starts.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    pieces = []
    for start in (starts.reshape(-1) + offset).tolist():
        pieces.extend(t.byte_layout.slab(start * itemsize, block * itemsize))
    return _Layout.of(pieces, t.byte_layout.fresh)
