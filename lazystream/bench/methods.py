"""One benchmark run: load the checkpoint the run's way, time a warm-up and ``calls``
forwards on the same inputs, and report time, memory and bytes moved (run in a process
of its own by lazystream.bench.child).

Each method is a loader function in LOADERS; what they share (inputs, timing, memory,
eviction for cold runs, the comparison with the resident output) is in :func:`measure`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import build_skeleton, find_blocks, model_class, require_config
from ..checkpoint import Checkpoint
from ..model import LazyStreamModel, checkpoint_dtype, streamer_of
from ..telemetry import PeakRssAnon
from .pagecache import cached_fraction, evict, unmap_pages
from .runs import IO_CONFIGS, Run

RESULT_PREFIX = "LAZYSTREAM_BENCH_RESULT "
REFERENCE_FILE = "resident-output.pt"


@dataclass(frozen=True)
class Job:
    """A run and the workload every run shares."""

    run: Run
    checkpoint: str
    device: str
    calls: int
    tokens: int
    work: str  # scratch folder: offload folders and the resident output

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "run": asdict(self.run)})

    @classmethod
    def from_json(cls, text: str) -> Job:
        obj = json.loads(text)
        return cls(**{**obj, "run": Run.from_dict(obj["run"])})


@dataclass(frozen=True)
class Layout:
    """The model's structure, as every method needs it: its class, blocks and bytes."""

    cls: type[nn.Module]
    config: dict
    dtype: torch.dtype
    library: str  # "transformers" or "diffusers"
    blocks: tuple[str, ...]
    block_bytes: tuple[int, ...]
    total_bytes: int
    outside_keys: tuple[str, ...]  # device_map keys of everything outside the blocks
    largest_leaf_bytes: int
    shards: tuple[Path, ...]

    @property
    def outside_bytes(self) -> int:
        return self.total_bytes - sum(self.block_bytes)

    @property
    def block_parents(self) -> list[str]:
        """Names of the modules between the root and the block lists (diffusers'
        ``block_modules``: group offloading looks for module lists only among children)."""
        return sorted({name for b in self.blocks for name in b.split(".")[:-2]})


def layout_of(path: str) -> Layout:
    with Checkpoint.open(path) as ckpt:
        config = require_config(ckpt.config, ckpt.folder)
        cls = model_class(config, ckpt.folder / "config.json")
        dtype = checkpoint_dtype(ckpt)
        skeleton = build_skeleton(cls, config, dtype)
        blocks = tuple(find_blocks(skeleton))
        block_bytes = tuple(sum(r.nbytes for n, r in ckpt.items() if n.startswith(b + ".")) for b in blocks)
        shards = tuple(ckpt.shard_paths)
        total = ckpt.nbytes
    ancestors = {""} | {".".join(b.split(".")[:i]) for b in blocks for i in range(1, b.count(".") + 1)}
    modules = dict(skeleton.named_modules())
    outside = []
    for name in sorted(ancestors):
        module = modules[name]
        join = (lambda leaf: f"{name}.{leaf}") if name else (lambda leaf: leaf)
        outside += [join(c) for c, _ in module.named_children() if join(c) not in ancestors and join(c) not in blocks]
        outside += [join(p) for p, v in [*module._parameters.items(), *module._buffers.items()] if v is not None]
    leaves = [m for m in skeleton.modules() if not list(m.children())]
    largest_leaf = max((sum(p.numel() * p.element_size() for p in m.parameters()) for m in leaves), default=0)
    library = "diffusers" if "_class_name" in config else "transformers"
    return Layout(cls, config, dtype, library, blocks, block_bytes, total, tuple(outside), largest_leaf, shards)


# -- inputs ---------------------------------------------------------------------------


