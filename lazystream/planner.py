"""Choosing the plan: keep_gpu="auto" fits a memory budget, placement="cost" picks
the resident blocks by the cost model, and every plan carries its predicted time."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import cost
from .adapters import ModelFamily
from .errors import DeviceMemoryError
from .source import TensorSource
from .plan import Budget, Prediction, StreamPlan, build_plan, check_args, match_tensors
from .probe import Bandwidth, Calibration

# Before the first call measured them, activations are assumed to take this share of
# the budget; the plan is redone with the measured figure after that call.
PROVISIONAL_ACTIVATION_SHARE = 0.10
# Held back from the free device memory when no max_gpu_memory is given: allocator
# fragmentation, library workspaces (cuBLAS) and other users of the device.
FREE_MEMORY_RESERVE_SHARE = 0.05

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """``6442450944``, ``"6GiB"``, ``"6.5 GB"`` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value)) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a byte count such as 6442450944 or '6GiB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class PlanRequest:
    """Everything the user asked for, validated; the planner turns it into a plan."""

    keep_gpu: int | str
    placement: str
    prefetch: int
    max_gpu_memory: int | None = None
    activation_reserve: int | None = None

    @classmethod
    def of(cls, keep_gpu, placement, prefetch, max_gpu_memory=None, activation_reserve=None) -> PlanRequest:
        check_args(keep_gpu, placement, prefetch)
        return cls(keep_gpu, placement, prefetch,
                   None if max_gpu_memory is None else parse_bytes(max_gpu_memory),
                   None if activation_reserve is None else parse_bytes(activation_reserve))

    @property
    def needs_calibration(self) -> bool:
        return self.placement == "cost" or (self.keep_gpu == "auto" and self.activation_reserve is None)


def free_device_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (for the CPU: MemAvailable), counting what this process's
    allocator holds unused."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the free memory of this machine; pass max_gpu_memory=")


def timing_of(plan: StreamPlan, bandwidth: Bandwidth, calibration: Calibration | None) -> cost.Timing:
    rate = bandwidth.stream(torch.device(plan.device).type)
    compute = calibration.block_compute if calibration else (0.0,) * len(plan.blocks)
    return cost.Timing(block_compute=tuple(compute), block_transfer=tuple(b.nbytes / rate for b in plan.blocks),
                       other_compute=calibration.other_compute if calibration else 0.0)


def predict(plan: StreamPlan, bandwidth: Bandwidth, calibration: Calibration | None) -> Prediction:
    timing = timing_of(plan, bandwidth, calibration)
    resident = {b.index for b in plan.blocks if b.resident}
    compute = sum(timing.block_compute) + timing.other_compute
    transfer = sum(t for i, t in enumerate(timing.block_transfer) if i not in resident)
    bound = "compute" if transfer <= compute else bandwidth.bound(torch.device(plan.device).type)
    return Prediction(seconds=cost.simulate(timing, resident, plan.slots or 1), compute_seconds=compute,
                      transfer_seconds=transfer, bound=bound, calibrated=calibration is not None)


