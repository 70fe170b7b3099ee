"""The streaming controller of one model: the resident arena, the slots, the hooks that
bind a streamed block's parameters to its slot around its forward, and prefetching in
the learned execution order."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Checkpoint, CopyRun, coalesce
from .devices import device_ops
from .errors import ClosedError, DeviceMemoryError
from .io import IOConfig, Loader, Ticket
from .plan import GRANULE, MAP_ALIGN, BlockPlan, StreamPlan, TensorPlacement, _round_up
from .probe import Calibration
from .telemetry import BlockTimer, CallStats, Stats

# Resident tensors that need a dtype conversion are loaded through a temporary buffer
# of at most this many bytes (or one tensor, if larger), then converted on the device.
CAST_CHUNK_BYTES = 64 * 2**20


@dataclass
class _Slot:
    index: int
    buffer: torch.Tensor
    block: int | None = None  # block whose bytes are in the slot (or on their way)
    ticket: Ticket | None = None
    users: int = 0  # forwards of that block running now
    free_after: object = None  # device marker: the last compute that read the slot


class Streamer:
    """Controls one streamed model. Get it with :func:`lazystream.streamer_of`.

    ``plan`` says what is resident and streamed; ``load()``/``unload()`` fill or free
    every byte of device memory the model holds; ``session()`` spans a loop of calls;
    ``stats()`` reports what streaming cost; ``close()`` releases everything.
    """

    def __init__(self, model: nn.Module, ckpt: Checkpoint, plan: StreamPlan, io: IOConfig, *, owns_checkpoint: bool,
                 on_calibrated: Callable[[Calibration], StreamPlan | None] | None = None):
        """``on_calibrated``: the first call is timed, block by block, and this is called
        with the result; a plan it returns replaces the current one."""
        self.model = model
        self.ckpt = ckpt
        self.plan = plan
        self.device = torch.device(plan.device)
        self.ops = device_ops(self.device)
        self.loader = Loader(ckpt, self.ops, io)
        self._finalizer = weakref.finalize(self, _release, self.loader, ckpt if owns_checkpoint else None)

        self._aliases = _aliases(model)
        self._meta: dict[str, nn.Parameter] = {}
        for name in [t.name for t in plan.resident_tensors] + [t.name for b in plan.streamed for t in b.tensors]:
            self._meta[name] = _to_meta(self._param(name))
        self._set_params({name: p for name, p in self._meta.items()})
        self._home = _kept_tensors(model, set(self._meta))
        self._runs = {b.index: coalesce((t.record, t.offset) for t in b.tensors) for b in plan.streamed}

        self._exec_order = [b.index for b in plan.blocks]  # guessed; learned on the first call
        self._order = [b.index for b in plan.streamed]  # the streamed blocks in _exec_order
        self._learned = False
        self._on_calibrated = on_calibrated
        self._timer: BlockTimer | None = None
        self._observed: list[int] = []
        self._cursor = 0  # position in _order of the next block to prefetch
        self._wrapped = False
        self._in_session = False

        self._arena: torch.Tensor | None = None
        self._moved: list[torch.Tensor] = []  # buffers and checkpoint-less parameters on the device
        self._scratch: torch.Tensor | None = None
        self._slots: list[_Slot] = []
        self._bound: dict[int, _Slot] = {}
        self._views: dict[tuple[int, int], tuple[dict[str, nn.Parameter], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._loaded = False
        self._closed = False

        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0
        self._call: CallStats | None = None
        self._call_start = 0.0
        self._last = CallStats()
        self._total = CallStats()
        self._calls = 0
        # The root call is wrapped, not hooked: torch runs always_call hooks only for an
        # Exception, and a KeyboardInterrupt must release the lock and the slots too.
        model.forward = self._wrap_forward(model.forward)
        self._block_calls: list[tuple[int, int]] = []  # blocks called outside a root call
        modules = dict(model.named_modules())
        for block in plan.blocks:  # all of them: a new plan may stream any
            module = modules[block.path]
            module.register_forward_pre_hook(_bind_index(self._pre_block, block.index))
            module.register_forward_hook(_bind_index(self._post_block, block.index), always_call=True)

    # -- public -------------------------------------------------------------------------

    def load(self) -> None:
        """Fill the resident set and allocate the slots (done at load; again after unload)."""
        with self._lock:
            self._check_open()
            if self._loaded:
                return
            try:
                self._load()
            except torch.OutOfMemoryError as exc:
                self._free()
                raise self._out_of_memory() from exc
            except BaseException:
                self._free()
                raise
            self._loaded = True

    def unload(self) -> None:
        """Give back every byte of device memory the model holds; the next call loads again."""
        with self._lock:
            if self._depth:
                raise RuntimeError("unload() was called from inside a forward of the model it unloads")
            self._free()

    @contextlib.contextmanager
    def session(self) -> Iterator[Streamer]:
        """Span a loop of calls (denoising steps, tokens): the end of each call prefetches
        the first streamed blocks of the next."""
        self._check_open()
        self._in_session = True
        try:
            yield self
        finally:
            self._in_session = False
            self._wrapped = False

    def stats(self) -> Stats:
        """Per-call and total counters, and the memory in use now."""
        return Stats(
            calls=self._calls,
            last_call=self._last.copy(),
            total=self._total.copy(),
            resident_bytes=0 if self._arena is None else self._arena.numel(),
            kept_bytes=sum(_round_up(t.nbytes, GRANULE) for t in self._moved),
            slot_bytes=sum(s.buffer.numel() for s in self._slots),
            scratch_bytes=0 if self._scratch is None else self._scratch.numel(),
            staging_bytes=self.loader.staging_bytes,
            bytes_read=self.loader.bytes_read,
        )

    def close(self) -> None:
        """Unload, stop the worker, unmap the shards. Later calls raise ClosedError."""
        with self._lock:
            if self._closed:
                return
            self._free()
            self._closed = True
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- loading ------------------------------------------------------------------------

    def _load(self) -> None:
        plan, ops = self.plan, self.ops
        self._arena = ops.empty(plan.resident_bytes)
        self._slots = [_Slot(i, ops.empty(plan.slot_bytes)) for i in range(plan.slots)]
        self._scratch = ops.empty(plan.scratch_bytes) if plan.scratch_bytes else None
        # The allocator can hand out memory whose last reader is still queued on the compute
        # stream; without this marker the copy stream could overwrite it under that reader.
        fresh = ops.compute_done()
        self.loader.allocate(plan.slot_bytes)  # the staging ring, so its failure surfaces here
        for slot in self._slots:
            slot.free_after = fresh
        direct = [t for t in plan.resident_tensors if not t.needs_cast]
        ticket = self.loader.submit(coalesce((t.record, t.offset) for t in direct), self._arena, after=fresh)
        self._load_casts([t for t in plan.resident_tensors if t.needs_cast])
        ticket.wait()
        ops.compute_waits_for(ticket.ready)
        self._set_params({
            t.name: nn.Parameter(_view(self._arena, t.offset, t.dtype, t.record.shape), self._meta[t.name].requires_grad)
            for t in plan.resident_tensors
        })
        stored = {rec.name: rec for rec in self.plan.checkpoint_buffers}
        moved: dict[int, torch.Tensor] = {}  # keeps a tensor shared by two modules shared
        for (module, leaf), (name, home) in self._home.items():
            value = moved.get(id(home))
            if value is None:
                if name in stored:
                    value = self.ckpt.view(stored[name]).to(self.device, dtype=home.dtype, copy=True)
                else:
                    value = home.to(self.device, copy=True)
                if isinstance(home, nn.Parameter):
                    value = nn.Parameter(value, home.requires_grad)
                moved[id(home)] = value
            _registry(module, home)[leaf] = value
        self._moved = list(moved.values())
        # Loading is not the hot path: finish it here, so a first call on any stream sees it.
        ops.host_waits_for(ops.compute_done())

    def _load_casts(self, tensors: list[TensorPlacement]) -> None:
        """Read stored bytes into a bounded temporary buffer and convert them into the
        arena, on the device, CAST_CHUNK_BYTES at a time (a large tensor in pieces)."""
        for pieces in _cast_pieces(tensors, CAST_CHUNK_BYTES):
            runs, end = [], 0
            for t, start, count in pieces:
                size = t.record.dtype.itemsize
                runs.append(CopyRun(t.record.file, t.record.offset + start * size, end, count * size))
                end = _round_up(end + count * size, MAP_ALIGN)
            raw = self.ops.empty(end)
            ticket = self.loader.submit(runs, raw, after=self.ops.compute_done())
            ticket.wait()
            self.ops.compute_waits_for(ticket.ready)
            for (t, start, count), run in zip(pieces, runs):
                numel = t.record.nbytes // t.record.dtype.itemsize
                target = _view(self._arena, t.offset, t.dtype, (numel,))[start:start + count]
                target.copy_(raw[run.dest_offset:run.dest_offset + run.nbytes].view(t.record.dtype))

    def _replace_plan(self, plan: StreamPlan) -> None:
        """Switch to ``plan`` (same model and checkpoint): free, re-lay, load again."""
        if [b.resident for b in plan.blocks] == [b.resident for b in self.plan.blocks] and \
                plan.prefetch == self.plan.prefetch:
            self.plan = plan  # same layout: keep what is loaded, take the new figures
            return
        self._free()
        self.plan = plan
        self._runs = {b.index: coalesce((t.record, t.offset) for t in b.tensors) for b in plan.streamed}
        self._order = [i for i in self._exec_order if not plan.blocks[i].resident]
        self.load()

    def _out_of_memory(self) -> DeviceMemoryError:
        plan, mib = self.plan, 2**20
        free = self.ops.free_bytes()
        fit = plan.largest_keep_gpu_within(free) if free is not None else None
        return DeviceMemoryError(
            f"out of memory on {plan.device} loading {type(self.model).__name__}: the plan needs "
            f"{plan.device_bytes / mib:.1f} MiB (resident {plan.resident_bytes / mib:.1f}, buffers "
            f"{plan.kept_bytes / mib:.1f}, {plan.slots} slot(s) x {plan.slot_bytes / mib:.1f}, cast scratch "
            f"{plan.scratch_bytes / mib:.1f}) with keep_gpu={plan.keep_gpu}"
            + (f"; {free / mib:.1f} MiB are free" if free is not None else "")
            + (f"; keep_gpu={fit} would fit" if fit is not None else "; even keep_gpu=0 does not fit")
            + (f" (with prefetch={plan.prefetch})" if fit is not None else ""),
            path=self.ckpt.folder,
        )

    def _free(self) -> None:
        self.loader.drain()  # no copy may still be writing into a buffer dropped below
        self.ops.wait_compute_idle()  # nor a forward on any stream still reading one
        if not self._loaded and self._arena is None:
            return
        self._set_params(self._meta)
        for (module, leaf), (_, home) in self._home.items():
            _registry(module, home)[leaf] = home
        self._arena = self._scratch = None
        self._slots, self._bound, self._views, self._moved = [], {}, {}, []
        self._cursor, self._wrapped = 0, False
        self._loaded = False

    # -- hooks --------------------------------------------------------------------------
    # Hook bodies are excluded from torch.compile graphs: they move bytes and swap
    # parameters, which a graph must not capture.

    def _wrap_forward(self, forward):
        @functools.wraps(forward)
        def streamed_forward(*args, **kwargs):
            self._enter()
            completed = False
            try:
                out = forward(*args, **kwargs)
                completed = True
                return out
            finally:
                self._exit(completed)

        return streamed_forward

    @torch.compiler.disable
    def _enter(self) -> None:
        self._check_open()
        self._lock.acquire()  # one call at a time: two threads must never mix weights
        try:
            self._check_open()  # close() may have run while this thread waited for the lock
            self._owner = threading.get_ident()
            self._depth += 1
            if self._depth == 1:
                self.ops.note_compute_stream()
                self.load()
                if self._on_calibrated is not None and self._timer is None:
                    modules = dict(self.model.named_modules())
                    self._timer = BlockTimer([modules[b.path] for b in self.plan.blocks], self.device)
                self._call, self._call_start = CallStats(), time.perf_counter()
                self._observed = []
                if not self._wrapped:
                    self._cursor = 0
                self._wrapped = False
                self._prefetch()
        except BaseException:
            self._depth -= 1
            self._lock.release()
            raise

    @torch.compiler.disable
    def _exit(self, completed: bool = True) -> None:
        try:
            if self._depth == 1:
                self._release_bound()
                self._end_call(completed)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
            self._lock.release()

    def _release_bound(self) -> None:
        """Free the slots of blocks still bound when a call ends: a BaseException such as
        KeyboardInterrupt skips the blocks' post-forward hooks."""
        for index, slot in list(self._bound.items()):
            self._set_params({t.name: self._meta[t.name] for t in self.plan.blocks[index].tensors})
            slot.block, slot.ticket, slot.users = None, None, 0
            slot.free_after = self.ops.compute_done()
        self._bound.clear()

    def _end_call(self, completed: bool) -> None:
        call, self._call = self._call, None
        call.seconds = time.perf_counter() - self._call_start
        self._last = call
        self._total.add(call)
        self._calls += 1
        if not self._learned and self._observed:
            seen = list(dict.fromkeys(self._observed))
            self._exec_order = seen + [i for i in self._exec_order if i not in seen]
            self._order = [i for i in self._exec_order if not self.plan.blocks[i].resident]
            self._learned = True
        if self._timer is not None:
            timer, self._timer = self._timer, None
            calibration = timer.finish()
            if completed:  # a call that failed part-way times only part of the blocks
                on_calibrated, self._on_calibrated = self._on_calibrated, None
                plan = on_calibrated(calibration)
                if plan is not None:
                    self._replace_plan(plan)
        if self._in_session and self._loaded:
            self._cursor, self._wrapped = 0, True
            self._prefetch()

    @torch.compiler.disable
    def _pre_block(self, index: int, module: nn.Module, args: tuple) -> None:
        if self.plan.blocks[index].resident:
            if not self._learned and self._depth and self._owner == threading.get_ident():
                self._observed.append(index)
            return
        if self._depth == 0 or self._owner != threading.get_ident():
            # A submodule holding the blocks was called directly, not the model.
            self._enter()
            self._block_calls.append((index, self._depth))
        slot = self._bound.get(index)
        if slot is not None:  # the block calls itself, or runs twice in one forward
            slot.users += 1
            return
        slot = next((s for s in self._slots if s.block == index), None)
        stalled = slot is None
        if slot is None:
            slot = self._take_slot()
            self._submit(slot, index)
        try:
            waited = slot.ticket.wait()
        except BaseException:
            slot.block, slot.ticket = None, None
            raise
        self.ops.compute_waits_for(slot.ticket.ready)
        self._bind(index, slot)
        slot.users = 1
        self._bound[index] = slot
        if index in self._order:
            self._cursor = max(self._cursor, self._order.index(index) + 1)
        if not self._learned:
            self._observed.append(index)
        call = self._call if self._call is not None else CallStats()
        call.add_block(self.plan.blocks[index].nbytes, on_demand=stalled, waited=waited, ticket=slot.ticket)
        self._prefetch()

    @torch.compiler.disable
    def _post_block(self, index: int, module: nn.Module, args: tuple, output: object) -> None:
        if self.plan.blocks[index].resident:
            return
        try:
            slot = self._bound.get(index)
            if slot is None:
                return  # _pre_block failed
            slot.users -= 1
            if slot.users:
                return
            self._set_params({t.name: self._meta[t.name] for t in self.plan.blocks[index].tensors})
            del self._bound[index]
            slot.block, slot.ticket = None, None
            slot.free_after = self.ops.compute_done()
            if torch.is_grad_enabled():
                _refuse_backward(output, self.plan.blocks[index].path)
            self._prefetch()
        finally:
            if self._block_calls and self._block_calls[-1] == (index, self._depth) and self._owner == threading.get_ident():
                self._block_calls.pop()
                self._exit()

    # -- slots --------------------------------------------------------------------------

    def _prefetch(self) -> None:
        """Fill free slots with the next streamed blocks in execution order; inside a
        session, once this call's blocks are all scheduled, go on with the next call's."""
        while True:
            if self._cursor >= len(self._order):
                if not (self._in_session and self._learned and not self._wrapped and self._depth):
                    return
                self._cursor, self._wrapped = 0, True
                if not self._order:
                    return
            index = self._order[self._cursor]
            if index not in self._bound and all(s.block != index for s in self._slots):
                slot = next((s for s in self._slots if s.block is None), None)
                if slot is None:
                    return
                self._submit(slot, index)
            self._cursor += 1

    def _take_slot(self) -> _Slot:
        """A slot for a block that was not prefetched: a free one, else one whose
        prefetched block is not in use (its copy finishes first: jobs run in order)."""
        for slot in self._slots:
            if slot.block is None:
                return slot
        for slot in self._slots:
            if slot.users == 0:
                return slot
        raise RuntimeError(
            f"all {len(self._slots)} slots hold blocks that are running; blocks nest deeper than prefetch="
            f"{self.plan.prefetch} allows: raise prefetch"
        )

    def _submit(self, slot: _Slot, index: int) -> None:
        slot.block = index
        slot.ticket = self.loader.submit(self._runs[index], slot.buffer, after=slot.free_after)

    def _bind(self, index: int, slot: _Slot) -> None:
        key = (slot.index, index)
        if key not in self._views:
            self._views[key] = self._make_views(self.plan.blocks[index], slot.buffer)
        params, casts = self._views[key]
        for target, raw in casts:
            target.copy_(raw)  # on the compute stream, after the bytes landed
        self._set_params(params)

    def _make_views(self, block: BlockPlan, buffer: torch.Tensor):
        params, casts = {}, []
        for t in block.tensors:
            raw = _view(buffer, t.offset, t.record.dtype, t.record.shape)
            if t.needs_cast:
                target = _view(self._scratch, t.cast_offset, t.dtype, t.record.shape)
                casts.append((target, raw))
                raw = target
            params[t.name] = nn.Parameter(raw, self._meta[t.name].requires_grad)
        return params, casts

    # -- parameters ---------------------------------------------------------------------

    def _param(self, name: str) -> nn.Parameter:
        module, leaf = self._aliases[name][0]
        return module._parameters[leaf]

    def _set_params(self, params: dict[str, nn.Parameter]) -> None:
        for name, param in params.items():
            for module, leaf in self._aliases[name]:
                module._parameters[leaf] = param

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(
                f"this {type(self.model).__name__} was closed (streamer_of(model).close()); load it again with "
                "LazyStreamModel.from_pretrained",
                path=self.ckpt.folder,
            )