def make_forward(layout: Layout, device: torch.device, tokens: int) -> Callable[[nn.Module], torch.Tensor]:
    """The call every method times, on seeded inputs: token ids for a causal LM, latents
    and captions for the Z-Image transformer. It returns the output as one tensor."""
    if layout.library == "transformers":
        vocab = layout.config.get("vocab_size") or layout.config.get("text_config", {}).get("vocab_size", 1000)
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
        return lambda model: model(ids).logits
    if layout.cls.__name__ == "ZImageTransformer2DModel":
        from ..synthetic import zimage_inputs

        x, t, caps = zimage_inputs(layout.config)
        x = [v.to(device, layout.dtype) for v in x]
        caps = [v.to(device, layout.dtype) for v in caps]
        t = t.to(device, layout.dtype)
        return lambda model: torch.cat([o.flatten() for o in model(x, t, caps).sample])
    raise ValueError(f"the benchmark has no inputs for {layout.cls.__name__}: it knows transformers causal LMs "
                     "and ZImageTransformer2DModel")


# -- the methods ----------------------------------------------------------------------


class DoesNotFit(Exception):
    """The method cannot run on this device at all (not a failure of the method)."""


@dataclass
class Loaded:
    """A model loaded one method's way, and what measuring it needs.

    ``streamed_bytes``: weight bytes moved to the device per call, by construction;
    ``device_bytes``: on the CPU device, the weight bytes the method holds at once by
    construction (on CUDA the allocator's peak is measured instead).
    """

    model: nn.Module
    streamed_bytes: int
    device_bytes: int
    mappings: list[torch.Tensor] = field(default_factory=list)  # this process's maps of the files
    cold_files: list[Path] = field(default_factory=list)  # files a cold call must find uncached
    session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    stats: Callable[[], dict] = dict
    close: Callable[[], None] = lambda: None


def _library_model(layout: Layout, path: str, **kwargs) -> nn.Module:
    dtype_key = "torch_dtype" if layout.library == "diffusers" else "dtype"
    return layout.cls.from_pretrained(path, **{dtype_key: layout.dtype}, **kwargs).eval()


def _scratch(job: Job) -> Path:
    return Path(tempfile.mkdtemp(prefix="offload-", dir=job.work))


def _remover(folder: Path | None) -> Callable[[], None]:
    return (lambda: shutil.rmtree(folder, ignore_errors=True)) if folder else (lambda: None)


