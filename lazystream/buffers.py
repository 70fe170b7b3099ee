"""The device memory of one loaded plan: the resident arena (its tensors in their final
dtypes), the slots streamed blocks land in, and the scratch their conversions go through.
``DeviceBuffers`` exists from load to unload; the streamer decides when."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import CopyRun, copy_runs
from .devices import CudaDevice, HostDevice
from .errors import DeviceMemoryError
from .io import Loader, Ticket
from .plan import MAP_ALIGN, BlockPlan, StreamPlan, TensorPlacement, _round_up
from .weights import apply_casts, as_parameter

# Resident tensors that need a dtype conversion are loaded through a temporary buffer
# of at most this many bytes (or one tensor, if larger), then converted on the device.
CAST_CHUNK_BYTES = 64 * 2**20


@dataclass
class Slot:
    index: int
    buffer: torch.Tensor
    block: int | None = None  # block whose bytes are in the slot (or on their way)
    ticket: Ticket | None = None
    users: int = 0  # forwards of that block running now
    free_after: object = None  # device marker: the last compute that read the slot


@dataclass
class Bound:
    """Tensors registered in place of their weights for a call: the resident set, or one
    block's views of a slot. ``bindings`` say where, as of the model scan ``generation``."""

    params: dict[str, nn.Parameter]
    casts: list[tuple[torch.Tensor, torch.Tensor, tuple[torch.dtype, ...]]] = field(default_factory=list)
    bindings: list = field(default_factory=list)
    generation: int = -1


class DeviceBuffers:
    """Allocates and fills the buffers of ``plan`` (``requires_grad(name)``: the flag each
    bound parameter starts with)."""

    def __init__(self, plan: StreamPlan, ops: HostDevice | CudaDevice, loader: Loader,
                 requires_grad: Callable[[str], bool]):
        self.plan, self.ops, self.loader = plan, ops, loader
        self._requires_grad = requires_grad
        self.arena = ops.empty(plan.resident_bytes)
        self.slots = [Slot(i, ops.empty(plan.slot_bytes)) for i in range(plan.slots)]
        self.scratch = ops.empty(plan.scratch_bytes) if plan.scratch_bytes else None
        self.resident = Bound({})
        # The last compute that read the scratch: every streamed block's casts go there, and
        # the next block's casts may run on another stream (a user's side stream).
        self.scratch_free_after: object = None
        self._views: dict[tuple[int, int], Bound] = {}  # (slot, block) -> the block's views of the slot

    @property
    def nbytes(self) -> tuple[int, int, int]:
        """(arena, all slots, scratch) bytes."""
        return (self.arena.numel(), sum(s.buffer.numel() for s in self.slots),
                0 if self.scratch is None else self.scratch.numel())

    def fill(self) -> None:
        """Load the resident set into the arena and make its tensors; the slots stay empty."""
        plan, ops = self.plan, self.ops
        # The allocator can hand out memory whose last reader is still queued on the compute
        # stream; without this marker the copy stream could overwrite it under that reader.
        fresh = ops.compute_done()
        self.loader.allocate(plan.slot_bytes)  # the staging ring, so its failure surfaces here
        for slot in self.slots:
            slot.free_after = fresh
        direct = [t for t in plan.resident_tensors if not t.needs_cast]
        ticket = self.loader.submit(copy_runs(direct), self.arena, after=fresh)
        self._load_casts([t for t in plan.resident_tensors if t.needs_cast])
        ticket.wait()
        ops.compute_waits_for(ticket.ready)
        for t in plan.resident_tensors:
            value = view(self.arena, t.offset, t.dtype, t.source.shape)
            self.resident.params[t.name] = as_parameter(value, self._requires_grad(t.name), t.source.kind)

    def _load_casts(self, tensors: list[TensorPlacement]) -> None:
        """Read stored bytes into a bounded temporary buffer and convert them into the
        arena, on the device, CAST_CHUNK_BYTES at a time (a large tensor in pieces)."""
        for pieces in _cast_pieces(tensors, CAST_CHUNK_BYTES):
            runs, begins, end = [], [], 0
            for t, start, count in pieces:
                size = t.source.dtype.itemsize
                runs += [CopyRun(r.file, r.offset, end + r.dest, r.nbytes)
                         for r in t.source.within(start * size, (start + count) * size)]
                begins.append(end)
                end = _round_up(end + count * size, MAP_ALIGN)
            raw = self.ops.empty(end)
            ticket = self.loader.submit(runs, raw, after=self.ops.compute_done())
            ticket.wait()
            self.ops.compute_waits_for(ticket.ready)
            for (t, start, count), begin in zip(pieces, begins):
                size = t.source.dtype.itemsize
                target = view(self.arena, t.offset, t.dtype, (t.source.numel,))[start:start + count]
                target.copy_(apply_casts(raw[begin:begin + count * size].view(t.source.dtype), t.via))

    def views(self, slot: Slot, block: BlockPlan) -> Bound:
        """``block``'s tensors as views of ``slot`` (made once per slot and block), converted
        into the scratch where their dtype differs from the stored one; call once the
        block's bytes have landed, on the stream that will read them."""
        key = (slot.index, block.index)
        bound = self._views.get(key)
        if bound is None:
            params, casts = {}, []
            for t in block.tensors:
                raw = view(slot.buffer, t.offset, t.source.dtype, t.source.shape)
                if t.needs_cast:
                    target = view(self.scratch, t.cast_offset, t.dtype, t.source.shape)
                    casts.append((target, raw, t.via))
                    raw = target
                params[t.name] = as_parameter(raw, self._requires_grad(t.name), t.source.kind)
            bound = self._views[key] = Bound(params, casts)
        if bound.casts:
            # The previous block's forward may still read the scratch on another stream;
            # without this wait the casts would overwrite its weights under it.
            self.ops.compute_waits_for(self.scratch_free_after)
        for target, raw, via in bound.casts:
            target.copy_(apply_casts(raw, via))
        return bound

    def bound_views(self, slot: Slot, block: int) -> Bound:
        return self._views[(slot.index, block)]

    def release(self, slot: Slot, block: int) -> None:
        """``block``'s forward is done with ``slot`` (and the scratch, where its casts went):
        mark the compute issued so far, which the next copy into the slot and the next casts
        wait for."""
        if self._views[(slot.index, block)].casts:
            slot.free_after = self.scratch_free_after = self.ops.compute_done(slot.buffer, self.scratch)
        else:
            slot.free_after = self.ops.compute_done(slot.buffer)


