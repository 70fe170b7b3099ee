"""``lazystream plan``: the plan for a checkpoint from its headers and config alone,
before any weight is read — blocks, bytes, device memory by term, host memory, and the
predicted time per call with the resource that bounds it."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointNotFoundError
from .plan import describe_formats
from .resolve import (WeightFiles, hub_errors, is_offline, list_hub_files, looks_like_path, resolve, select_weights,
                      weight_subfolders)

if TYPE_CHECKING:
    from .plan import StreamPlan


def run(args: argparse.Namespace) -> int:
    """``lazystream plan`` with the arguments lazystream.cli parsed (sizes in bytes)."""
    if args.config is not None or str(args.repo).endswith(".safetensors"):
        return _print(args, *_single_file_plan(args), config=None)
    # The checkpoint is found before torch is imported: a wrong path, a pipeline without
    # --subfolder or an unreachable hub answer in a fraction of a second, not several.
    files, remote = _locate(args.repo, args.subfolder, args.revision)

    from .adapters import library_of, model_class, require_config
    from .model import resolve_device

    device = resolve_device(args.device)
    records, config, shard, ident, metadata = _headers(files, remote, args.repo, args.subfolder, args.revision)
    cls = model_class(require_config(config, Path(args.repo)), Path(args.repo) / "config.json")
    if library_of(cls) == "transformers" and not remote:
        plan = _transformers_plan(args, cls, files, device)
    else:
        plan = _skeleton_plan(args, cls, config, records, device, shard, ident, metadata)
    return _print(args, plan, cls.__name__, device, config=config)


def _transformers_plan(args: argparse.Namespace, cls, files: WeightFiles, device):
    """The plan a load makes: transformers' own from_pretrained resolves the dtype, the
    keep-in-fp32 modules and every tensor's source on the traced headers, as
    LazyStreamModel.from_pretrained has it do (no weight is read)."""
    from .checkpoint import Checkpoint
    from .library_load import load_transformers
    from .model import checkpoint_id, make_model_plan

    kwargs = {} if args.dtype is None else {"dtype": args.dtype}  # a string, as transformers takes it
    with Checkpoint(files) as ckpt, _no_progress_bars():  # no weight is loaded: no "Loading weights" bar
        loaded = load_transformers(cls, ckpt, device.type, kwargs)
        plan, _ = make_model_plan(loaded.model, ckpt, _request(args), device=device, dtype=loaded.dtype, blocks=None,
                                  built_here=False, measure=True, checkpoint_id=checkpoint_id(ckpt),
                                  shard=ckpt.shard_paths[0], sources=loaded.sources, family=loaded.family)
    return plan


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _skeleton_plan(args: argparse.Namespace, cls, config: dict, records, device, shard, ident, metadata):
    """The plan of a diffusers model (as LazyStreamModel.from_pretrained builds it), or of a
    transformers model on the hub, whose shards are not here for the library to trace:
    the dtype by the library's own resolution from the headers and config."""
    from .adapters import build_skeleton, library_dtype, library_of
    from .keywords import STREAMED_QUANTIZATION, refuse_quantized_config
    from .library_load import apply_quantizer
    from .model import make_model_plan

    refuse_quantized_config(config, Path(args.repo) / "config.json",
                            streamed=STREAMED_QUANTIZATION if library_of(cls) == "transformers" else ())
    dtype = _library_dtype_argument(args, library_of(cls))
    dtype = library_dtype(library_of(cls), dtype, config, records, metadata)
    model = build_skeleton(cls, config, dtype)
    if library_of(cls) == "transformers":  # its quantizer's modules, as a load builds them
        apply_quantizer(model, Path(args.repo) / "config.json")
    plan, _ = make_model_plan(model, records, _request(args), device=device, dtype=dtype, blocks=None,
                              built_here=True, measure=True, checkpoint_id=ident, shard=shard)
    return plan


