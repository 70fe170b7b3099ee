"""The GPU check: one prepared shot on the device machine, about 6 minutes on an H100/H200.

    python tools/gpu_check.py [--out DIR] [--full] [--device cuda|cpu] [--quick]
                              [--run-timeout 90] [--pytest-timeout 240] [--only REGEX]

Runs from the checkout with no install and no network (it puts the checkout on sys.path;
``pip install --no-build-isolation --no-deps -e .`` works too). Every result is written to
DIR (default $OUT, else /tmp/gpu-check) the moment it is known, so a run killed at its
time limit keeps everything before that point:

  machine.json     GPU name, driver and CUDA versions, PCIe generation and width (from
                   ``nvidia-smi -q``, also kept whole in nvidia-smi.txt), CPU, RAM, the
                   disk, the versions of torch, transformers, diffusers, accelerate
  results.jsonl    one JSON object per finished step: the CUDA tests, each ordering case,
                   the checkpoint, the probes, each run, the verdict (flushed and fsynced
                   line by line)
  cuda_tests.log   pytest on the CUDA tests (CUDA_TESTS), written as it runs
  ordering-*.log   the ordering stress's stderr, per io mode
  progress.log     what ran when
  bench.json, bench.md   the table, the floor and the targets, rewritten after every run

Steps: pytest of the CUDA tests in the background (killed after --pytest-timeout), and
the ordering stress (tools/gpu_ordering.py: every call against the resident model under
sleep kernels on the copy and compute streams, on a user's side stream, in every io mode,
with negative controls that remove a wait and must give wrong outputs; one process per
io mode, killed after --run-timeout), while a bfloat16 Qwen3 at Qwen3-8B's layer
dimensions (8 blocks of 386 MB, a 32000-token vocabulary, random weights, built there
from lazystream.synthetic) is written; then the floor's probes; then each run in a
process of its own, killed after --run-timeout: lazystream at keep_gpu 0, half and all,
with the shard mappings registered, with the single-thread ring it replaced, and cold
with O_DIRECT; the library's resident model; and the peers a user would pick: sequential
offload (accelerate cpu_offload), diffusers group offloading at block level with
streams, the first-N-resident mixin. ``--full`` adds every other run of ``lazystream
bench``. Every call of every run is compared with the resident model's output.

The exit status is 0 only if the CUDA tests passed, every ordering case passed (each
control differed), and every lazystream run equalled the resident model at every call.

``--device cpu --quick`` runs the same script end to end on a machine without a GPU (a
tiny checkpoint; runs that need CUDA are listed as such, the controls as "not applicable
on CPU"), in a few minutes.

diffusers is not on the device image: carry its wheel (README.md, "On a GPU machine");
without it the group-offloading run says "needs diffusers".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every test marked cuda: these files hold them all (tests/test_probe.py also holds CPU tests,
# deselected by -m cuda).
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_cuda_dropin.py", "tests/test_probe.py"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# Qwen3-8B's layer dimensions (386 MB per block in bfloat16) with 8 blocks and a small
# vocabulary: real block sizes for the copy engine, 3.6 GB to build.
GPU_CHECKPOINT = {"hidden_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "head_dim": 128, "intermediate_size": 12288, "vocab_size": 32000,
                  "max_position_embeddings": 40960, "rope_theta": 1_000_000.0}


class Recorder:
    """Writes each result the moment it is known: a line of results.jsonl (flushed and
    fsynced), a line of progress.log, and the files a reader looks at first."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {message}"
        print(line, file=sys.stderr, flush=True)
        self._append("progress.log", line)

    def result(self, kind: str, **fields) -> None:
        self._append("results.jsonl", json.dumps({"kind": kind, "at_s": round(time.monotonic() - self.started, 1),
                                                  **fields}))

    def write(self, name: str, text: str) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out / name)  # a reader sees the old file or the new one, whole

    def _append(self, name: str, line: str) -> None:
        with open(self.out / name, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


# -- the machine ---------------------------------------------------------------------------


def parse_nvidia_smi(text: str) -> dict:
    """The fields the table needs from ``nvidia-smi -q`` (first GPU): nested sections are
    told apart by indentation."""
    found: dict = {}
    path: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.startswith("="):
            continue
        indent = len(raw) - len(raw.lstrip())
        key, sep, value = raw.strip().partition(":")
        key, value = key.strip(), value.strip()
        while path and path[-1][0] >= indent:
            path.pop()
        if not sep or not value:
            path.append((indent, key))
            continue
        where = tuple(k for _, k in path)
        if key == "Product Name" and "name" not in found:
            found["name"] = value
        elif key == "Driver Version":
            found["driver"] = value
        elif key == "CUDA Version":
            found["cuda"] = value
        elif "PCIe Generation" in where and key in ("Max", "Current", "Device Current", "Device Max", "Host Max"):
            found.setdefault("pcie_generation", {}).setdefault(key.lower().replace(" ", "_"), value)
        elif "Link Width" in where and key in ("Max", "Current", "Device Current", "Device Max", "Host Max"):
            found.setdefault("pcie_width", {}).setdefault(key.lower().replace(" ", "_"), value)
        elif key == "Bus Id" and "bus_id" not in found:
            found["bus_id"] = value
    return found


def _run_text(cmd: list[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({' '.join(cmd)}: {exc})"


def machine(work: Path, rec: Recorder) -> dict:
    from lazystream.bench.suite import machine as bench_machine

    smi = _run_text(["nvidia-smi", "-q"])
    rec.write("nvidia-smi.txt", smi)
    info = bench_machine("cpu")
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
    except ImportError:
        pass
    for name in ("safetensors", "huggingface_hub"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    info["usable_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["gpu"] = parse_nvidia_smi(smi)
    source = _run_text(["findmnt", "-n", "-T", str(work), "-o", "SOURCE,FSTYPE,OPTIONS"]).strip()
    info["disk"] = {"work": str(work), "mount": source, "df": _run_text(["df", "-h", str(work)]).strip(),
                    "lsblk": _run_text(["lsblk", "-d", "-o", "NAME,MODEL,SIZE,ROTA,TRAN"]).strip()}
    info["platform"] = platform.platform()
    return info


# -- the steps -----------------------------------------------------------------------------


def start_tests(args: argparse.Namespace, rec: Recorder) -> tuple[subprocess.Popen, object]:
    log = open(args.out / "cuda_tests.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                             "--durations=15", *CUDA_TESTS],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rec.log(f"pytest {' '.join(CUDA_TESTS)} started (pid {proc.pid}, killed after {args.pytest_timeout:.0f} s)")
    return proc, log


def finish_tests(proc: subprocess.Popen, log, started: float, args: argparse.Namespace, rec: Recorder) -> bool:
    try:
        code = proc.wait(timeout=max(1.0, args.pytest_timeout - (time.monotonic() - started)))
        status = "passed" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # pytest and any process it started
        proc.wait()
        status = f"timed out after {args.pytest_timeout:.0f} s"
    log.close()
    tail = (args.out / "cuda_tests.log").read_text().strip().splitlines()[-1:] or [""]
    rec.result("cuda_tests", status=status, summary=tail[0], seconds=round(time.monotonic() - started, 1))
    rec.log(f"cuda tests: {status}: {tail[0]}")
    return status == "passed"


class Ordering(threading.Thread):
    """The ordering stress (tools/gpu_ordering.py), one process per io mode, each killed
    after --run-timeout; each case's line is recorded as the process prints it."""

    def __init__(self, args: argparse.Namespace, rec: Recorder):
        super().__init__(name="ordering", daemon=True)
        self.args, self.rec, self.passed = args, rec, False

    def run(self) -> None:
        from gpu_ordering import RESULT_PREFIX

        # Built by the first child, not in this thread: the main thread is importing the same
        # libraries to build the large checkpoint meanwhile.
        checkpoint = self.args.work / "ordering-qwen3"
        passed = True
        for io in ("mmap", "direct", "register"):
            cmd = [sys.executable, str(ROOT / "tools" / "gpu_ordering.py"), str(checkpoint),
                   "--device", self.args.device, "--io", io]
            passed &= self._one(io, cmd, RESULT_PREFIX)
        self.passed = passed

    def _one(self, io: str, cmd: list[str], prefix: str) -> bool:
        log = open(self.args.out / f"ordering-{io}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        timer = threading.Timer(self.args.run_timeout, os.killpg, (proc.pid, 9))
        timer.start()
        rows = []
        for line in proc.stdout:
            if line.startswith(prefix):
                row = json.loads(line[len(prefix):])
                rows.append(row)
                self.rec.result("ordering", **row)
                self.rec.log(f"ordering {io}: {row['name']}: {row['status']}")
        code = proc.wait()
        timer.cancel()
        log.close()
        if code < 0 or (code and not rows):
            why = f"killed after {self.args.run_timeout:.0f} s" if code < 0 else f"exit {code}"
            self.rec.result("ordering", io=io, name="(process)", status=f"FAILED: {why}")
            self.rec.log(f"ordering {io}: FAILED: {why} (ordering-{io}.log)")
            return False
        return code == 0 and all(not r["status"].startswith("FAILED") for r in rows)


def default_runs(n_blocks: int, cuda: bool) -> list:
    from lazystream.bench.runs import Run

    half = n_blocks // 2
    return [Run("resident"),
            Run("lazystream", keep=0, placement="spread", io="mmap"),
            Run("lazystream", keep=half, placement="spread", io="mmap"),
            Run("lazystream", keep=n_blocks, placement="spread", io="mmap"),
            Run("lazystream", keep=0, placement="spread", io="register" if cuda else "staged"),
            Run("lazystream", keep=0, placement="spread", io="staged-1thread"),
            Run("lazystream", keep=0, placement="spread", io="direct", cold=True),
            Run("cpu_offload"),
            Run("group_offload", offload_type="block_level", use_stream=True),
            Run("first_n_sequential", keep=half)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-check"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="a tiny checkpoint (with --device cpu: the dry run)")
    parser.add_argument("--full", action="store_true", help="after the default runs, every other run of the bench")
    parser.add_argument("--only", help="only the runs whose label matches this regex (and resident)")
    parser.add_argument("--run-timeout", type=float, default=90, help="seconds one run may take")
    parser.add_argument("--pytest-timeout", type=float, default=240, help="seconds the CUDA tests may take")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lazystream-gpu-check",
                        help="folder for the checkpoint and scratch (on the disk the checkpoint is read from)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--tokens", type=int, help="tokens per forward (default 512 on CUDA, 8 with --quick)")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing there reaches the network; never wait for it (children too)
    rec = Recorder(args.out)
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine(args.work, rec)
    rec.write("machine.json", json.dumps(info, indent=1))
    rec.result("machine", **{k: info[k] for k in ("device_name", "gpu", "cpu", "cores", "memory_bytes", "torch",
                                                  "torch_cuda", "transformers", "diffusers", "accelerate")
                             if k in info})
    rec.log(f"machine: {info.get('gpu', {}).get('name') or 'no GPU'}; {info['cpu']}, {info['cores']} cores")

    # The tests and the ordering stress run while the checkpoint is built (CPU work), and
    # end before anything is timed.
    tests_started = time.monotonic()
    tests, tests_log = start_tests(args, rec)
    ordering = Ordering(args, rec)
    ordering.start()
    try:
        checkpoint = _checkpoint(args, rec)
    finally:
        tests_passed = finish_tests(tests, tests_log, tests_started, args, rec)
        ordering.join(timeout=4 * args.run_timeout)
    rec.result("ordering_summary", passed=ordering.passed)
    code = _bench(args, rec, info, checkpoint)
    failed = [what for what, ok in (("CUDA tests", tests_passed), ("ordering stress", ordering.passed),
                                    ("runs", code == 0)) if not ok]
    rec.result("verdict", passed=not failed, failed=failed)
    rec.log("verdict: " + ("passed" if not failed else "FAILED: " + ", ".join(failed)))
    return 1 if failed else 0


def _checkpoint(args: argparse.Namespace, rec: Recorder) -> Path:
    from lazystream.bench.suite import DTYPES, build_checkpoint
    from lazystream.bench.methods import layout_of

    spec = "qwen3:tiny" if args.quick else "qwen3:" + json.dumps(GPU_CHECKPOINT)
    dtype = "float32" if args.quick else "bfloat16"
    started = time.monotonic()
    checkpoint = build_checkpoint(spec, DTYPES[dtype], args.work)
    layout = layout_of(str(checkpoint))
    rec.result("checkpoint", path=str(checkpoint), spec=spec, dtype=dtype, bytes=layout.total_bytes,
               blocks=len(layout.blocks), block_bytes=max(layout.block_bytes),
               seconds=round(time.monotonic() - started, 1))
    rec.log(f"checkpoint {checkpoint}: {layout.total_bytes / 1e9:.2f} GB, {len(layout.blocks)} blocks of "
            f"{max(layout.block_bytes) / 1e6:.0f} MB")
    return checkpoint


def _bench(args: argparse.Namespace, rec: Recorder, info: dict, checkpoint: Path) -> int:
    import torch

    from lazystream.bench.suite import _in_child
    from lazystream.bench.methods import Job, layout_of
    from lazystream.bench.probes import Probes
    from lazystream.bench.runs import plan_runs

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        rec.result("error", message="--device cuda, but torch sees no CUDA device")
        rec.log("no CUDA device: stopping (use --device cpu for the dry run)")
        return 1
    layout = layout_of(str(checkpoint))

    probe_run = _child_result(["probe", str(checkpoint), args.device, str(max(layout.block_bytes))], args, rec)
    if probe_run is None:
        return 1
    probes = Probes(**probe_run)
    rec.result("probes", **asdict(probes))
    rec.log("probes: " + "; ".join(probes.describe()))

    runs = default_runs(len(layout.blocks), cuda)
    if args.full:
        runs += [r for r in plan_runs(len(layout.blocks), cuda=cuda) if r not in runs]
    if args.only:
        runs = [r for r in runs if r.method == "resident" or re.search(args.only, r.label)]
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    tokens = args.tokens or (8 if args.quick else 512 if cuda else 32)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    rows = []
    for i, run in enumerate(runs, 1):
        if run.needs_cuda and not cuda:
            row = {"label": run.label, "run": asdict(run), "status": "needs CUDA"}
        elif run.method == "group_offload" and not has_diffusers:
            row = {"label": run.label, "run": asdict(run), "status": "needs diffusers (carry its wheel)"}
        else:
            row = _in_child(Job(run, str(checkpoint), args.device, args.calls, tokens, str(scratch)), args.run_timeout)
        rows.append(row)
        rec.result("run", **row)
        figure = f"{row['median_s'] * 1e3:.1f} ms" if row.get("status") == "ok" else row.get("status")
        if row.get("differing_calls"):
            figure += f"; DIFFERS from the resident model at calls {row['differing_calls']}"
        rec.log(f"[{i}/{len(runs)}] {run.label}: {figure}")
        _report(rows, probes, layout, info, args, rec, checkpoint, tokens)
    return 0 if all(row_passed(r) for r in rows) else 1


def row_passed(row: dict) -> bool:
    """A run that ran, and, for lazystream, whose every call equals the resident model's
    output bit for bit (a peer's difference is reported in the table, not failed)."""
    status = row.get("status", "")
    if status.startswith("needs"):
        return True
    if status != "ok":
        return False
    if row["run"]["method"] != "lazystream":
        return True
    return row.get("calls_compared", 0) > 0 and not row.get("differing_calls")


def _child_result(child_args: list[str], args: argparse.Namespace, rec: Recorder) -> dict | None:
    from lazystream.bench.suite import _child
    from lazystream.bench.methods import iter_results

    try:
        run = _child(child_args, args.run_timeout)
    except subprocess.TimeoutExpired:
        rec.result("error", step=child_args[0], message=f"timed out after {args.run_timeout:.0f} s")
        rec.log(f"{child_args[0]}: timed out")
        return None
    found = list(iter_results(run.stdout))
    if not found:
        rec.result("error", step=child_args[0], message=f"exit {run.returncode}", stderr=run.stderr[-3000:])
        rec.log(f"{child_args[0]} failed (exit {run.returncode})")
        return None
    return found[-1]


def _report(rows, probes, layout, info, args, rec: Recorder, checkpoint: Path, tokens: int) -> None:
    """bench.json and bench.md from the runs so far (rewritten after each)."""
    from lazystream.bench.suite import render
    from lazystream.bench.report import add_derived, cpu_comparisons, cpu_targets, gpu_targets, resident_seconds

    rows = [dict(r) for r in rows]
    add_derived(rows, probes)
    cuda = args.device == "cuda"
    targets = gpu_targets(rows, probes) if cuda else cpu_targets(rows, probes, len(layout.blocks))
    report = {
        "command": "python tools/gpu_check.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**info, "device_name": info.get("gpu", {}).get("name") or ("CUDA" if cuda else "CPU")},
        "checkpoint": {"path": str(checkpoint), "class": layout.cls.__name__, "bytes": layout.total_bytes,
                       "dtype": str(layout.dtype).removeprefix("torch."), "blocks": len(layout.blocks),
                       "block_bytes": max(layout.block_bytes)},
        "device": args.device, "calls": args.calls, "tokens": tokens, "probes": asdict(probes),
        "resident_s": resident_seconds(rows), "rows": rows, "seconds": time.monotonic() - rec.started,
        "targets": [asdict(t) for t in targets],
    }
    rec.write("bench.json", json.dumps(report, indent=1))
    rec.write("bench.md", render(report, probes, targets, [] if cuda else cpu_comparisons(rows, probes), False))


if __name__ == "__main__":
    sys.exit(main())
