"""``lazystream bench --quick`` end to end on a tiny checkpoint, and the pieces a
benchmark's figures depend on: which runs are made, the floor, the page-cache helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lazystream import Checkpoint
from lazystream.bench import main
from lazystream.bench.methods import Job, layout_of
from lazystream.bench.pagecache import cached_fraction, evict, unmap_pages
from lazystream.bench.probes import Probes
from lazystream.bench.report import add_derived, cpu_targets
from lazystream.bench.runs import Run, keep_fractions, plan_runs


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    code = main(["--quick", "--in-process", "--out", str(out), "--work", str(work)])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_run_measures_every_method_the_cpu_can_run(quick):
    _, report = quick
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows)[0] == "resident"
    for label, row in rows.items():
        if Run.from_dict(row["run"]).needs_cuda:
            assert row["status"] == "needs CUDA", label
            continue
        assert row["status"] == "ok", (label, row["status"])
        assert len(row["forward_s"]) == 5 and row["median_s"] > 0
        assert row["max_abs_diff"] == 0.0, label  # every method computes the resident model's output
        assert row["x_floor"] > 0 and row["floor_s"] >= report["resident_s"]
    assert {r["run"]["method"] for r in report["rows"] if r["status"] == "ok"} == {
        "resident", "lazystream", "device_map", "group_offload"}


def test_quick_run_counts_streamed_bytes_of_the_plan(quick):
    _, report = quick
    n_blocks = report["checkpoint"]["blocks"]
    block = report["checkpoint"]["block_bytes"]
    for row in report["rows"]:
        run = row["run"]
        if row["status"] == "ok" and run["method"] == "lazystream":
            assert row["streamed_bytes"] == (n_blocks - run["keep"]) * block
            assert row["device_peak_bytes"] >= (run["keep"] + min(2, n_blocks - run["keep"])) * block
        if row["status"] == "ok" and run["cold"]:
            assert row["cached_before_call"] < 0.5  # the eviction took the pages out


def test_quick_run_writes_table_targets_and_plot(quick):
    out, report = quick
    markdown = (out / "bench.md").read_text()
    assert "| method | load s |" in markdown and "needs CUDA" in markdown
    assert "keep_gpu=0 overhead" in markdown and "lazystream bench --quick" in markdown
    assert len(report["targets"]) == 2
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_one_run_in_its_own_process(quick, tmp_path):
    from lazystream.bench import _in_child

    _, report = quick
    job = Job(Run("lazystream", keep=1, placement="first", io="direct"), report["checkpoint"]["path"], "cpu",
              calls=2, tokens=4, work=str(tmp_path))
    row = _in_child(job, timeout=120)
    assert row["status"] == "ok" and len(row["forward_s"]) == 2
    assert row["host_anon_peak_bytes"] >= 0 and row["staging_bytes"] > 0


def test_runs_cover_the_issue_grid():
    runs = plan_runs(24, cuda=True)
    labels = [r.label for r in runs]
    assert keep_fractions(24) == [0, 6, 12, 18]
    lazy = [r for r in runs if r.method == "lazystream" and not r.cold]
    assert len(lazy) == 1 + 2 + 3 * 2 * 2  # all resident; keep 0 by io; keep 6/12/18 by placement and io
    assert {"lazystream keep=0 spread mmap cold", "lazystream keep=0 spread direct cold", "cpu_offload",
            "group_offload block_level", "group_offload block_level stream", "group_offload leaf_level",
            "group_offload leaf_level stream", "group_offload block_level stream disk",
            "group_offload leaf_level stream disk", "device_map keep=12 rest on cpu", "first_n_sequential keep=6",
            "device_map keep=0 rest on disk"} <= set(labels)
    assert len(labels) == len(set(labels))
    assert not any(r.needs_cuda for r in plan_runs(24, cuda=False) if r.method == "lazystream")


def test_floor_and_cpu_targets_from_rows():
    probes = Probes(memcpy=2.0, direct_cold=0.5, direct_cold_by_threads={"4": 0.5, "8": 0.4}, mapped_cold=0.4,
                    h2d=None, cached_after_evict=0.0, checkpoint_bytes=10**9, torch_threads=2)

    def row(run: Run, median: float, streamed: int) -> dict:
        return {"label": run.label, "run": json.loads(run.to_json()), "status": "ok", "median_s": median,
                "streamed_bytes": streamed}

    rows = [row(Run("resident"), 1.0, 0),
            row(Run("lazystream", keep=4, placement="spread", io="mmap"), 1.01, 0),
            row(Run("lazystream", keep=0, placement="spread", io="mmap"), 1.5, 10**9),
            row(Run("lazystream", keep=0, placement="spread", io="direct", cold=True), 2.5, 10**9)]
    add_derived(rows, probes)
    assert rows[2]["floor_s"] == 1.0 and rows[2]["x_floor"] == 1.5  # max(C, 1 GB / 2 GB/s) = C
    assert rows[3]["floor_s"] == 2.0 and rows[3]["x_floor"] == 1.25  # cold: 1 GB / 0.5 GB/s
    assert math.isclose(rows[2]["effective_gb_per_s"], 1 / 1.5)
    full, zero = cpu_targets(rows, probes, n_blocks=4)
    assert full.met and "+1.0%" in full.figure
    assert zero.met and "500 ms over resident = 1.00 × S/B" in zero.figure


def test_evict_and_unmap_empty_the_page_cache_of_the_checkpoint(quick):
    _, report = quick
    with Checkpoint.open(report["checkpoint"]["path"]) as ckpt:
        paths = ckpt.shard_paths
        for path in paths:
            torch.sum(ckpt.shard(path).bytes.to(torch.int64))  # fault every page in through the mapping
        assert cached_fraction(paths) > 0.9
        for path in paths:
            unmap_pages(ckpt.shard(path).bytes)
        evict(paths)
        left = cached_fraction(paths)
        if left > 0.5:
            pytest.skip("this filesystem ignores posix_fadvise(DONTNEED)")
        # Most pages go; a few may stay (pages another process or readahead holds).
        assert left < 0.35


def test_layout_names_every_tensor_outside_the_blocks(quick):
    _, report = quick
    layout = layout_of(report["checkpoint"]["path"])
    assert layout.blocks == tuple(f"model.layers.{i}" for i in range(4))
    assert set(layout.outside_keys) == {"model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"}
    assert layout.block_parents == ["model"]
    assert layout.outside_bytes + sum(layout.block_bytes) == layout.total_bytes


def test_repeat_keeps_the_median_process(monkeypatch):
    import argparse

    import lazystream.bench as bench

    medians = iter([0.9, 0.5, 0.7])
    monkeypatch.setattr(bench, "_quietest", lambda job, args: {"status": "ok", "median_s": next(medians),
                                                                "forward_s": [0.1], "pid": 1})
    row = bench._repeated(None, argparse.Namespace(repeat=3))
    assert row["median_s"] == 0.7 and row["process_medians_s"] == [0.5, 0.7, 0.9]
    assert row["forward_s"] == [0.1, 0.1, 0.1]