def _library_dtype_argument(args: argparse.Namespace, library: str):
    """--dtype as the library's from_pretrained takes it: transformers a string ("auto"
    included), diffusers a torch.dtype (it has no "auto": it loads float32 unless told)."""
    if args.dtype is None or library == "transformers":
        return args.dtype
    if args.dtype == "auto":  # a usage error, as argparse reports one (exits 2)
        args.parser.error("argument --dtype: auto is transformers' rule; a diffusers model loads in float32 unless "
                          "given a dtype: leave --dtype out, or name one")
    import torch

    return getattr(torch, args.dtype)


def _request(args: argparse.Namespace):
    from .planner import PlanRequest

    vram = args.vram - _adapters(args) if args.vram is not None else None
    return PlanRequest.of(args.keep_gpu, args.placement, args.prefetch, vram, args.activation_reserve)


def _adapters(args: argparse.Namespace) -> int:
    """The device bytes of the --lora adapters, from their headers: each tensor in float32,
    in an allocation of its own (peft keeps adapter weights in float32 whatever the model's
    dtype, unless told otherwise; see autocast_adapter_dtype)."""
    if not hasattr(args, "adapter_bytes"):
        from .header import read_header
        from .plan import GRANULE

        total = 0
        for given in args.lora:
            path = Path(given).expanduser()
            if path.is_dir():
                found = sorted(path.glob("*.safetensors"))
                if len(found) != 1:
                    raise CheckpointNotFoundError(
                        f"--lora {given}: expected one .safetensors file in the folder, found {[p.name for p in found]}",
                        path=path)
                path = found[0]
            for rec in read_header(path).records:
                numel = rec.nbytes // rec.dtype.itemsize
                total += -(-numel * 4 // GRANULE) * GRANULE
        args.adapter_bytes = total
    return args.adapter_bytes


def _single_file_plan(args: argparse.Namespace):
    """The plan of a single-file checkpoint: its conversion traced from the header alone (a
    local or cached file, else the hub's header by a range request)."""
    from .model import checkpoint_id, make_model_plan, resolve_device
    from .single_file import convert_single_file, open_single_file

    request = _request(args)
    dtype = _library_dtype_argument(args, "diffusers")
    device = resolve_device(args.device)
    local = Path(args.repo).expanduser().is_file()
    try:
        opened = open_single_file(args.repo, config=args.config, subfolder=args.subfolder, dtype=dtype,
                                  revision=args.revision, local_files_only=not local,
                                  quantization_config=_gguf_config(args.repo, dtype))
    except CheckpointNotFoundError:
        if local or is_offline():
            raise
        records, ident = _remote_single_file(args.repo, args.revision)
        opened = convert_single_file(records, origin=args.repo, config=args.config, subfolder=args.subfolder,
                                     dtype=dtype)
        plan, _ = make_model_plan(opened.model, records, request, device=device, dtype=opened.dtype, blocks=None,
                                  built_here=True, measure=True, checkpoint_id=ident, shard=None,
                                  sources=opened.sources, family=opened.family)
        return plan, type(opened.model).__name__, device
    with opened.checkpoint as ckpt:
        plan, _ = make_model_plan(opened.model, ckpt, request, device=device, dtype=opened.dtype, blocks=None,
                                  built_here=True, measure=True, checkpoint_id=checkpoint_id(ckpt),
                                  shard=ckpt.shard_paths[0], sources=opened.sources, family=opened.family)
    return plan, type(opened.model).__name__, device


def _gguf_config(path: str, dtype):
    """A GGUF file's plan is that of its load with GGUFQuantizationConfig(compute_dtype=dtype
    or bfloat16); no quantization for other files."""
    import torch

    from .gguf import is_gguf

    if not is_gguf(path):
        return None
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=dtype or torch.bfloat16)


def _remote_single_file(url: str, revision: str | None):
    """The tensors of a hub single file (``https://huggingface.co/<repo>/blob/main/<file>``) from
    its header, read by a range request."""
    from huggingface_hub import parse_safetensors_file_metadata

    from .header import DTYPES, TensorRecord
    from .resolve import hub_file

    repo, filename = hub_file(url)
    with hub_errors(repo, revision):
        meta = parse_safetensors_file_metadata(repo, filename, revision=revision)
    records = {name: TensorRecord(name=name, file=Path(filename), offset=info.data_offsets[0],
                                  nbytes=info.data_offsets[1] - info.data_offsets[0], dtype=DTYPES[info.dtype],
                                  shape=tuple(info.shape))
               for name, info in meta.tensors.items()}
    return records, f"hub:{repo}@{revision or 'main'}/{filename}"


