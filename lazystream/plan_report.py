"""``lazystream plan``: the plan for a checkpoint from its headers and config alone,
before any weight is read — blocks, bytes, device memory by term, host memory, and the
predicted time per call with the resource that bounds it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointNotFoundError
from .resolve import (WeightFiles, hub_errors, is_offline, list_hub_files, looks_like_path, resolve, select_weights,
                      weight_subfolders)

if TYPE_CHECKING:
    from .plan import StreamPlan


def run(args: argparse.Namespace) -> int:
    """``lazystream plan`` with the arguments lazystream.cli parsed (sizes in bytes)."""
    # The checkpoint is found before torch is imported: a wrong path, a pipeline without
    # --subfolder or an unreachable hub answer in a fraction of a second, not several.
    files, remote = _locate(args.repo, args.subfolder, args.revision)

    import torch

    from .adapters import build_skeleton, model_class, require_config
    from . import probe
    from .io import IOConfig, ring_layout
    from .model import checkpoint_dtype, make_model_plan, resolve_device
    from .planner import PlanRequest

    request = PlanRequest.of(args.keep_gpu, args.placement, args.prefetch, args.vram, args.activation_reserve)
    device = resolve_device(args.device)
    records, config, shard, ident = _headers(files, remote, args.repo, args.subfolder, args.revision)
    cls = model_class(require_config(config, Path(args.repo)), Path(args.repo) / "config.json")
    dtype = getattr(torch, args.dtype) if args.dtype else checkpoint_dtype(records)
    model = build_skeleton(cls, config, dtype)
    plan, _ = make_model_plan(model, records, request, device=device, dtype=dtype, blocks=None, built_here=True,
                              measure=True, checkpoint_id=ident, shard=shard)
    staging = 0
    if device.type == "cuda":  # the ring the loader would allocate for this plan's slots
        staging = ring_layout(IOConfig(), plan.slot_bytes, h2d=probe.bandwidth(device).h2d).nbytes
    if args.json:
        print(json.dumps({**plan.summary(), "model_class": cls.__name__, "host_staging_bytes": staging}, indent=1))
    else:
        print(render(plan, cls.__name__, staging))
    over = over_budget(plan, args.vram, args.activation_reserve)
    if over:
        print(f"lazystream plan: warning: {over}", file=sys.stderr)
    return 0


def over_budget(plan: StreamPlan, vram: int | None, activation_reserve: int | None) -> str | None:
    """What to say when a plan with a given number of resident blocks exceeds --vram (with
    --keep-gpu auto the planner keeps within it)."""
    if vram is None or plan.budget is not None:
        return None
    reserve = activation_reserve or 0
    if plan.device_bytes + reserve <= vram:
        return None
    mib = 2**20
    fit = plan.largest_keep_gpu_within(vram - reserve)
    held = f" and --activation-reserve {reserve / mib:.1f} MiB" if reserve else ""
    return (f"this plan needs {plan.device_bytes / mib:.1f} MiB of device memory{held}, over --vram "
            f"{vram / mib:.1f} MiB; " + (f"--keep-gpu {fit} fits" if fit is not None else "even --keep-gpu 0 does not fit")
            + " (or --keep-gpu auto chooses within --vram)")


def render(plan: StreamPlan, class_name: str, staging: int) -> str:
    mib = 2**20
    width = max(len(b.path) for b in plan.blocks) if plan.blocks else 5
    lines = [f"{class_name}: {len(plan.blocks)} blocks", f"  {'block':<{width}}  {'MiB':>8}  where"]
    lines += [f"  {b.path:<{width}}  {b.nbytes / mib:>8.1f}  {'resident' if b.resident else 'streamed'}"
              for b in plan.blocks]
    lines.append(str(plan))
    host = (f"  host: {staging / mib:.0f} MiB pinned staging; streamed shards are read through the page cache"
            if staging else "  host: the device is the host here: device memory above is host memory")
    lines.append(host)
    return "\n".join(lines)


def _locate(repo: str, subfolder: str | None, revision: str | None) -> tuple[WeightFiles, bool]:
    """The checkpoint's weight files, and whether they are on the hub (named relative to
    the repo, from one listing) rather than here (a folder, or the Hugging Face cache)."""
    if Path(repo).expanduser().is_dir() or looks_like_path(repo):
        return resolve(repo, subfolder=subfolder, revision=revision), False
    try:
        return resolve(repo, subfolder=subfolder, revision=revision, local_files_only=True), False
    except CheckpointNotFoundError:
        if is_offline():
            raise
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    with hub_errors(repo, revision):
        listed = list_hub_files(repo, revision)
    names = sorted(n[len(prefix):] for n in listed if n.startswith(prefix) and "/" not in n[len(prefix):])
    return select_weights(Path(prefix or "."), names, None,
                          subfolders=list if subfolder else lambda: weight_subfolders(listed)), True


def _headers(files: WeightFiles, remote: bool, repo: str, subfolder: str | None, revision: str | None):
    """(records, config, a local shard or None, checkpoint id) without reading weights:
    from the local files, else through the hub's header API."""
    from .checkpoint import Checkpoint
    from .model import checkpoint_id

    if remote:
        with hub_errors(repo, revision):
            return _remote_headers(repo, f"{subfolder.strip('/')}/" if subfolder else "", revision, files)
    with Checkpoint(files) as ckpt:
        return dict(ckpt), ckpt.config, ckpt.shard_paths[0], checkpoint_id(ckpt)


def _remote_headers(repo: str, prefix: str, revision: str | None, chosen: WeightFiles):
    from huggingface_hub import hf_hub_download, parse_safetensors_file_metadata

    from .checkpoint import read_index
    from .header import DTYPES, TensorRecord

    if chosen.index is not None:
        index = hf_hub_download(repo, prefix + chosen.index.name, revision=revision)
        shards = sorted(set(read_index(Path(index)).values()))
    else:
        shards = [chosen.single.name]
    records: dict[str, TensorRecord] = {}
    for shard in shards:
        meta = parse_safetensors_file_metadata(repo, prefix + shard, revision=revision)  # a range request
        for name, info in meta.tensors.items():
            begin, end = info.data_offsets
            records[name] = TensorRecord(name=name, file=Path(shard), offset=begin, nbytes=end - begin,
                                         dtype=DTYPES[info.dtype], shape=tuple(info.shape))
    config = json.loads(Path(hf_hub_download(repo, prefix + "config.json", revision=revision)).read_text())
    return records, config, None, f"hub:{repo}@{revision or 'main'}/{prefix}"