def out_of_memory(plan: StreamPlan, ops: HostDevice | CudaDevice, model: str, folder) -> DeviceMemoryError:
    """The error for a plan whose buffers did not fit: its terms, the free memory, and the
    largest keep_gpu that would fit."""
    mib = 2**20
    free = ops.free_bytes()
    fit = plan.largest_keep_gpu_within(free) if free is not None else None
    return DeviceMemoryError(
        f"out of memory on {plan.device} loading {model}: the plan needs "
        f"{plan.device_bytes / mib:.1f} MiB (resident {plan.resident_bytes / mib:.1f}, buffers "
        f"{plan.kept_bytes / mib:.1f}, {plan.slots} slot(s) x {plan.slot_bytes / mib:.1f}, cast scratch "
        f"{plan.scratch_bytes / mib:.1f}) with keep_gpu={plan.keep_gpu}"
        + (f"; {free / mib:.1f} MiB are free" if free is not None else "")
        + (f"; keep_gpu={fit} would fit" if fit is not None else "; even keep_gpu=0 does not fit")
        + (f" (with prefetch={plan.prefetch})" if fit is not None else ""),
        path=folder,
    )


def view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def _cast_pieces(tensors: list[TensorPlacement], limit: int) -> Iterator[list[tuple[TensorPlacement, int, int]]]:
    """Groups of (tensor, first element, element count) of at most ``limit`` stored bytes."""
    group, size = [], 0
    for t in tensors:
        itemsize = t.source.dtype.itemsize
        numel = t.source.numel
        start = 0
        while start < numel:
            if size + itemsize > limit and group:
                yield group
                group, size = [], 0
            count = min(numel - start, max(1, (limit - size) // itemsize))
            group.append((t, start, count))
            size += count * itemsize
            start += count
    if group:
        yield group