def make_plan(
    request: PlanRequest,
    build: Callable[..., StreamPlan],
    *,
    device: torch.device,
    bandwidth: Bandwidth,
    calibration: Calibration | None,
    held: int = 0,
) -> StreamPlan:
    """The plan for ``request``. ``build(keep_gpu=, placement=, prefetch=, resident=)``
    lays out one candidate (plan.build_plan with the model's arguments bound). ``held``:
    device bytes the model itself holds now and gives back before this plan loads (its
    current plan's, when re-planning a loaded model); the free memory counts them as free.

    Raises:
        DeviceMemoryError: keep_gpu="auto" and not even keep_gpu=0 fits the budget.
    """
    def candidate(keep: int, prefetch: int) -> StreamPlan:
        plan = build(keep_gpu=keep, placement=request.placement, prefetch=prefetch)
        if request.placement == "cost":
            timing = timing_of(plan, bandwidth, calibration)
            bytes_ = [b.nbytes for b in plan.blocks]
            resident = cost.cheapest_resident_set(timing, keep, prefetch, bytes_)
            plan = build(keep_gpu=keep, placement="cost", prefetch=prefetch, resident=resident)
        return dataclasses.replace(plan, prediction=predict(plan, bandwidth, calibration))

    if request.keep_gpu != "auto":
        return candidate(request.keep_gpu, request.prefetch)

    budget, source = request.max_gpu_memory, "max_gpu_memory"
    if budget is None:
        # The model's own buffers are not "used" by someone else: counted as used, a re-plan
        # after the first call would shrink the resident set by the model's own size.
        budget = int((free_device_bytes(device) + held) * (1 - FREE_MEMORY_RESERVE_SHARE))
        source = f"free {device.type} memory less {FREE_MEMORY_RESERVE_SHARE:.0%}"
    if request.activation_reserve is not None:
        activation, how = request.activation_reserve, "activation_reserve"
    elif calibration is not None:
        activation, how = calibration.activation_bytes, "measured on the first call"
    else:
        activation = int(budget * PROVISIONAL_ACTIVATION_SHARE)
        how = f"{PROVISIONAL_ACTIVATION_SHARE:.0%} until the first call measures it"
    limit = budget - activation
    fitting = []
    for prefetch in sorted({request.prefetch, 1}, reverse=True):
        # The most resident blocks that fit, found with plain layouts (cheap), then laid
        # out by the placement (which may pick larger blocks: step down until it fits).
        keep = next((k for k in range(len(build(keep_gpu=0, placement="first", prefetch=prefetch).blocks), -1, -1)
                     if build(keep_gpu=k, placement="first", prefetch=prefetch).device_bytes <= limit), None)
        while keep is not None and keep >= 0:
            plan = candidate(keep, prefetch)
            if plan.device_bytes <= limit:
                # The placement may have picked smaller blocks than the first ones: take
                # more while they fit.
                while keep < len(plan.blocks) and (more := candidate(keep + 1, prefetch)).device_bytes <= limit:
                    plan, keep = more, keep + 1
                fitting.append(plan)
                break
            keep -= 1
    if fitting:
        # More slots or one more resident block: whichever the cost model predicts faster.
        best = min(fitting, key=lambda p: p.prediction.seconds)
        return dataclasses.replace(best, budget=Budget(budget, activation, f"budget: {source}; activations: {how}"))
    mib = 2**20
    fixes = ["raise max_gpu_memory" if request.max_gpu_memory is not None else "free device memory"]
    if activation:
        fixes.append("lower activation_reserve" if request.activation_reserve is not None
                     else "set a smaller activation_reserve")
    raise DeviceMemoryError(
        f"keep_gpu='auto' found no plan within the budget: even keep_gpu=0 with prefetch=1 needs "
        f"{candidate(0, 1).device_bytes / mib:.1f} MiB, but the budget leaves {limit / mib:.1f} MiB "
        f"({budget / mib:.1f} MiB from {source}, less {activation / mib:.1f} MiB for activations, {how}); "
        f"{' or '.join(fixes)}"
    )


def check_within_budget(plan: StreamPlan, request: PlanRequest) -> None:
    """A keep_gpu the user chose, with a max_gpu_memory the user gave: refuse a plan over
    it rather than ignore either (``lazystream plan`` warns instead)."""
    budget, activation = request.max_gpu_memory, request.activation_reserve or 0
    if request.keep_gpu == "auto" or budget is None or plan.device_bytes + activation <= budget:
        return
    mib = 2**20
    fit = plan.largest_keep_gpu_within(budget - activation)
    raise DeviceMemoryError(
        f"keep_gpu={plan.keep_gpu} needs {plan.device_bytes / mib:.1f} MiB of device memory"
        + (f" and activation_reserve {activation / mib:.1f} MiB" if activation else "")
        + f", over max_gpu_memory={budget / mib:.1f} MiB; "
        + (f"keep_gpu={fit} fits" if fit is not None else "even keep_gpu=0 does not fit")
        + ", or pass keep_gpu='auto' to choose within the budget"
    )


def plan_builder(model: nn.Module, sources: Mapping[str, TensorSource], block_paths: Sequence[str], *,
                 dtype: torch.dtype, family: ModelFamily, device: torch.device) -> Callable[..., StreamPlan]:
    matched = match_tensors(model, sources, block_paths)  # once: it warns of unused tensors

    def build(*, keep_gpu: int, placement: str, prefetch: int, resident: set[int] | None = None,
              on: torch.device = device, casts: Mapping[str, tuple[torch.dtype, ...]] | None = None,
              default: torch.dtype = dtype) -> StreamPlan:
        """One layout; ``on``, ``casts`` and ``default`` re-plan after a ``.to()`` of the model
        (the tensors stay matched as they were at load, whatever modules were added since)."""
        return build_plan(model, sources, block_paths, keep_gpu=keep_gpu, placement=placement, prefetch=prefetch,
                          dtype=default, family=family, device=on, resident=resident, matched=matched, casts=casts)

    return build
