"""``lazystream plan``: the plan for a checkpoint from its headers and config alone,
before any weight is read — blocks, bytes, device memory by term, host memory, and the
predicted time per call with the resource that bounds it."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .adapters import build_skeleton, model_class, require_config
from .checkpoint import Checkpoint
from .errors import CheckpointNotFoundError
from .header import DTYPES, TensorRecord
from . import probe
from .io import IOConfig, ring_layout
from .model import checkpoint_dtype, checkpoint_id, make_model_plan, resolve_device
from .plan import StreamPlan
from .planner import PlanRequest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo", help="a folder or a Hugging Face repo id")
    parser.add_argument("--subfolder")
    parser.add_argument("--revision")
    parser.add_argument("--vram", help="device memory budget for --keep-gpu auto, e.g. 8GiB")
    parser.add_argument("--keep-gpu", default="auto", help="resident blocks, or 'auto' (default)")
    parser.add_argument("--placement", default="spread", choices=["first", "spread", "cost"])
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--activation-reserve", help="device memory left for activations, e.g. 1GiB")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    keep_gpu: int | str = args.keep_gpu if args.keep_gpu == "auto" else int(args.keep_gpu)
    request = PlanRequest.of(keep_gpu, args.placement, args.prefetch, args.vram, args.activation_reserve)
    records, config, shard, ident = _headers(args.repo, args.subfolder, args.revision)
    cls = model_class(require_config(config, Path(args.repo)), Path(args.repo) / "config.json")
    dtype = getattr(torch, args.dtype) if args.dtype else checkpoint_dtype(records)
    model = build_skeleton(cls, config, dtype)
    device = resolve_device(args.device)
    plan, _ = make_model_plan(model, records, request, device=device, dtype=dtype, blocks=None, built_here=True,
                              measure=True, checkpoint_id=ident, shard=shard)
    staging = 0
    if device.type == "cuda":  # the ring the loader would allocate for this plan's slots
        staging = ring_layout(IOConfig(), plan.slot_bytes, h2d=probe.bandwidth(device).h2d).nbytes
    if args.json:
        print(json.dumps({**plan.summary(), "model_class": cls.__name__, "host_staging_bytes": staging}, indent=1))
    else:
        print(render(plan, cls.__name__, staging))
    return 0


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


def _headers(repo: str, subfolder: str | None, revision: str | None):
    """(records, config, a local shard or None, checkpoint id) without reading weights:
    a local folder or the Hugging Face cache, else the hub's header API."""
    local = Path(repo).expanduser().is_dir()
    try:
        ckpt = Checkpoint.open(repo, subfolder=subfolder, revision=revision, local_files_only=not local)
    except CheckpointNotFoundError:
        if local or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
            raise
        return _remote_headers(repo, subfolder, revision)
    with ckpt:
        return dict(ckpt), ckpt.config, ckpt.shard_paths[0], checkpoint_id(ckpt)


def _remote_headers(repo: str, subfolder: str | None, revision: str | None):
    from huggingface_hub import HfApi, hf_hub_download, parse_safetensors_file_metadata

    from .checkpoint import read_index
    from .resolve import select_weights

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    listed = HfApi().list_repo_files(repo, revision=revision)
    names = sorted(n[len(prefix):] for n in listed if n.startswith(prefix) and "/" not in n[len(prefix):])
    chosen = select_weights(Path(prefix or "."), names, None)
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
