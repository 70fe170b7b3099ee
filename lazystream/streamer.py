"""The streaming controller of one model: the resident arena, the slots, the hooks that
bind a streamed block's parameters to its slot around its forward, and prefetching in
the learned execution order.

What a checkpoint parameter is at each moment is decided here and nowhere else: during a
call, a plain tensor on the device (a view of the resident arena, or of a slot while its
block runs); between calls, its :class:`~lazystream.weights.CheckpointWeight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .buffers import Bound, DeviceBuffers, Slot, out_of_memory
from .checkpoint import Checkpoint, CopyRun, copy_runs, read_value
from .cudagraphs import refuse_cuda_graph_compile
from .devices import device_ops
from .errors import ClosedError, UnsupportedOperationError
from .grads import GradGuard, refuse_backward
from .hooks import BlockHooks, wrap_forward, wrap_load_state_dict
from .io import IOConfig, Loader
from .moves import probe
from .plan import GRANULE, StreamPlan, _round_up
from .probe import Calibration
from .telemetry import BlockTimer, CallStats, Stats
from .tensors import ModelTensors


@dataclass
class _Resources:
    """What the finalizer releases; the loader changes when the model moves device."""

    loader: Loader
    ckpt: Checkpoint | None


class Streamer:
    """Controls one streamed model. Get it with :func:`lazystream.streamer_of`.

    ``plan`` says what is resident and streamed; ``load()``/``unload()`` fill or free
    every byte of device memory the model holds; ``session()`` spans a loop of calls;
    ``stats()`` reports what streaming cost; ``close()`` releases everything.
    """

    def __init__(self, model: nn.Module, ckpt: Checkpoint, plan: StreamPlan, io: IOConfig, *, owns_checkpoint: bool,
                 on_calibrated: Callable[[Calibration], StreamPlan | None] | None = None,
                 replan: Callable[..., tuple[StreamPlan, Callable | None]] | None = None):
        """``on_calibrated``: the first call is timed, block by block, and this is called
        with the result; a plan it returns replaces the current one. ``replan(device=,
        dtype=, casts=)``: the plan after a ``.to()`` of the model (None: refuse moves)."""
        self.model = model
        self.ckpt = ckpt
        self.plan = plan
        self.device = torch.device(plan.device)
        self.ops = device_ops(self.device)
        self._io = io
        self._resources = _Resources(Loader(ckpt, self.ops, io), ckpt if owns_checkpoint else None)
        self._finalizer = weakref.finalize(self, _release, self._resources)
        self._replan = replan

        self.tensors = ModelTensors(model, plan, functools.partial(read_value, ckpt))
        self._runs = _block_runs(plan)

        self._exec_order = [b.index for b in plan.blocks]  # guessed; learned on the first call
        self._order = [b.index for b in plan.streamed]  # the streamed blocks in _exec_order
        self._learned = False
        self._on_calibrated = on_calibrated
        self._timer: BlockTimer | None = None
        self._observed: list[int] = []
        self._cursor = 0  # position in _order of the next block to prefetch
        self._wrapped = False
        self._in_session = False

        self._buffers: DeviceBuffers | None = None  # while loaded
        self._bound: dict[int, Slot] = {}  # streamed blocks bound now, and their slots
        self._grads = GradGuard()
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
        # Hook bodies move bytes and swap parameters: torch.compile must run them as they
        # are, never trace them. Marked here rather than at import: torch.compiler.disable
        # imports torch._dynamo (~70 MiB, 1.6 s), which a model class imports anyway.
        self._enter = torch.compiler.disable(self._enter)
        self._exit = torch.compiler.disable(self._exit)
        self._hooks = BlockHooks(torch.compiler.disable(self._pre_block), torch.compiler.disable(self._post_block))
        model.forward = wrap_forward(model.forward, self._enter, self._exit)
        model._apply = self._apply_to_model  # .to(), .cuda(), .half(): re-plan, see there
        model.load_state_dict = wrap_load_state_dict(model.load_state_dict, model, self.tensors)
        self._block_calls: list[tuple[int, int]] = []  # blocks called outside a root call
        self._hooks.update(model, plan)

    # -- public -------------------------------------------------------------------------

    def load(self) -> None:
        """Fill the resident set and allocate the slots (done at load; again after unload)."""
        with self._lock:
            self._check_open()
            if self._loaded:
                return
            try:
                with _plain_tensors():
                    self._buffers = DeviceBuffers(self.plan, self.ops, self.loader,
                                                  lambda name: self.tensors.weights[name].requires_grad)
                    self._buffers.fill()
                for name, param in self._buffers.resident.params.items():
                    self.tensors.sources[name].bound = param
                self.tensors.move_kept(self.device)
                # Loading is not the hot path: finish it here, so a first call on any stream sees it.
                self.ops.host_waits_for(self.ops.compute_done())
            except torch.OutOfMemoryError as exc:
                self._free()
                raise out_of_memory(self.plan, self.ops, type(self.model).__name__, self.ckpt.folder) from exc
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
        arena, slots, scratch = (0, 0, 0) if self._buffers is None else self._buffers.nbytes
        return Stats(
            calls=self._calls,
            last_call=self._last.copy(),
            total=self._total.copy(),
            resident_bytes=arena,
            kept_bytes=self.tensors.kept_nbytes(GRANULE) if self._loaded else 0,
            slot_bytes=slots,
            scratch_bytes=scratch,
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

    @property
    def loader(self) -> Loader:
        return self._resources.loader

    def __reduce__(self):
        raise UnsupportedOperationError(
            f"a streamed {type(self.model).__name__} cannot be pickled or deep-copied: its weights stay in the "
            "checkpoint. Save it with save_pretrained (or torch.save(model.state_dict())), or load a second copy "
            "with LazyStreamModel.from_pretrained"
        )

    def __deepcopy__(self, memo):
        self.__reduce__()

    # -- the weights ---------------------------------------------------------------------

    def _take_in_changes(self) -> None:
        """The model gained or lost modules or tensors (adapters, say): take them in."""
        if self._loaded:
            self.tensors.move_kept(self.device)
        adapters = sum(_round_up(t.nbytes, GRANULE) for t in self.tensors.kept if isinstance(t, nn.Parameter))
        kept = self.tensors.kept_nbytes(GRANULE)
        if (kept, adapters) != (self.plan.kept_bytes, self.plan.adapter_bytes):
            self.plan = dataclasses.replace(self.plan, kept_bytes=kept, adapter_bytes=adapters)

    # -- loading ------------------------------------------------------------------------

    def _replace_plan(self, plan: StreamPlan) -> None:
        """Switch to ``plan`` (same model and checkpoint): free, re-lay, load again."""
        plan = dataclasses.replace(plan, kept_bytes=self.plan.kept_bytes, adapter_bytes=self.plan.adapter_bytes)
        if [b.resident for b in plan.blocks] == [b.resident for b in self.plan.blocks] and \
                plan.prefetch == self.plan.prefetch and plan.device == self.plan.device and \
                plan.placements == self.plan.placements:
            self.plan = plan  # same layout: keep what is loaded, take the new figures
            return
        loaded = self._loaded
        self._free()
        self.plan = plan
        self._runs = _block_runs(plan)
        self._order = [i for i in self._exec_order if not plan.blocks[i].resident]
        self._learned = False  # blocks that newly stream take their place in the order at the next call
        self._hooks.update(self.model, plan)
        self.tensors.retarget(plan)
        if loaded:
            self.load()

    def _free(self) -> None:
        self.loader.drain()  # no copy may still be writing into a buffer dropped below
        self.ops.wait_compute_idle()  # nor a forward on any stream still reading one
        if not self._loaded and self._buffers is None:
            return
        for source in self.tensors.sources.values():
            source.bound = None
        if self.device.type != "cpu":
            self.tensors.move_kept(torch.device("cpu"))
        self._buffers, self._bound = None, {}
        self._grads.forget()
        self._cursor, self._wrapped = 0, False
        self._loaded = False

    # -- moves and casts ----------------------------------------------------------------

    def _apply_to_model(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """``Module._apply`` of the model (``to``, ``cuda``, ``cpu``, ``half``, ``float``...):
        where the weights' device or dtypes change, re-plan and reload for them, so every
        weight is what the library's model would hold after the same call."""
        with self._lock:
            self._check_open()
            if self._depth:
                raise UnsupportedOperationError("the model was moved or cast from inside its own forward")
            if self.tensors.refresh():
                self._take_in_changes()
            conversion = probe(fn, self.plan.placements, self.device, self.plan.dtype)
            if not conversion.changes(self.device, self.plan.placements):
                self.tensors.apply_to_kept(fn)
                if not self._loaded:
                    self.tensors.move_kept(torch.device("cpu"))
                return self.model
            if self._replan is None:
                raise UnsupportedOperationError(
                    f"this {type(self.model).__name__} was streamed by lazystream.attach, which cannot re-plan it for "
                    "another device or dtype; pass device= and dtype= to attach instead"
                )
            plan, on_calibrated = self._replan(device=conversion.device, dtype=conversion.dtype,
                                               casts=conversion.casts)
            loaded = self._loaded
            self._free()
            if conversion.device != self.device:
                self._move_to(conversion.device)
            self.tensors.apply_to_kept(fn)
            self.tensors.move_kept(torch.device("cpu"))
            self._replace_plan(plan)
            self._take_in_changes()
            if on_calibrated is not None:
                self._on_calibrated = on_calibrated
            if loaded:
                self.load()
            return self.model

    def _move_to(self, device: torch.device) -> None:
        self.loader.close()
        self.device = device
        self.ops = device_ops(device)
        self._resources.loader = Loader(self.ckpt, self.ops, self._io)
        self._timer = None

    # -- hooks --------------------------------------------------------------------------

    def _enter(self) -> None:
        self._check_open()
        self._refuse_capture()
        self._lock.acquire()  # one call at a time: two threads must never mix weights
        try:
            self._check_open()  # close() may have run while this thread waited for the lock
            self._owner = threading.get_ident()
            self._depth += 1
            if self._depth == 1:
                self.ops.note_compute_stream()
                self._begin_call()
        except BaseException:
            self._depth -= 1
            self._lock.release()
            raise

    def _begin_call(self) -> None:
        changed = self.tensors.refresh()
        self.tensors.refuse_other_offloaders()
        if changed:
            self._take_in_changes()
        self.load()
        self._bind_all(self._buffers.resident)
        if self._on_calibrated is not None and self._timer is None:
            modules = dict(self.model.named_modules())
            self._timer = BlockTimer([modules[b.path] for b in self.plan.blocks], self.device)
        self._call, self._call_start = CallStats(), time.perf_counter()
        self._observed = []
        if not self._wrapped:
            self._cursor = 0
        self._wrapped = False
        self._prefetch()

    def _exit(self, completed: bool = True) -> None:
        try:
            if self._depth == 1:
                self._release_bound()
                self.tensors.unbind(self._buffers.resident.bindings)
                self._end_call(completed)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
            self._lock.release()

    def _refuse_capture(self) -> None:
        if self.ops.is_cuda and torch.cuda.is_current_stream_capturing():
            raise UnsupportedOperationError(
                f"a CUDA graph is being captured through streamed {type(self.model).__name__}: a graph would replay "
                "the copies of one call's blocks into slots that later calls reuse for other blocks. Capture only "
                "compute without streamed blocks, or use torch.compile without mode='reduce-overhead'"
            )

    def _bind_all(self, bound: Bound) -> None:
        if bound.generation != self.tensors.generation:
            bound.bindings, bound.generation = self.tensors.bindings(bound.params), self.tensors.generation
        if torch.is_grad_enabled():  # under no_grad or inference_mode, requires_grad changes nothing
            with _plain_tensors():
                for name, param in bound.params.items():
                    self._grads.sync(name, param, self.tensors.weights[name].requires_grad)
        self.tensors.bind(bound.bindings)

    def _release_bound(self) -> None:
        """Free the slots of blocks still bound when a call ends: a BaseException such as
        KeyboardInterrupt skips the blocks' post-forward hooks."""
        for index, slot in list(self._bound.items()):
            self._unbind_block(index, slot)
            self._buffers.release(slot, index)
            slot.block, slot.ticket, slot.users = None, None, 0
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

    def _pre_block(self, index: int, module: nn.Module, args: tuple) -> None:
        if self.plan.blocks[index].resident:
            return
        if self.ops.is_cuda:
            refuse_cuda_graph_compile(type(self.model).__name__, self.plan.blocks[index].path)
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
            self._unbind_block(index, slot)
            del self._bound[index]
            self._buffers.release(slot, index)
            slot.block, slot.ticket = None, None
            if torch.is_grad_enabled():
                refuse_backward(output, self.plan.blocks[index].path)
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

    @property
    def _slots(self) -> list[Slot]:
        return [] if self._buffers is None else self._buffers.slots

    def _take_slot(self) -> Slot:
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

    def _submit(self, slot: Slot, index: int) -> None:
        slot.block = index
        slot.ticket = self.loader.submit(self._runs[index], slot.buffer, after=slot.free_after)

    def _bind(self, index: int, slot: Slot) -> None:
        with _plain_tensors():  # conversions run on the compute stream, after the bytes landed
            bound = self._buffers.views(slot, self.plan.blocks[index])
        self._bind_all(bound)

    def _unbind_block(self, index: int, slot: Slot) -> None:
        self.tensors.unbind(self._buffers.bound_views(slot, index).bindings)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(
                f"this {type(self.model).__name__} was closed (streamer_of(model).close()); load it again with "
                "LazyStreamModel.from_pretrained",
                path=self.ckpt.folder,
            )


@contextlib.contextmanager
def _plain_tensors() -> Iterator[None]:
    """Buffers and views made here are ordinary tensors even inside the user's
    ``torch.inference_mode()``: the worker thread (outside it) writes into them, and
    later calls outside it use them."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _release(resources: _Resources) -> None:
    """Finalizer: also runs when the model is garbage-collected without close()."""
    resources.loader.close()
    if resources.ckpt is not None:
        resources.ckpt.close()


def _block_runs(plan: StreamPlan) -> dict[int, list[CopyRun]]:
    return {b.index: copy_runs(b.tensors) for b in plan.streamed}