def _print(args: argparse.Namespace, plan: StreamPlan, class_name: str, device, *, config: dict | None) -> int:
    import dataclasses

    from . import probe
    from .io import IOConfig, ring_layout

    adapters = _adapters(args)
    budget = plan.budget
    if adapters and budget is not None:  # auto planned within --vram less the adapters: say so
        budget = dataclasses.replace(budget, device_bytes=budget.device_bytes + adapters,
                                     source=f"{budget.source}; adapters (--lora) held back")
    plan = dataclasses.replace(plan, kept_bytes=plan.kept_bytes + adapters, adapter_bytes=adapters, budget=budget)
    staging = 0
    if device.type == "cuda":  # the ring the loader would allocate for this plan's slots
        staging = ring_layout(IOConfig(), plan.slot_bytes, h2d=probe.bandwidth(device).h2d).nbytes
    moe = routed_experts(plan, config)
    if args.json:
        print(json.dumps({**plan.summary(), "model_class": class_name, "host_staging_bytes": staging, "moe": moe},
                         indent=1))
    else:
        print(render(plan, class_name, staging, moe))
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


def routed_experts(plan: StreamPlan, config: dict | None) -> dict | None:
    """For a MoE model: the expert bytes among those streamed per call, and what streaming
    only the experts a decode step routes to would stream (lazystream streams whole blocks)."""
    config = config or {}
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    top_k = config.get("num_experts_per_tok")
    expert_bytes = sum(t.source.nbytes for b in plan.streamed for t in b.tensors if ".experts." in f".{t.name}")
    if not (experts and top_k and expert_bytes):
        return None
    return {"experts": experts, "top_k": top_k, "expert_bytes_per_call": expert_bytes,
            "routed_only_bytes_per_token": plan.streamed_bytes - expert_bytes + expert_bytes * top_k // experts}


def render(plan: StreamPlan, class_name: str, staging: int, moe: dict | None = None) -> str:
    mib = 2**20
    width = max(len(b.path) for b in plan.blocks) if plan.blocks else 5
    lines = [f"{class_name}: {len(plan.blocks)} blocks", f"  {'block':<{width}}  {'MiB':>8}  where"]
    lines += [f"  {b.path:<{width}}  {b.nbytes / mib:>8.1f}  {'resident' if b.resident else 'streamed'}  "
              f"{describe_formats(b.formats)}" for b in plan.blocks]
    lines.append(str(plan))
    if moe:
        lines.append(f"  MoE: experts are {moe['expert_bytes_per_call'] / mib:.1f} of the {plan.streamed_bytes / mib:.1f} "
                     f"MiB streamed per call; a decode step routes each token to {moe['top_k']} of {moe['experts']} "
                     f"experts: streaming only those (not built) would stream "
                     f"{moe['routed_only_bytes_per_token'] / mib:.1f} MiB per token")
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
    """(records, config, a local shard or None, checkpoint id, the index's metadata or None)
    without reading weights: from the local files, else through the hub's header API."""
    from .checkpoint import Checkpoint
    from .model import checkpoint_id

    if remote:
        with hub_errors(repo, revision):
            return _remote_headers(repo, f"{subfolder.strip('/')}/" if subfolder else "", revision, files)
    with Checkpoint(files) as ckpt:
        return dict(ckpt), ckpt.config, ckpt.shard_paths[0], checkpoint_id(ckpt), None


def _remote_headers(repo: str, prefix: str, revision: str | None, chosen: WeightFiles):
    from huggingface_hub import hf_hub_download, parse_safetensors_file_metadata

    from .adapters import index_metadata
    from .checkpoint import read_index
    from .header import DTYPES, TensorRecord

    metadata = None
    if chosen.index is not None:
        index = Path(hf_hub_download(repo, prefix + chosen.index.name, revision=revision))
        shards = sorted(set(read_index(index).values()))
        metadata = index_metadata(index.read_text())
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
    return records, config, None, f"hub:{repo}@{revision or 'main'}/{prefix}", metadata
