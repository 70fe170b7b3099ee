"""keep_gpu="auto", placement="cost", the cost model, the probe and `lazystream plan`."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from transformers import Qwen3ForCausalLM

from lazystream import LazyStreamModel, streamer_of
from lazystream.cli import main as cli_main
from lazystream.cost import Timing, cheapest_resident_set, first, simulate, spread
from lazystream.errors import DeviceMemoryError
from lazystream.planner import PlanRequest, make_plan, parse_bytes
from lazystream.probe import Bandwidth, Calibration, cache_dir
from lazystream.synthetic import build_qwen3

LAYERS = 6


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = build_qwen3(tmp_path_factory.mktemp("qwen3"), {"num_hidden_layers": LAYERS}, max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = Qwen3ForCausalLM.from_pretrained(path).eval()(ids).logits
    return path, ids, want


# -- the cost model ---------------------------------------------------------------------


def test_simulate_limits():
    t = Timing(block_compute=(1.0,) * 4, block_transfer=(2.0,) * 4)
    assert simulate(t, set(range(4)), 2) == pytest.approx(4.0)  # all resident: compute only
    zero = Timing(block_compute=(0.0,) * 4, block_transfer=(2.0,) * 4)
    assert simulate(zero, set(), 2, session=False) == pytest.approx(8.0)  # one copy engine
    # Transfer hidden behind compute when the copy is shorter and slots allow overlap.
    hidden = Timing(block_compute=(3.0,) * 4, block_transfer=(1.0,) * 4)
    assert simulate(hidden, set(), 2) == pytest.approx(12.0)
    assert simulate(hidden, set(), 2, session=False) == pytest.approx(13.0)  # the first fetch shows
    # One slot: a copy waits for the previous streamed block to finish computing.
    assert simulate(hidden, set(), 1, session=False) > simulate(hidden, set(), 2, session=False)


@pytest.mark.parametrize("seed", range(40))
def test_cost_placement_never_predicted_slower_than_first_or_spread(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 16)
    timing = Timing(block_compute=tuple(rng.uniform(0, 3) for _ in range(n)),
                    block_transfer=tuple(rng.uniform(0, 5) for _ in range(n)),
                    other_compute=rng.uniform(0, 2))
    keep, prefetch = rng.randint(0, n), rng.randint(1, 3)
    session = rng.random() < 0.5
    chosen = cheapest_resident_set(timing, keep, prefetch, [1] * n, session=session)
    assert len(chosen) == keep
    best = simulate(timing, chosen, prefetch, session=session)
    assert best <= simulate(timing, first(n, keep), prefetch, session=session) + 1e-9
    assert best <= simulate(timing, spread(n, keep), prefetch, session=session) + 1e-9


def test_cost_placement_keeps_the_blocks_whose_transfer_nothing_hides():
    # Blocks 0-2 compute long, block 3 computes nothing: streaming 3 can hide behind 0-2,
    # streaming 0 cannot hide behind anything at the start of a call.
    timing = Timing(block_compute=(5.0, 5.0, 5.0, 0.0), block_transfer=(4.0,) * 4)
    chosen = cheapest_resident_set(timing, 1, 2, [1] * 4, session=False)
    assert chosen == {0}


@pytest.mark.parametrize("text, value", [(123, 123), ("6GiB", 6 * 2**30), ("1.5 GB", 1_500_000_000),
                                         ("512MiB", 512 * 2**20), ("10", 10)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["6 gigs", "-1", -5, True, None, "GiB"])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ValueError, match="expected a byte count"):
        parse_bytes(bad)


# -- keep_gpu="auto" ----------------------------------------------------------------


def _builder(path):
    from lazystream.adapters import build_skeleton, family_of, model_class
    from lazystream.checkpoint import Checkpoint
    from lazystream.conversions import sources_for
    from lazystream.planner import plan_builder

    ckpt = Checkpoint.open(path)
    model = build_skeleton(model_class(ckpt.config, path), ckpt.config, torch.float32)
    from lazystream.adapters import find_blocks

    return plan_builder(model, sources_for(model, ckpt), find_blocks(model), dtype=torch.float32,
                        family=family_of(model, torch.float32), device=torch.device("cpu")), ckpt


PROBE = Bandwidth(memcpy=5e9, read=4e9, h2d=None)


@pytest.mark.parametrize("budget_kib", [350, 450, 600, 800, 1200])
@pytest.mark.parametrize("placement", ["spread", "cost"])
def test_auto_never_exceeds_the_budget(qwen3, budget_kib, placement):
    build, ckpt = _builder(qwen3[0])
    request = PlanRequest.of("auto", placement, 2, budget_kib * 1024, 20 * 1024)
    calibration = Calibration((0.001,) * LAYERS, 0.0005, 0)
    plan = make_plan(request, build, device=torch.device("cpu"), bandwidth=PROBE, calibration=calibration)
    assert plan.device_bytes + plan.budget.activation_bytes <= budget_kib * 1024
    # And it is the most that fits: one more resident block would not, with as many slots.
    if plan.keep_gpu < LAYERS:
        bigger = build(keep_gpu=plan.keep_gpu + 1, placement="spread", prefetch=plan.prefetch)
        assert bigger.device_bytes + 20 * 1024 > budget_kib * 1024
    ckpt.close()


def test_auto_plan_is_deterministic_for_a_probe_result(qwen3):
    build, ckpt = _builder(qwen3[0])
    request = PlanRequest.of("auto", "cost", 2, "700KiB", "10KiB")
    calibration = Calibration(tuple(0.001 * (i + 1) for i in range(LAYERS)), 0.002, 0)
    plans = [make_plan(request, build, device=torch.device("cpu"), bandwidth=PROBE, calibration=calibration)
             for _ in range(3)]
    assert plans[0] == plans[1] == plans[2]
    ckpt.close()


def test_auto_too_small_a_budget(qwen3):
    with pytest.raises(DeviceMemoryError, match=r"keep_gpu='auto' found no plan within the budget: even keep_gpu=0 "
                                                r"with prefetch=1 needs [\d.]+ MiB, but the budget leaves [\d.]+ MiB "
                                                r"\([\d.]+ MiB from max_gpu_memory, .*\); raise max_gpu_memory$"):
        LazyStreamModel.from_pretrained(qwen3[0], "auto", max_gpu_memory="100KiB", activation_reserve=0)


def test_auto_loads_within_budget_and_gives_equal_outputs(qwen3):
    path, ids, want = qwen3
    model = LazyStreamModel.from_pretrained(path, "auto", max_gpu_memory="600KiB", activation_reserve="16KiB")
    streamer = streamer_of(model)
    plan = streamer.plan
    assert 0 < plan.keep_gpu < LAYERS
    assert streamer.stats().device_bytes == plan.device_bytes <= 600 * 1024 - 16 * 1024
    assert "budget 0.6 MiB, of which 0.0 MiB held for activations (budget: max_gpu_memory; " \
           "activations: activation_reserve)" in str(plan)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    streamer.close()


def test_first_call_calibrates_then_the_cache_is_used(qwen3):
    path, ids, want = qwen3
    model = LazyStreamModel.from_pretrained(path, "auto", max_gpu_memory="600KiB", placement="cost")
    streamer = streamer_of(model)
    assert "10% until the first call measures it" in str(streamer.plan)
    assert streamer._on_calibrated is not None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # the calibration call
        assert streamer._on_calibrated is None
        assert "measured on the first call" in str(streamer.plan)
        assert streamer.plan.prediction.calibrated
        assert torch.equal(model(ids).logits, want)  # under the calibrated plan
    assert streamer.stats().device_bytes == streamer.plan.device_bytes
    streamer.close()
    assert list((cache_dir() / "calibration").glob("*.json"))
    again = LazyStreamModel.from_pretrained(path, "auto", max_gpu_memory="600KiB", placement="cost")
    assert streamer_of(again)._on_calibrated is None  # cached
    assert streamer_of(again).plan == streamer.plan
    streamer_of(again).close()


@pytest.mark.parametrize("placement", ["spread", "cost"])
def test_auto_replan_after_the_first_call_does_not_count_the_models_own_memory(qwen3, monkeypatch, tmp_path,
                                                                               placement):
    """No max_gpu_memory: the budget is the free device memory. At the re-plan after the
    calibration call the model's own buffers are allocated; counted as used by someone
    else, they shrank the resident set (or left no plan at all: DeviceMemoryError)."""
    from lazystream import planner

    monkeypatch.setenv("LAZYSTREAM_CACHE", str(tmp_path))  # no calibration cached yet
    path, ids, want = qwen3
    total, loaded = 700 * 1024, []

    def free_device_bytes(device):  # a device of `total` bytes, less what the loaded model holds
        return total - sum(s.stats().device_bytes for s in loaded if s._loaded)

    monkeypatch.setattr(planner, "free_device_bytes", free_device_bytes)
    model = LazyStreamModel.from_pretrained(path, "auto", placement=placement)
    streamer = streamer_of(model)
    loaded.append(streamer)
    first = streamer.plan
    assert 0 < first.keep_gpu < LAYERS and "10% until the first call" in str(first)
    assert free_device_bytes(None) < 0.5 * total  # the model's own buffers are most of the device
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # calibrates, then re-plans
    replanned = streamer.plan
    assert "measured on the first call" in str(replanned)
    assert replanned.budget.device_bytes == first.budget.device_bytes
    assert streamer.stats().device_bytes == replanned.device_bytes <= replanned.budget.device_bytes
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    streamer.close()
    # The plan a load with the calibration cached makes, on the whole free device.
    again = LazyStreamModel.from_pretrained(path, "auto", placement=placement, load=False)
    assert streamer_of(again).plan == replanned
    streamer_of(again).close()


def test_auto_replan_at_a_cast_does_not_count_the_models_own_memory(qwen3, monkeypatch):
    """A .to(dtype) of a loaded model re-plans before it frees: the model's own buffers are
    given back before the new plan loads, so they count as free."""
    from lazystream import planner

    path, ids, _ = qwen3
    total, loaded = 1100 * 1024, []

    def free_device_bytes(device):  # a device of `total` bytes, less what the loaded model holds
        return total - sum(s.stats().device_bytes for s in loaded if s._loaded)

    monkeypatch.setattr(planner, "free_device_bytes", free_device_bytes)
    model = LazyStreamModel.from_pretrained(path, "auto", activation_reserve=0)
    streamer = streamer_of(model)
    loaded.append(streamer)
    assert free_device_bytes(None) < 0.2 * total  # the model's own buffers are most of the device
    model.to(torch.float64)  # twice the bytes per block: fewer fit, but within the whole device
    cast = streamer.plan
    assert cast.dtype == torch.float64 and cast.keep_gpu < LAYERS
    with torch.no_grad():
        want = Qwen3ForCausalLM.from_pretrained(path).to(torch.float64).eval()(ids).logits
        assert torch.equal(model(ids).logits, want)
    streamer.close()
    # The plan a float64 load makes on the whole free device.
    fresh = streamer_of(LazyStreamModel.from_pretrained(path, "auto", activation_reserve=0, dtype=torch.float64,
                                                        load=False)).plan
    assert (cast.keep_gpu, cast.device_bytes, cast.budget.device_bytes) == \
        (fresh.keep_gpu, fresh.device_bytes, fresh.budget.device_bytes)


@pytest.mark.parametrize("keep_gpu", [0, 2, 5])
def test_cost_placement_outputs_equal(qwen3, keep_gpu):
    path, ids, want = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu, placement="cost")
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, want)
    assert sum(b.resident for b in streamer_of(model).plan.blocks) == keep_gpu
    streamer_of(model).close()


# -- lazystream plan ------------------------------------------------------------------


@pytest.mark.parametrize("keep_gpu", ["0", "3", str(LAYERS)])
@pytest.mark.parametrize("prefetch", ["1", "2"])
def test_plan_command_matches_the_runtime_allocations(qwen3, capsys, keep_gpu, prefetch):
    path = qwen3[0]
    assert cli_main(["plan", str(path), "--keep-gpu", keep_gpu, "--prefetch", prefetch, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model = LazyStreamModel.from_pretrained(path, int(keep_gpu), prefetch=int(prefetch))
    streamer = streamer_of(model)
    assert printed["device_bytes"] == streamer.stats().device_bytes == streamer.plan.device_bytes
    assert [b["resident"] for b in printed["blocks"]] == [b.resident for b in streamer.plan.blocks]
    prediction = printed["prediction"]
    if prediction["calibrated"]:
        assert prediction["bound"] in {"compute", "pcie", "disk", "memcpy"}
    else:  # only the transfer is known: no made-up total or bound
        assert prediction["seconds"] is prediction["compute_seconds"] is prediction["bound"] is None
        assert prediction["transfer_seconds"] > 0 or int(keep_gpu) >= LAYERS
    streamer.close()


def test_plan_command_table(qwen3, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYSTREAM_CACHE", str(tmp_path))  # no calibration yet
    assert cli_main(["plan", str(qwen3[0]), "--vram", "700KiB", "--activation-reserve", "0"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM: 6 blocks" in out and "model.layers.5" in out
    assert "budget 0.7 MiB" in out
    # Uncalibrated: the transfer time, and no made-up total or bound.
    assert re.search(r"predicted per call: at least [\d.]+ ms, the transfer at the probed \w+ bandwidth", out)
    assert "compute: not calibrated yet" in out and "bound by" not in out

    model = LazyStreamModel.from_pretrained(qwen3[0], "auto", max_gpu_memory="700KiB", activation_reserve=0,
                                            placement="cost")
    with torch.no_grad():
        model(qwen3[1])  # calibrates, for this machine and checkpoint
    streamer_of(model).close()
    assert cli_main(["plan", str(qwen3[0]), "--vram", "700KiB", "--activation-reserve", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"predicted [\d.]+ ms per call: compute [\d.]+ ms, transfer [\d.]+ ms; bound by \w+", out)
    assert "not calibrated" not in out


def test_plan_command_reads_only_headers(qwen3, capsys, monkeypatch):
    from lazystream.checkpoint import Checkpoint

    def no_reads(*args, **kwargs):
        raise AssertionError("plan read tensor bytes")

    monkeypatch.setattr(Checkpoint, "read_into", no_reads)
    monkeypatch.setattr(Checkpoint, "copy_run", no_reads)
    monkeypatch.setattr(Checkpoint, "tensor", no_reads)
    assert cli_main(["plan", str(qwen3[0]), "--keep-gpu", "2"]) == 0


def _as_hub_repo(monkeypatch, path, tmp_path) -> None:
    """Serve the local checkpoint ``path`` as a hub repo that is neither a folder nor cached:
    the file listing, downloads (config, index) and headers by huggingface_hub's functions."""
    import huggingface_hub

    from lazystream.header import read_header

    files = sorted(p.name for p in path.iterdir())

    class Api:
        def model_info(self, repo, revision=None, token=None, timeout=None):
            return None  # the hub answered: the repo exists

        def list_repo_files(self, repo, revision=None, token=None):
            return files

    def download(repo, filename, revision=None, **kwargs):
        return str(path / filename)

    def parse(repo, filename, revision=None):
        header = read_header(path / filename)

        class Info:
            def __init__(self, rec):
                self.dtype = next(k for k, v in __import__("lazystream.header", fromlist=["DTYPES"]).DTYPES.items()
                                  if v == rec.dtype)
                self.shape = list(rec.shape)
                self.data_offsets = (rec.offset - header.data_start, rec.offset - header.data_start + rec.nbytes)

        return type("Meta", (), {"tensors": {r.name: Info(r) for r in header.records}})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", parse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def test_plan_command_for_a_hub_repo_reads_headers_through_huggingface_hub(qwen3, capsys, monkeypatch, tmp_path):
    """A repo id that is neither a folder nor cached: headers by range requests, config by download
    (device bytes exact to within alignment padding)."""
    path = qwen3[0]
    _as_hub_repo(monkeypatch, path, tmp_path)
    assert cli_main(["plan", "someone/qwen3-tiny", "--keep-gpu", "2", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert cli_main(["plan", str(path), "--keep-gpu", "2", "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    # The hub's header API gives offsets inside the data section, not the header's length,
    # so alignment padding may differ by up to MAP_ALIGN per tensor.
    n_tensors = 3 + 11 * LAYERS
    assert abs(remote["device_bytes"] - local["device_bytes"]) <= 64 * n_tensors + 512 * 4
    assert remote["blocks"] == local["blocks"]


def test_a_failed_first_call_does_not_calibrate(qwen3, tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYSTREAM_CACHE", str(tmp_path))  # no calibration cached yet
    path, ids, want = qwen3
    model = LazyStreamModel.from_pretrained(path, "auto", max_gpu_memory="600KiB", placement="cost")
    streamer = streamer_of(model)
    with torch.no_grad(), pytest.raises(IndexError):
        model(torch.full((1, 3), 10_000))  # token ids past the vocabulary
    assert streamer._on_calibrated is not None and not list(tmp_path.glob("calibration/*.json"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert streamer._on_calibrated is None and list(tmp_path.glob("calibration/*.json"))
    streamer.close()


def test_a_chosen_keep_gpu_over_a_given_budget_is_refused(tmp_path):
    from lazystream.errors import DeviceMemoryError

    path = build_qwen3(tmp_path, max_shard_size="60KB")
    with pytest.raises(DeviceMemoryError, match=r"keep_gpu=4 needs 0.7 MiB of device memory, over "
                                                r"max_gpu_memory=0.5 MiB; keep_gpu=\d fits, or pass keep_gpu='auto'"):
        LazyStreamModel.from_pretrained(path, 4, max_gpu_memory=2**19)
    model = LazyStreamModel.from_pretrained(path, 0, max_gpu_memory=2**30)
    streamer_of(model).close()


def test_auto_takes_every_block_that_fits_when_blocks_differ_in_size(tmp_path):
    """Flux's double blocks are larger than its single blocks: "spread" keeps some small
    ones where "first" keeps the large ones first, so it fits more blocks than "first"
    would; auto takes as many as fit the placement, not as many as "first" would allow."""
    from diffusers import FluxTransformer2DModel

    from lazystream.synthetic import fill_random_weights

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=3, num_single_layers=5,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    fill_random_weights(model, torch.float32, seed=0)
    model.save_pretrained(tmp_path, max_shard_size="40KB")

    def plan(keep, placement="spread"):
        return streamer_of(LazyStreamModel.from_pretrained(tmp_path, keep, placement=placement, prefetch=1,
                                                           load=False)).plan

    budget = plan(2).device_bytes + 1024
    assert plan(2, "first").device_bytes > budget  # "first" fits only one block resident
    auto = streamer_of(LazyStreamModel.from_pretrained(tmp_path, "auto", max_gpu_memory=budget, activation_reserve=0,
                                                       prefetch=1, load=False)).plan
    assert auto.keep_gpu == 2 and auto.device_bytes <= budget < plan(3).device_bytes


# -- the plan resolves the dtype as the load does ------------------------------------------


def _plan_summary(plan: dict) -> dict:
    """What a plan says about bytes and dtypes (not the timing, which depends on probes)."""
    return {k: v for k, v in plan.items() if k not in ("prediction", "budget", "model_class", "host_staging_bytes",
                                                        "moe")}


def _tensor_dtypes(plan) -> dict:
    return {t.name: t.dtype for b in plan.blocks for t in b.tensors}


def _plan_and_load(capsys, path, cli_args: list[str], **load_kwargs):
    """The plan `lazystream plan` prints and the one a load makes (each with the target
    dtype of every block tensor, under the key "tensor_dtypes")."""
    from lazystream import plan_report

    printed = []
    original = plan_report._print
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan_report, "_print", lambda args, plan, *a, **k: printed.append(plan) or original(
            args, plan, *a, **k))
        assert cli_main(["plan", str(path), "--keep-gpu", "1", "--device", "cpu", "--json", *cli_args]) == 0
    planned = {**_plan_summary(json.loads(capsys.readouterr().out)), "tensor_dtypes": _tensor_dtypes(printed[0])}
    model = LazyStreamModel.from_pretrained(path, 1, device="cpu", **load_kwargs)
    plan = streamer_of(model).plan
    loaded = {**_plan_summary(plan.summary()), "tensor_dtypes": _tensor_dtypes(plan)}
    streamer_of(model).close()
    return planned, loaded


@pytest.fixture(scope="module")
def qwen3_index_dtype(tmp_path_factory):
    """float32 weights, no dtype in the config, "bfloat16" in the index's metadata: transformers'
    "auto" takes the index's (the checkpoint's float32 is not what it loads)."""
    path = build_qwen3(tmp_path_factory.mktemp("qwen3-index-dtype") / "q", {"num_hidden_layers": 3},
                       max_shard_size="60KB")
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["metadata"]["dtype"] = "bfloat16"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("cli_args, load_kwargs", [([], {}), (["--dtype", "auto"], {"dtype": "auto"}),
                                                   (["--dtype", "float16"], {"dtype": "float16"})],
                         ids=["default", "auto", "string"])
def test_plan_resolves_the_dtype_as_the_load(qwen3_index_dtype, capsys, cli_args, load_kwargs):
    planned, loaded = _plan_and_load(capsys, qwen3_index_dtype, cli_args, **load_kwargs)
    assert planned == loaded
    if not cli_args or cli_args[1] == "auto":  # negative control: the stored float32 would plan more device bytes
        assert planned["dtype"] == "bfloat16"
        stored, _ = _plan_and_load(capsys, qwen3_index_dtype, ["--dtype", "float32"], dtype=torch.float32)
        assert stored["device_bytes"] > planned["device_bytes"]


def test_plan_of_a_config_dtype_checkpoint_is_the_loads(tmp_path, capsys):
    path = build_qwen3(tmp_path / "q", {"num_hidden_layers": 3}, dtype=torch.bfloat16, max_shard_size="60KB")
    planned, loaded = _plan_and_load(capsys, path, [])
    assert planned == loaded and planned["dtype"] == "bfloat16"


def test_plan_keeps_the_librarys_fp32_modules(tmp_path, capsys):
    """T5 keeps its wo projections in float32 at float16: the plan's bytes are the load's."""
    from transformers import T5Config, T5ForConditionalGeneration, T5PreTrainedModel

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5", max_shard_size="20KB")
    planned, loaded = _plan_and_load(capsys, tmp_path / "t5", ["--dtype", "float16"], dtype=torch.float16)
    assert planned == loaded
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert planned["tensor_dtypes"][wo] == torch.float32
    # Negative control: without the class's rule the plan would cast wo to float16.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T5PreTrainedModel, "_keep_in_fp32_modules", None)  # its T5Stack parts are models too
        without, _ = _plan_and_load(capsys, tmp_path / "t5", ["--dtype", "float16"], dtype=torch.float16)
    assert without["tensor_dtypes"][wo] == torch.float16


def test_plan_refuses_dtype_auto_for_a_diffusers_model(tmp_path, capsys):
    from lazystream.synthetic import build_zimage

    path = build_zimage(tmp_path / "z")
    with pytest.raises(SystemExit) as exit_status:
        cli_main(["plan", str(path), "--keep-gpu", "1", "--device", "cpu", "--dtype", "auto"])
    assert exit_status.value.code == 2
    assert "argument --dtype: auto is transformers' rule" in capsys.readouterr().err
    assert cli_main(["plan", str(path), "--keep-gpu", "1", "--device", "cpu", "--dtype", "bfloat16", "--json"]) == 0
    planned = _plan_summary(json.loads(capsys.readouterr().out))
    model = LazyStreamModel.from_pretrained(path, 1, device="cpu", dtype=torch.bfloat16)
    assert planned == _plan_summary(streamer_of(model).plan.summary()) and planned["dtype"] == "bfloat16"
    streamer_of(model).close()


@pytest.mark.parametrize("cli_args", [[], ["--dtype", "auto"], ["--dtype", "float16"]], ids=["default", "auto", "string"])
def test_plan_of_a_hub_repo_resolves_the_dtype_as_the_load(qwen3_index_dtype, capsys, monkeypatch, tmp_path,
                                                            cli_args):
    """From headers alone (the index's metadata dtype included), the hub plan's dtype and
    per-block bytes are the local plan's, which are the load's."""
    _as_hub_repo(monkeypatch, qwen3_index_dtype, tmp_path)
    assert cli_main(["plan", "someone/qwen3-index-dtype", "--keep-gpu", "1", "--device", "cpu", "--json",
                     *cli_args]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert cli_main(["plan", str(qwen3_index_dtype), "--keep-gpu", "1", "--device", "cpu", "--json", *cli_args]) == 0
    local = json.loads(capsys.readouterr().out)
    assert remote["dtype"] == local["dtype"] == ("float16" if cli_args[1:] == ["float16"] else "bfloat16")
    assert remote["blocks"] == local["blocks"] and remote["scratch_bytes"] == local["scratch_bytes"]