def load_resident(job: Job, layout: Layout, device: torch.device) -> Loaded:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if layout.total_bytes > 0.9 * free:
            raise DoesNotFit(f"does not fit: needs {layout.total_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    return Loaded(_library_model(layout, job.checkpoint).to(device), 0, layout.total_bytes)


def load_lazystream(job: Job, layout: Layout, device: torch.device) -> Loaded:
    run = job.run
    model = LazyStreamModel.from_pretrained(job.checkpoint, run.keep, device=device, placement=run.placement,
                                            io=IO_CONFIGS[run.io])
    streamer = streamer_of(model)
    ckpt = streamer.ckpt

    def stats() -> dict:
        s = streamer.stats()
        c = s.last_call
        return {"streamed_bytes": c.bytes_streamed, "h2d_gb_per_s": c.h2d_gb_per_s, "fill_gb_per_s": c.fill_gb_per_s,
                "stall_s": c.stall_seconds, "on_demand_loads": c.on_demand_loads, "staging_bytes": s.staging_bytes,
                "slot_bytes": s.slot_bytes}

    # Cold runs call without a session: its wrap-around prefetch would read the next
    # call's first blocks before their pages are evicted.
    return Loaded(model, streamer.plan.streamed_bytes, streamer.stats().device_bytes,
                  mappings=[ckpt.shard(p).bytes for p in ckpt.shard_paths], cold_files=list(ckpt.shard_paths),
                  session=contextlib.nullcontext if run.cold else streamer.session, stats=stats, close=streamer.close)


def load_device_map(job: Job, layout: Layout, device: torch.device) -> Loaded:
    """transformers/diffusers ``device_map``: the first ``keep`` blocks and everything
    outside the blocks on the device, the other blocks on ``offload`` (accelerate moves
    their weights in at each forward)."""
    run = job.run
    here = (torch.cuda.current_device() if device.index is None else device.index) if device.type == "cuda" else "cpu"
    device_map = dict.fromkeys(layout.outside_keys, here)
    device_map.update({b: here if i < run.keep else run.offload for i, b in enumerate(layout.blocks)})
    folder = _scratch(job) if run.offload == "disk" else None
    kwargs = {"offload_folder": str(folder)} if folder else {}
    model = _library_model(layout, job.checkpoint, device_map=device_map, **kwargs)
    rest = layout.block_bytes[run.keep:]
    cold = list(layout.shards) + (sorted(folder.rglob("*")) if folder else [])
    return Loaded(model, sum(rest), layout.outside_bytes + sum(layout.block_bytes[:run.keep]) + max(rest, default=0),
                  cold_files=[p for p in cold if p.is_file()], close=_remover(folder))


def load_cpu_offload(job: Job, layout: Layout, device: torch.device) -> Loaded:
    """accelerate ``cpu_offload``, what diffusers' ``enable_sequential_cpu_offload`` uses:
    every leaf module's weights cross to the device at each of its forwards."""
    from accelerate import cpu_offload

    model = _library_model(layout, job.checkpoint)
    cpu_offload(model, execution_device=device)
    return Loaded(model, layout.total_bytes, layout.largest_leaf_bytes)


def load_group_offload(job: Job, layout: Layout, device: torch.device) -> Loaded:
    """diffusers ``apply_group_offloading``: one block per group (block_level) or one
    leaf module per group (leaf_level), with or without a copy stream, in memory or on disk."""
    from diffusers.hooks import apply_group_offloading

    run = job.run
    model = _library_model(layout, job.checkpoint)
    kwargs: dict = {"offload_type": run.offload_type, "use_stream": run.use_stream}
    if run.offload_type == "block_level":
        kwargs.update(num_blocks_per_group=1, block_modules=layout.block_parents or None)
    folder = _scratch(job) if run.disk else None
    if folder:
        kwargs["offload_to_disk_path"] = str(folder)
    apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"), **kwargs)
    if run.offload_type == "block_level":
        held = layout.outside_bytes + max(layout.block_bytes)
    else:
        held = layout.largest_leaf_bytes
    return Loaded(model, layout.total_bytes, held, close=_remover(folder))


def load_first_n_sequential(job: Job, layout: Layout, device: torch.device) -> Loaded:
    """The mixin of the request that started lazystream (diffusers issue 12749): the first
    ``keep`` blocks and everything outside the blocks moved to the device, every other
    block under accelerate's sequential offload."""
    from accelerate import cpu_offload

    model = _library_model(layout, job.checkpoint)
    modules = dict(model.named_modules())
    for key in layout.outside_keys:
        if key in modules:
            modules[key].to(device)
        else:  # a parameter or buffer held directly by a module that holds blocks
            owner, _, leaf = key.rpartition(".")
            module = modules[owner]
            if leaf in module._parameters:
                param = module._parameters[leaf]
                module._parameters[leaf] = nn.Parameter(param.to(device), param.requires_grad)
            else:
                module._buffers[leaf] = module._buffers[leaf].to(device)
    for i, block in enumerate(layout.blocks):
        if i < job.run.keep:
            modules[block].to(device)
        else:
            cpu_offload(modules[block], execution_device=device)
    rest = layout.block_bytes[job.run.keep:]
    return Loaded(model, sum(rest), layout.outside_bytes + sum(layout.block_bytes[:job.run.keep]))


LOADERS: dict[str, Callable[[Job, Layout, torch.device], Loaded]] = {
    "resident": load_resident,
    "lazystream": load_lazystream,
    "device_map": load_device_map,
    "cpu_offload": load_cpu_offload,
    "group_offload": load_group_offload,
    "first_n_sequential": load_first_n_sequential,
}


# -- measuring ------------------------------------------------------------------------


def measure(job: Job) -> dict:
    """Load, warm up, time ``job.calls`` forwards; return the result row."""
    run, device = job.run, torch.device(job.device)
    result: dict = {"label": run.label, "run": json.loads(run.to_json())}
    if run.needs_cuda and device.type != "cuda":
        return {**result, "status": "needs CUDA"}
    layout = layout_of(job.checkpoint)
    forward = make_forward(layout, device, job.tokens)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.ones(1) @ torch.ones(1)  # let torch set up its allocator and thread pool first
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        device_base = torch.cuda.memory_allocated(device)
    with PeakRssAnon(interval_s=0.002) as rss:
        start = time.perf_counter()
        try:
            loaded = LOADERS[run.method](job, layout, device)
        except DoesNotFit as exc:
            return {**result, "status": str(exc)}
        sync()
        load_s = time.perf_counter() - start
        try:
            times, cached = _timed_calls(job, loaded, forward, sync, result)
            result.update(loaded.stats())
        finally:
            loaded.close()
    result.update(status="ok", load_s=load_s, first_call_s=times[0], forward_s=times[1:],
                  median_s=statistics.median(times[1:]), host_anon_peak_bytes=rss.growth,
                  streamed_bytes=result.get("streamed_bytes", loaded.streamed_bytes))
    if cached:
        result["cached_before_call"] = statistics.mean(cached)
    if device.type == "cuda":
        # Pinned memory from torch's host allocator (lazystream's ring, diffusers' pin_memory);
        # torch before 2.6 cannot say.
        host_stats = getattr(torch.cuda, "host_memory_stats", None)
        result.update(device_peak_bytes=torch.cuda.max_memory_allocated(device) - device_base,
                      device_bytes_measured=True,
                      pinned_peak_bytes=host_stats().get("allocated_bytes.peak", 0) if host_stats else 0)
    else:
        result.update(device_peak_bytes=loaded.device_bytes, device_bytes_measured=False, pinned_peak_bytes=0)
    return result


def _timed_calls(job: Job, loaded: Loaded, forward: Callable[[nn.Module], torch.Tensor], sync: Callable[[], None],
                 result: dict) -> tuple[list[float], list[float]]:
    """A warm-up call and ``job.calls`` timed ones; for a cold run, the checkpoint's pages
    are evicted before each. Every call's output is compared with the resident model's
    (outside the timing). Returns the seconds of every call and the fraction of the files
    still cached after each eviction."""
    times, cached = [], []
    reference = _Reference(job)
    with torch.no_grad(), loaded.session():
        for call in range(job.calls + 1):
            if job.run.cold:
                for mapping in loaded.mappings:
                    unmap_pages(mapping)
                evict(loaded.cold_files)
                cached.append(cached_fraction(loaded.cold_files))
            start = time.perf_counter()
            out = forward(loaded.model)
            sync()
            times.append(time.perf_counter() - start)
            reference.compare(out)
            del out
    result.update(reference.summary())
    return times, cached


class _Reference:
    """The resident model's first output (saved by its own run, which comes first), and
    how every call of this run compares with it: bit for bit, and the largest difference."""

    def __init__(self, job: Job):
        self.path = Path(job.work) / REFERENCE_FILE
        self.saves = job.run.method == "resident"
        self.want = None if self.saves or not self.path.exists() else torch.load(self.path)
        self.equal: list[bool] = []
        self.diffs: list[float] = []

    def compare(self, out: torch.Tensor) -> None:
        out = out.detach().float().cpu()
        if self.saves and self.want is None:
            torch.save(out, self.path)
            self.want = out
        if self.want is None:
            return
        same_shape = self.want.shape == out.shape
        self.equal.append(same_shape and torch.equal(out, self.want))
        self.diffs.append((out - self.want).abs().max().item() if same_shape else float("inf"))

    def summary(self) -> dict:
        if not self.equal:
            return {}  # no resident output to compare with
        nan = any(d != d for d in self.diffs)
        return {"max_abs_diff": float("nan") if nan else max(self.diffs), "calls_compared": len(self.equal),
                "differing_calls": [i for i, e in enumerate(self.equal) if not e]}


def run_job(job: Job) -> dict:
    """:func:`measure`, with an error turned into a row that says what went wrong."""
    try:
        return measure(job)
    except Exception as exc:  # one method failing must not stop the others
        traceback.print_exc()
        return {"label": job.run.label, "run": json.loads(job.run.to_json()),
                "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def iter_results(stdout: str) -> Iterator[dict]:
    """The result rows a child printed."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            yield json.loads(line[len(RESULT_PREFIX):])