def _release(loader: Loader, ckpt: Checkpoint | None) -> None:
    """Finalizer: also runs when the model is garbage-collected without close()."""
    loader.close()
    if ckpt is not None:
        ckpt.close()


def _bind_index(hook, index: int):
    def bound(*args):
        return hook(index, *args)

    return bound


def _aliases(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) under which each parameter is registered, keyed by each
    of its qualified names (tied weights have several)."""
    by_id: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module._parameters.items():
            if param is not None:
                by_id.setdefault(id(param), []).append((module, leaf))
                names.setdefault(id(param), []).append(f"{prefix}.{leaf}" if prefix else leaf)
    return {name: list(dict.fromkeys(by_id[key])) for key, ns in names.items() for name in ns}


def _kept_tensors(model: nn.Module, loaded: set[str]) -> dict[tuple[nn.Module, str], tuple[str, torch.Tensor]]:
    """Buffers and parameters not loaded from slots or the arena: moved as they are."""
    kept = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for registry in (module._parameters, module._buffers):
            for leaf, t in registry.items():
                name = f"{prefix}.{leaf}" if prefix else leaf
                if t is not None and name not in loaded and not (isinstance(t, nn.Parameter) and t.device.type == "meta"):
                    kept[(module, leaf)] = (name, t)
    return kept


def _registry(module: nn.Module, tensor: torch.Tensor) -> dict:
    return module._parameters if isinstance(tensor, nn.Parameter) else module._buffers


def _to_meta(param: nn.Parameter) -> nn.Parameter:
    if param.device.type == "meta":
        return param
    return nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def _cast_pieces(tensors: list[TensorPlacement], limit: int) -> Iterator[list[tuple[TensorPlacement, int, int]]]:
    """Groups of (tensor, first element, element count) of at most ``limit`` stored bytes."""
    group, size = [], 0
    for t in tensors:
        itemsize = t.record.dtype.itemsize
        numel = t.record.nbytes // itemsize
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


def _refuse_backward(output: object, path: str) -> None:
    def refuse(grad: torch.Tensor) -> None:
        raise RuntimeError(
            f"backward through streamed block {path!r}: its weights live in a reused buffer, so autograd "
            "cannot keep them. Run inference under torch.no_grad() or torch.inference_mode(), or keep this "
            "block resident (raise keep_gpu)"
        )

    if isinstance(output, torch.Tensor):
        if output.requires_grad:
            output.register_hook(refuse)
    elif isinstance(output, (tuple, list)):
        for item in output:
            _refuse_backward(item, path)
    elif isinstance(output, dict):
        for item in output.values():
            _refuse_backward(item, path)
