"""The logic of tools/gpu_check.py and tools/gpu_ordering.py on the CPU: a difference at any
call fails the check, a control is never reported as passed where it cannot run, and a
control that gives equal outputs fails the check (it had no power)."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_check  # noqa: E402
import gpu_ordering  # noqa: E402

from lazystream.bench.methods import Job, _Reference  # noqa: E402
from lazystream.bench.runs import Run  # noqa: E402


def test_the_bench_compares_every_call_with_the_resident_output(tmp_path):
    def job(method):
        return Job(Run(method), "unused", "cpu", 3, 8, str(tmp_path))

    out = torch.arange(6.0)
    resident = _Reference(job("resident"))
    for _ in range(3):
        resident.compare(out)
    assert resident.summary() == {"max_abs_diff": 0.0, "calls_compared": 3, "differing_calls": []}
    streamed = _Reference(job("lazystream"))
    wrong = out.clone()
    wrong[2] += 2**-20  # the third call only
    for value in (out, out, wrong, out):
        streamed.compare(value)
    assert streamed.summary()["differing_calls"] == [2]
    nan = out.clone()
    nan[0] = float("nan")
    streamed.compare(nan)
    assert streamed.summary()["differing_calls"] == [2, 4] and streamed.summary()["max_abs_diff"] != 0.0


@pytest.mark.parametrize("row, passed", [
    ({"status": "ok", "run": {"method": "lazystream"}, "calls_compared": 6, "differing_calls": []}, True),
    ({"status": "ok", "run": {"method": "lazystream"}, "calls_compared": 6, "differing_calls": [5]}, False),
    ({"status": "ok", "run": {"method": "lazystream"}}, False),  # nothing compared: no resident output
    ({"status": "ok", "run": {"method": "cpu_offload"}, "calls_compared": 6, "differing_calls": [1]}, True),
    ({"status": "needs CUDA", "run": {"method": "lazystream"}}, True),
    ({"status": "error: RuntimeError: x", "run": {"method": "lazystream"}}, False),
])
def test_a_lazystream_run_passes_only_if_every_call_was_equal(row, passed):
    assert gpu_check.row_passed(row) is passed


@pytest.fixture(scope="module")
def stress(tmp_path_factory):
    path = gpu_ordering.build_stress_checkpoint(tmp_path_factory.mktemp("ordering") / "qwen3")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits
    return path, ids, want


@pytest.mark.parametrize("io", ["mmap", "direct", "register"])
def test_ordering_cases_on_the_cpu(stress, io):
    path, ids, want = stress
    for case in gpu_ordering.cases(io):
        row = gpu_ordering.run_case(case, path, torch.device("cpu"), io, ids, want, calls=3)
        if case.control or case.side_stream or io == "register":
            assert row["status"] == "not applicable on CPU", row  # never "ok"
        else:
            assert row["status"] == "ok" and row["differing_calls"] == [], row


def test_an_ordering_case_fails_on_a_wrong_output(stress):
    path, ids, want = stress
    wrong = want.clone()
    wrong[0, 0, 0] += 1e-3
    row = gpu_ordering.run_case(gpu_ordering.Case("plain"), path, torch.device("cpu"), "mmap", ids, wrong, calls=3)
    assert row["status"].startswith("FAILED: outputs differ") and row["differing_calls"] == [0, 1, 2]


def _printing(tmp_path, *rows, code=0):
    lines = "".join(f"print({gpu_ordering.RESULT_PREFIX + json.dumps(r)!r}, flush=True)\n" for r in rows)
    script = tmp_path / "child.py"
    script.write_text(lines + f"raise SystemExit({code})\n")
    return [sys.executable, str(script)]


@pytest.mark.parametrize("rows, code, passed", [
    ([{"name": "plain", "status": "ok"}, {"name": "c", "status": "ok: the control differs"}], 0, True),
    ([{"name": "plain", "status": "ok"}, {"name": "c", "status": "not applicable on CPU"}], 0, True),
    ([{"name": "c", "status": "FAILED: the control gave equal outputs (no power)"}], 1, False),
    ([], 1, False),  # died before any case
])
def test_the_check_records_each_case_and_fails_on_any_failure(tmp_path, rows, code, passed):
    out = tmp_path / "out"
    rec = gpu_check.Recorder(out)
    step = gpu_check.Ordering(Namespace(out=out, run_timeout=60, work=tmp_path, device="cpu"), rec)
    assert step._one("mmap", _printing(tmp_path, *rows, code=code), gpu_ordering.RESULT_PREFIX) is passed
    recorded = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in recorded if r["name"] != "(process)"] == [r["name"] for r in rows]


def test_a_hung_case_is_killed_at_the_run_timeout(tmp_path):
    out = tmp_path / "out"
    rec = gpu_check.Recorder(out)
    step = gpu_check.Ordering(Namespace(out=out, run_timeout=2, work=tmp_path, device="cpu"), rec)
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(60)\n")
    assert step._one("mmap", [sys.executable, str(script)], gpu_ordering.RESULT_PREFIX) is False
    assert "killed after 2 s" in (out / "results.jsonl").read_text()


def test_the_scripts_run_without_an_install(tmp_path):
    """The GPU machine has no network: the scripts find lazystream in the checkout itself."""
    code = "import gpu_ordering, lazystream, sys; print(lazystream.__file__)"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TOOLS)!r}); {code}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert Path(out.stdout.strip()).parent.parent == TOOLS.parent
