"""The GPU check's ordering stress: every call of a streamed model against the resident
library model, with the device slowed where a missing wait would show, and negative
controls that remove a wait and must give wrong outputs.

    python tools/gpu_ordering.py CHECKPOINT --device cuda|cpu --io mmap|direct|register

Prints one line per case (``LAZYSTREAM_ORDERING_RESULT {json}``, flushed) as it finishes;
tools/gpu_check.py runs it once per io mode in a process of its own, with a timeout.

Each case loads the checkpoint streamed (2 of 6 blocks resident, or none), with a staging
ring of two small buffers so that it wraps many times per call, and calls it ``--calls``
times (in a session, then outside one), comparing each output with ``torch.equal``. The
stress, on CUDA: ``torch.cuda._sleep`` kernels before every copy on the copy stream (a
copy lands long after it was issued) and before every linear layer on the compute stream
(a block's weights are read long after its kernels were queued), and the model run on a
side stream of the user's. A control replaces one of the device object's waits with a
no-op after the load:

  compute_waits_for  compute no longer waits for a slot's copy   (copies slowed)
  copy_waits_for     a copy no longer waits for the slot's last reader (compute slowed)
  host_waits_for     the readers refill a staging buffer whose copy has not run (copies slowed)

and passes only if some call then differs: a control whose outputs stay equal shows the
check could not have seen that wait missing. On the CPU device every copy completes when
it returns, so the controls cannot differ there: they are reported "not applicable on CPU".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT_PREFIX = "LAZYSTREAM_ORDERING_RESULT "
LAYERS = 6
STRESS_CHECKPOINT = {"hidden_size": 128, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 384, "vocab_size": 512,
                     "max_position_embeddings": 512, "rope_theta": 1_000_000.0}
COPY_SLEEP_CYCLES = 400_000  # before each copy: ~0.2-0.3 ms at the copy stream's head
COMPUTE_SLEEP_CYCLES = 400_000  # before each linear layer
CONTROLS = ("compute_waits_for", "copy_waits_for", "host_waits_for")


@dataclass(frozen=True)
class Case:
    name: str
    keep: int = 2
    prefetch: int = 2
    sleep_copy: bool = False
    sleep_compute: bool = False
    side_stream: bool = False
    control: str | None = None  # the wait replaced by a no-op


def cases(io: str) -> list[Case]:
    staged = io != "register"  # the register mode copies from the mappings: no ring to refill
    found = [Case("plain"),
             Case("sleeps on copies and compute", sleep_copy=True, sleep_compute=True),
             Case("sleeps, nothing resident, one slot", keep=0, prefetch=1, sleep_copy=True, sleep_compute=True),
             Case("sleeps, on a side stream", sleep_copy=True, sleep_compute=True, side_stream=True),
             Case("control: compute_waits_for removed", sleep_copy=True, control="compute_waits_for"),
             Case("control: copy_waits_for removed", sleep_compute=True, control="copy_waits_for")]
    if staged:
        found.append(Case("control: host_waits_for removed", sleep_copy=True, control="host_waits_for"))
    return found


def build_stress_checkpoint(path: Path) -> Path:
    """A float32 Qwen3 of 6 blocks at ``path``, sharded so that blocks straddle files (built
    once: a folder with a config.json is taken as built)."""
    from lazystream.synthetic import build_qwen3

    if not (path / "config.json").is_file():
        build_qwen3(path, STRESS_CHECKPOINT, max_shard_size="200KB", seed=3)
    return path


def io_config(io: str):
    from lazystream import IOConfig

    if io == "register":
        return IOConfig(mode="register")
    return IOConfig(mode=io, staging_bytes=16384, staging_buffers=2)


def _sleep_copies(ops, cycles: int) -> None:
    import torch

    real = ops.copy_in

    def copy_in(dst, src):
        with torch.cuda.stream(ops.copy_stream):
            torch.cuda._sleep(cycles)
        real(dst, src)

    ops.copy_in = copy_in


def _sleep_compute(model, cycles: int) -> list:
    import torch

    def sleep(module, args):
        torch.cuda._sleep(cycles)  # on the current stream: the one the forward runs on

    return [m.register_forward_pre_hook(sleep) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def run_case(case: Case, checkpoint: Path, device, io: str, ids, want, calls: int) -> dict:
    import torch

    from lazystream import LazyStreamModel, streamer_of

    cuda = device.type == "cuda"
    row = {"io": io, **asdict(case)}
    if not cuda and (case.control or case.side_stream or io == "register"):
        why = ("a control needs a device whose copies run later than issued" if case.control
               else "a side stream needs CUDA" if case.side_stream else "register mode needs CUDA (cudaHostRegister)")
        return {**row, "status": "not applicable on CPU", "why": why}
    model = LazyStreamModel.from_pretrained(checkpoint, case.keep, device=device, prefetch=case.prefetch,
                                            io=io_config(io))
    streamer = streamer_of(model)
    ops, hooks = streamer.ops, []
    try:
        if case.sleep_copy and cuda:
            _sleep_copies(ops, COPY_SLEEP_CYCLES)
        if case.sleep_compute and cuda:
            hooks = _sleep_compute(model, COMPUTE_SLEEP_CYCLES)
        if case.control:
            setattr(ops, case.control, lambda marker: None)  # the instance's no-op hides the method
        stream = torch.cuda.Stream(device) if case.side_stream else None
        on_stream = (lambda: torch.cuda.stream(stream)) if stream is not None else contextlib.nullcontext
        equal, diffs = [], []

        def call() -> None:
            with on_stream():
                out = model(ids).logits.cpu()  # on the stream the forward ran on: ordered after it
            equal.append(bool(torch.equal(out, want)))
            diffs.append(float((out - want).abs().max()) if out.shape == want.shape else float("inf"))

        with torch.no_grad():
            with streamer.session():  # the wrap-around prefetch: a call's first blocks fetched by the last
                for _ in range(calls - 2):
                    call()
            for _ in range(2):  # outside a session
                call()
    finally:
        if case.control:
            delattr(ops, case.control)  # close() waits for what is in flight
        if "copy_in" in vars(ops):
            del ops.copy_in
        for hook in hooks:
            hook.remove()
        if cuda:
            torch.cuda.synchronize(device)
        streamer.close()
    differing = [i for i, e in enumerate(equal) if not e]
    if case.control:
        status = "ok: the control differs" if differing else "FAILED: the control gave equal outputs (no power)"
    else:
        status = "ok" if not differing else "FAILED: outputs differ from the resident model"
    return {**row, "status": status, "calls": calls, "differing_calls": differing, "max_abs_diff": max(diffs),
            "stress_applied": cuda}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="built there first if it is not (build_stress_checkpoint)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--io", default="mmap", choices=("mmap", "direct", "register"))
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    build_stress_checkpoint(args.checkpoint)
    device = torch.device(args.device)
    ids = torch.randint(0, STRESS_CHECKPOINT["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    resident = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        want = resident(ids).logits.cpu()
    del resident
    failed = False
    for case in cases(args.io):
        started = time.monotonic()
        try:
            row = run_case(case, args.checkpoint, device, args.io, ids, want, args.calls)
        except Exception as exc:  # one case failing must not hide the others
            traceback.print_exc()
            row = {"io": args.io, **asdict(case), "status": f"FAILED: {type(exc).__name__}: {exc}"[:400]}
        row["seconds"] = round(time.monotonic() - started, 2)
        failed |= row["status"].startswith("FAILED")
        print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
