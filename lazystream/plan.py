"""The stream plan: plain, printable data saying which blocks stay resident, which are
streamed, where each tensor lies in its buffer, and what device memory that costs."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import cost
from .adapters import ModelFamily
from .errors import MissingTensorsError, ShapeMismatchError
from .header import DTYPES
from .source import TensorSource

PLACEMENTS = ("first", "spread", "cost")
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Where a tensor starts decides which kernels run on it (MKL and cuBLAS choose by
# pointer alignment), and so its last bits: outputs equal the library loader's only if
# each tensor is aligned as that loader's would be. On the CPU its tensors are views of
# the mapped file: a tensor's offset in a buffer is kept congruent to its file offset
# modulo MAP_ALIGN (torch's CPU allocations are MAP_ALIGN-aligned), which also keeps a
# run of file-adjacent tensors contiguous, one copy. On CUDA each of its tensors is an
# allocation of its own: each starts at a GRANULE.
MAP_ALIGN = 64
# Every buffer is sized in whole units of the CUDA caching allocator's granule, so the
# plan's bytes are what torch.cuda.memory_allocated() reports for buffers of the small
# pool; a large buffer can take up to 1 MiB more (a block is not split for less).
GRANULE = 512


@dataclass(frozen=True)
class TensorPlacement:
    """One tensor: its name in the model, the byte runs of the checkpoint that make its
    value (``source``: one for a stored tensor, several for one the library assembles),
    and where it goes.

    ``offset`` is in the buffer that receives the stored bytes (a slot for a streamed
    block, the resident arena otherwise): each run lands at ``offset + run.dest``;
    ``cast_offset``, where the target dtype differs from the stored one, is in the buffer
    that holds the converted values. ``via``: dtypes the values pass through before
    ``dtype``, as after ``.to(bfloat16)`` then ``.float()`` (each step rounds as the
    library's own model rounded it).
    """

    name: str
    source: TensorSource
    offset: int
    dtype: torch.dtype
    cast_offset: int | None = None
    via: tuple[torch.dtype, ...] = ()

    @property
    def needs_cast(self) -> bool:
        return self.dtype != self.source.dtype or bool(self.via)

    @property
    def casts(self) -> tuple[torch.dtype, ...]:
        """The conversions from the stored dtype, in turn (none: used as stored)."""
        return (*self.via, self.dtype) if self.needs_cast else ()


@dataclass(frozen=True)
class BlockPlan:
    index: int
    path: str
    resident: bool
    tensors: tuple[TensorPlacement, ...]
    nbytes: int  # stored bytes of its parameters
    cast_bytes: int  # bytes of its converted tensors, when streamed

    @property
    def resident_nbytes(self) -> int:
        """Bytes it takes when resident (in the target dtypes)."""
        return sum(t.source.numel * t.dtype.itemsize for t in self.tensors)

    @property
    def formats(self) -> dict[str, int]:
        """Its stored bytes by the format they are stored in (``{"Q4_K": ..., "F32": ...}``)."""
        return stored_formats(self.tensors)


def stored_formats(tensors: Sequence[TensorPlacement]) -> dict[str, int]:
    """Stored bytes of ``tensors`` by format: a quantized tensor's (``"Q4_K"``), else its
    stored dtype's safetensors name (``"BF16"``), most bytes first."""
    out: dict[str, int] = {}
    for t in tensors:
        label = t.source.kind.label if t.source.kind is not None else _DTYPE_NAMES.get(t.source.dtype, str(t.source.dtype))
        out[label] = out.get(label, 0) + t.source.nbytes
    return dict(sorted(out.items(), key=lambda item: -item[1]))


def describe_formats(formats: Mapping[str, int]) -> str:
    """``"Q4_K 60.2%, F32 39.8%"``: each format's share of the bytes."""
    total = sum(formats.values()) or 1
    return ", ".join(f"{label} {nbytes / total:.1%}" for label, nbytes in formats.items())


@dataclass(frozen=True)
class Prediction:
    """The cost model's view of one call (see lazystream.cost)."""

    seconds: float  # per call, steady state
    compute_seconds: float
    transfer_seconds: float  # moving the streamed bytes at the probed bandwidth
    bound: str  # what limits the speed: "compute", "pcie", "disk" or "memcpy"
    calibrated: bool  # block compute times measured (else unknown, taken as 0)


@dataclass(frozen=True)
class Budget:
    """What keep_gpu="auto" fitted the plan into."""

    device_bytes: int  # max_gpu_memory, given or from the free device memory
    activation_bytes: int  # held back for the call's activations
    source: str  # where each number came from


@dataclass(frozen=True)
class StreamPlan:
    """Which blocks are resident and what every byte of device memory is for."""

    device: str
    dtype: torch.dtype
    keep_gpu: int
    placement: str
    prefetch: int
    blocks: tuple[BlockPlan, ...]
    resident_tensors: tuple[TensorPlacement, ...]  # non-block tensors and resident blocks'
    resident_bytes: int  # the resident arena
    kept_bytes: int  # buffers and checkpoint-less parameters, moved to the device as they are
    checkpoint_buffers: tuple[TensorSource, ...]  # buffers whose values the checkpoint holds
    slot_bytes: int
    scratch_bytes: int  # converted tensors of the streamed block in use
    param_bytes: int  # stored bytes of every parameter the checkpoint holds, in blocks or not
    prediction: Prediction | None = None
    budget: Budget | None = None
    adapter_bytes: int = 0  # of kept_bytes: parameters added after load (LoRA adapters), resident

    @property
    def buffer_bytes(self) -> int:
        return self.kept_bytes - self.adapter_bytes

    @property
    def streamed(self) -> tuple[BlockPlan, ...]:
        return tuple(b for b in self.blocks if not b.resident)

    @property
    def placements(self) -> dict[str, TensorPlacement]:
        """Each checkpoint parameter's placement: in the arena if resident, else in its block."""
        found = {t.name: t for b in self.streamed for t in b.tensors}
        found.update((t.name, t) for t in self.resident_tensors)
        return found

    @property
    def slots(self) -> int:
        return min(self.prefetch, len(self.streamed))

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.kept_bytes + self.slots * self.slot_bytes + self.scratch_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes read per call when every streamed block runs once."""
        return sum(b.nbytes for b in self.streamed)

    @property
    def block_share(self) -> float:
        """The share of the parameter bytes inside blocks: what keep_gpu=0 streams."""
        return sum(b.nbytes for b in self.blocks) / self.param_bytes if self.param_bytes else 0.0

    @property
    def streamed_share(self) -> float:
        """The share of the parameter bytes this plan streams."""
        return self.streamed_bytes / self.param_bytes if self.param_bytes else 0.0

    def estimate_device_bytes(self, keep_gpu: int) -> int:
        """An upper bound of the device bytes the same model would need with ``keep_gpu``
        resident blocks (each tensor counted with the most alignment padding it can get)."""
        resident = choose_resident(len(self.blocks), keep_gpu, self.placement)
        streamed = [b for b in self.blocks if b.index not in resident]
        pad = [GRANULE * (len(b.tensors) + 1) for b in self.blocks]
        outside = self.resident_bytes - sum(b.resident_nbytes for b in self.blocks if b.resident)
        return (outside + self.kept_bytes + sum(self.blocks[i].resident_nbytes + pad[i] for i in resident)
                + min(self.prefetch, len(streamed)) * max((b.nbytes + pad[b.index] for b in streamed), default=0)
                + max((b.resident_nbytes + pad[b.index] for b in streamed if b.resident_nbytes != b.nbytes),
                      default=0))

    def largest_keep_gpu_within(self, nbytes: int) -> int | None:
        """The most resident blocks whose estimated device bytes fit in ``nbytes``."""
        fits = [k for k in range(len(self.blocks) + 1) if self.estimate_device_bytes(k) <= nbytes]
        return max(fits) if fits else None

    def __str__(self) -> str:
        mib = 2**20
        n_res = sum(b.resident for b in self.blocks)
        lines = [
            f"StreamPlan on {self.device}, dtype {str(self.dtype).removeprefix('torch.')}, placement {self.placement!r}",
            f"  blocks: {len(self.blocks)}, resident {n_res}, streamed {len(self.streamed)}"
            + (" (keep_gpu >= blocks: all resident)" if self.keep_gpu >= len(self.blocks) else ""),
            "  " + " ".join("R" if b.resident else "s" for b in self.blocks),
            f"  device memory {self.device_bytes / mib:.1f} MiB = resident {self.resident_bytes / mib:.1f}"
            f" + buffers {self.buffer_bytes / mib:.1f}"
            + (f" + adapters {self.adapter_bytes / mib:.1f}" if self.adapter_bytes else "")
            + f" + {self.slots} slot(s) x {self.slot_bytes / mib:.1f}"
            f" + cast scratch {self.scratch_bytes / mib:.1f}",
            f"  streamed per call {self.streamed_bytes / mib:.1f} MiB, {self.streamed_share:.1%} of the weights "
            f"(blocks hold {self.block_share:.1%}: keep_gpu=0 streams that)",
            f"  block bytes stored as {describe_formats(self.block_formats)}",
        ]
        if self.budget is not None:
            b = self.budget
            lines.append(f"  budget {b.device_bytes / mib:.1f} MiB, of which {b.activation_bytes / mib:.1f} MiB held "
                         f"for activations ({b.source})")
        if self.prediction is not None:
            p = self.prediction

            def ms(seconds: float) -> str:
                return f"{seconds * 1e3:.{3 if seconds < 1e-3 else 1}f} ms"

            if p.calibrated:
                lines.append(f"  predicted {ms(p.seconds)} per call: compute {ms(p.compute_seconds)}, transfer "
                             f"{ms(p.transfer_seconds)}; bound by {p.bound}")
            else:
                # Without measured compute times the call's time and what bounds it are
                # unknown; only the transfer is known, and it is a floor of the call's time.
                lines.append(f"  predicted per call: at least {ms(p.transfer_seconds)}, the transfer at the probed "
                             f"{p.bound} bandwidth" if self.streamed else "  predicted per call: nothing streamed")
                lines.append("  compute: not calibrated yet (measured at the first call of a model loaded with "
                             "placement='cost' or keep_gpu='auto'), so no total time or bound")
        return "\n".join(lines)

    @property
    def block_formats(self) -> dict[str, int]:
        """Every block's stored bytes by format (see :func:`stored_formats`)."""
        return stored_formats([t for b in self.blocks for t in b.tensors])

    def summary(self) -> dict:
        """Plain data for ``lazystream plan --json``."""
        return {
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "keep_gpu": self.keep_gpu,
            "placement": self.placement,
            "prefetch": self.prefetch,
            "blocks": [{"path": b.path, "bytes": b.nbytes, "resident": b.resident, "formats": b.formats}
                       for b in self.blocks],
            "device_bytes": self.device_bytes,
            "resident_bytes": self.resident_bytes,
            "kept_bytes": self.kept_bytes,
            "adapter_bytes": self.adapter_bytes,
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "scratch_bytes": self.scratch_bytes,
            "streamed_bytes_per_call": self.streamed_bytes,
            "param_bytes": self.param_bytes,
            "block_share": self.block_share,
            "streamed_share": self.streamed_share,
            "budget": None if self.budget is None else vars(self.budget),
            # Uncalibrated, only the transfer time is known: the rest is null, not a guess.
            "prediction": None if self.prediction is None else (
                vars(self.prediction) if self.prediction.calibrated
                else {**vars(self.prediction), "seconds": None, "compute_seconds": None, "bound": None}),
        }


def choose_resident(n_blocks: int, keep_gpu: int, placement: str) -> set[int]:
    """Indices of the blocks to keep resident."""
    if placement == "first":
        return cost.first(n_blocks, keep_gpu)
    # "spread" (and "cost" before the cost model has chosen): evenly spaced, block 0
    # first, so each streamed block follows resident compute.
    return cost.spread(n_blocks, keep_gpu)


def check_args(keep_gpu: object, placement: object, prefetch: object) -> None:
    if keep_gpu != "auto" and (not isinstance(keep_gpu, int) or isinstance(keep_gpu, bool) or keep_gpu < 0):
        raise ValueError(f"keep_gpu must be an int >= 0 (blocks kept on the device) or 'auto', got {keep_gpu!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
        raise ValueError(f"prefetch must be an int >= 1 (device slots for streamed blocks), got {prefetch!r}")


def build_plan(
    model: nn.Module,
    sources: Mapping[str, TensorSource],
    block_paths: Sequence[str],
    *,
    keep_gpu: int,
    placement: str,
    prefetch: int,
    dtype: torch.dtype,
    family: ModelFamily,
    device: torch.device,
    resident: set[int] | None = None,
    matched: tuple | None = None,
    casts: Mapping[str, tuple[torch.dtype, ...]] | None = None,
) -> StreamPlan:
    """Match the model's tensors to their sources in the checkpoint and lay out every buffer.

    ``resident`` (block indices) overrides the placement's choice of keep_gpu blocks;
    ``matched`` is match_tensors' result, when several plans are laid out for one model;
    ``casts`` gives tensors the conversions from their stored dtype that a ``.to()`` of
    the model asked for, in place of the library's loading rules.

    Raises:
        MissingTensorsError: model parameters on the meta device that no shard holds.
        ShapeMismatchError: a source whose shape is not its parameter's.
    """
    check_args(keep_gpu, placement, prefetch)
    owners, buffer_names, kept_bytes = matched or match_tensors(model, sources, block_paths)
    resident_idx = resident if resident is not None else choose_resident(len(block_paths), keep_gpu, placement)

    casts = casts or {}

    def chain(r: TensorSource) -> tuple[torch.dtype, ...]:
        if r.name in casts:
            return casts[r.name]
        target = family.target_dtype(r.name, r.dtype, dtype)
        return () if target == r.dtype else (target,)

    def target(r: TensorSource) -> torch.dtype:
        steps = chain(r)
        return steps[-1] if steps else r.dtype

    def placements(names: list[str], cast: bool) -> tuple[list[TensorPlacement], int, int]:
        recs = sorted((sources[n] for n in names), key=_file_order)
        offsets, size = _layout(recs, device.type)
        cast_recs = [r for r in recs if chain(r)] if cast else []
        cast_sizes = [r.numel * target(r).itemsize for r in cast_recs]
        cast_offsets, cast_size = _layout_sizes(cast_sizes, device.type)
        cast_at = {r.name: o for r, o in zip(cast_recs, cast_offsets)}
        out = [TensorPlacement(r.name, r, o, target(r), cast_at.get(r.name), chain(r)[:-1])
               for r, o in zip(recs, offsets)]
        return out, size, cast_size

    blocks = []
    resident_names = list(owners.get(None, []))
    for i, path in enumerate(block_paths):
        names = owners.get(path, [])
        resident = i in resident_idx
        if resident:
            resident_names += names
        tensors, _, cast_size = placements(names, cast=not resident)
        nbytes = sum(sources[n].nbytes for n in names)
        blocks.append(BlockPlan(i, path, resident, tuple(tensors), nbytes, 0 if resident else cast_size))

    # The resident arena holds final values: lay it out in target-dtype sizes.
    res_recs = sorted((sources[n] for n in resident_names), key=_file_order)
    res_targets = [target(r) for r in res_recs]
    if any(chain(r) for r in res_recs):
        sizes = [r.numel * t.itemsize for r, t in zip(res_recs, res_targets)]
        res_offsets, res_size = _layout_sizes(sizes, device.type)
    else:
        res_offsets, res_size = _layout(res_recs, device.type)
    resident = tuple(TensorPlacement(r.name, r, o, t, None, chain(r)[:-1])
                     for r, o, t in zip(res_recs, res_offsets, res_targets))

    streamed = [b for b in blocks if not b.resident]
    return StreamPlan(
        device=str(device),
        dtype=dtype,
        keep_gpu=keep_gpu,
        placement=placement,
        prefetch=prefetch,
        blocks=tuple(blocks),
        resident_tensors=resident,
        resident_bytes=res_size,
        kept_bytes=kept_bytes,
        checkpoint_buffers=tuple(sources[n] for n in buffer_names),
        slot_bytes=max((_layout([t.source for t in b.tensors], device.type)[1] for b in streamed), default=0),
        scratch_bytes=max((b.cast_bytes for b in streamed), default=0),
        param_bytes=sum(sources[n].nbytes for names in owners.values() for n in names),
    )


def match_tensors(
    model: nn.Module, sources: Mapping[str, TensorSource], block_paths: Sequence[str]
) -> tuple[dict[str | None, list[str]], list[str], int]:
    """Source names of parameters grouped by the block that owns them (None: outside
    every block); source names of buffers (always resident, loaded in place); and the
    bytes of the tensors moved to the device as they are (buffers, parameters the
    checkpoint lacks such as adapters added later).

    A tensor shared under several names (tied weights) is loaded once, under the name its
    source has; it belongs to a block only if every one of its names is inside it.
    ``sources.unused`` (a :class:`~lazystream.source.SourceMap`'s) joins the warning
    about checkpoint tensors the model does not use.
    """
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    owners: dict[str | None, list[str]] = {}
    missing, used, buffers, kept_bytes = [], set(), [], 0
    for key, names in aliases.items():
        t = tensors[key]
        stored = next((n for n in names if n in sources), None)
        if not isinstance(t, nn.Parameter) or stored is None:
            kept_bytes += _round_up(t.nbytes, GRANULE)  # moved to the device as it is
        if stored is None:
            if t.device.type == "meta":
                missing.append(names[0])
            continue
        used.update(names)
        rec = sources[stored]
        if tuple(t.shape) != rec.shape:
            made_of = "" if rec.stored == (stored,) else f" (made of {', '.join(rec.stored[:4])})"
            raise ShapeMismatchError(
                f"{rec.file}: tensor {stored!r}{made_of} has shape {list(rec.shape)}, but the model's "
                f"{type(model).__name__} expects {list(t.shape)}; the config and weights do not match",
                path=rec.file,
                tensor=stored,
            )
        if isinstance(t, nn.Parameter):
            owners.setdefault(_owning_block(names, block_paths), []).append(stored)
        else:
            buffers.append(stored)
    if missing:
        raise MissingTensorsError.of(type(model).__name__, missing)
    unexpected = sorted(set(sources) - used) + sorted(getattr(sources, "unused", ()))
    if unexpected:
        warnings.warn(
            f"{len(unexpected)} checkpoint tensor(s) are not used by {type(model).__name__}: {unexpected[:10]}",
            stacklevel=3,
        )
    return owners, buffers, kept_bytes


def _owning_block(names: list[str], block_paths: Sequence[str]) -> str | None:
    for path in block_paths:
        if all(n.startswith(path + ".") for n in names):
            return path
    return None


def _file_order(source: TensorSource) -> tuple[str, int]:
    first = source.runs[0] if source.runs else None
    return (str(first.file), first.offset) if first else ("", 0)


def _follows(prev: TensorSource | None, source: TensorSource) -> bool:
    """Whether ``source``, a view of one run, starts where ``prev``, one too, ends in the file."""
    return (prev is not None and len(prev.runs) == 1 and len(source.runs) == 1 and not prev.fresh
            and not source.fresh
            and prev.runs[0].file == source.runs[0].file
            and prev.runs[0].offset + prev.runs[0].nbytes == source.runs[0].offset)


def _layout(sources: Sequence[TensorSource], device_type: str) -> tuple[list[int], int]:
    """Offsets for ``sources`` (in file order) aligned as the library's loader aligns
    them on ``device_type`` (see MAP_ALIGN); the buffer's size. A value the library
    assembles (a stack, a concatenation) is a fresh allocation there: MAP_ALIGN-aligned."""
    offsets, end, prev = [], 0, None
    for rec in sources:
        if device_type == "cuda":
            end = _round_up(end, GRANULE)
        elif rec.fresh or not rec.runs:
            end = _round_up(end, MAP_ALIGN)
        elif not _follows(prev, rec):
            end = _round_up(end, MAP_ALIGN) + rec.runs[0].offset % MAP_ALIGN
        if end % rec.dtype.itemsize:  # a misaligned file offset: a typed view needs alignment
            end = _round_up(end, MAP_ALIGN)
        offsets.append(end)
        end += rec.nbytes
        prev = rec
    return offsets, _round_up(end, GRANULE)


def _layout_sizes(sizes: Sequence[int], device_type: str) -> tuple[list[int], int]:
    """Offsets for fresh tensors of ``sizes`` bytes, aligned as fresh allocations are."""
    align = GRANULE if device_type == "cuda" else MAP_ALIGN
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end = _round_up(end + size, align)
    return offsets, _round_up(end, GRANULE)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
