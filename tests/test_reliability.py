"""Bad checkpoints, faults in the middle of a call, and resource hygiene.
Each case here has a row in RELIABILITY.md."""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path

import pytest
from conftest import qwen3_with_logits
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from lazystream import LazyStreamModel, attach, streamer_of
from lazystream.devices import HostDevice
from lazystream.errors import (
    BlocksNotFoundError,
    CheckpointNotFoundError,
    ClosedError,
    DeviceMemoryError,
    HeaderNotJSONError,
    MissingTensorsError,
    OtherOffloaderError,
    ShapeMismatchError,
    ShardChangedError,
    UnknownModelClassError,
)
from lazystream.io import Ticket
from lazystream.synthetic import build_qwen3, build_zimage
from lazystream.weights import CheckpointWeight


@pytest.fixture(scope="module")
def ref_qwen3(tmp_path_factory):
    return qwen3_with_logits(tmp_path_factory.mktemp("ref"), 9, seed=5)


@pytest.fixture
def qwen3(tmp_path):
    """A fresh copy each test may damage."""
    return build_qwen3(tmp_path / "q", max_shard_size="60KB")


@pytest.fixture
def device_allocations(monkeypatch):
    """Counts every device buffer lazystream allocates (CPU device)."""
    sizes: list[int] = []
    original = HostDevice.empty

    def counting(self, nbytes):
        sizes.append(nbytes)
        return original(self, nbytes)

    monkeypatch.setattr(HostDevice, "empty", counting)
    return sizes


def shard_holding(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


_earlier_io_threads: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _ignore_earlier_io_threads():
    """The checks below are of the models each test makes: a reader thread still alive from
    an earlier test file's model (one the garbage collector has not reached yet) is not
    theirs."""
    gc.collect()
    _earlier_io_threads.clear()
    _earlier_io_threads.update(t for t in threading.enumerate() if t.name == "lazystream-io")
    yield


def io_threads() -> list[threading.Thread]:
    """The lazystream reader threads started during this test and still alive."""
    return [t for t in threading.enumerate() if t.name == "lazystream-io" and t not in _earlier_io_threads]


def mapped(folder: Path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if str(folder) in line]


# -- 1. bad checkpoints, refused before any device memory is taken ---------------------


def test_bad_header_is_refused_before_device_memory(qwen3, device_allocations):
    shard = shard_holding(qwen3, "model.layers.2.mlp.up_proj.weight")
    raw = bytearray(shard.read_bytes())
    raw[8:9] = b"]"  # the header's opening brace
    shard.write_bytes(bytes(raw))
    with pytest.raises(HeaderNotJSONError, match="expected a UTF-8 JSON header") as err:
        LazyStreamModel.from_pretrained(qwen3, 1)
    assert err.value.path == str(shard)
    assert device_allocations == []


def test_unknown_model_class(qwen3, device_allocations):
    config = json.loads((qwen3 / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (qwen3 / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModelClassError, match="model class 'NoSuchModelForCausalLM', which neither "
                                                     "transformers nor diffusers"):
        LazyStreamModel.from_pretrained(qwen3, 1)
    assert device_allocations == []


def test_missing_tensors_are_listed(qwen3, device_allocations):
    gone = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    for name in gone:
        rewrite_shard(shard_holding(qwen3, name), lambda t, n=name: t.pop(n))
    index_path = qwen3 / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in gone:
        del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(MissingTensorsError, match=r"2 tensor\(s\) of Qwen3ForCausalLM are in no shard") as err:
        LazyStreamModel.from_pretrained(qwen3, 1)
    assert all(name in str(err.value) for name in gone)
    assert device_allocations == []


def test_shape_mismatch_names_both_shapes(qwen3, device_allocations):
    config = json.loads((qwen3 / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights were saved with 128
    (qwen3 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match=r"has shape \[128, 64\], but the model's Qwen3ForCausalLM "
                                                  r"expects \[96, 64\]") as err:
        LazyStreamModel.from_pretrained(qwen3, 1)
    assert err.value.tensor.endswith("mlp.gate_proj.weight") or err.value.tensor.endswith("mlp.up_proj.weight")
    assert device_allocations == []


def test_extra_tensors_warn_once_with_their_names(qwen3, ref_qwen3):
    shard = shard_holding(qwen3, "model.norm.weight")
    rewrite_shard(shard, lambda t: t.update({"extra.a": torch.ones(3), "extra.b": torch.zeros(2)}))
    index_path = qwen3 / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({"extra.a": shard.name, "extra.b": shard.name})
    index_path.write_text(json.dumps(index))
    with pytest.warns(UserWarning, match=r"2 checkpoint tensor\(s\) are not used by Qwen3ForCausalLM: \['extra.a', 'extra.b'\]"):
        model = LazyStreamModel.from_pretrained(qwen3, 1)
    with torch.no_grad():
        assert torch.equal(model(ref_qwen3[1]).logits, ref_qwen3[2])
    streamer_of(model).close()


def test_blocks_path_that_is_not_a_module_list(qwen3, device_allocations):
    with pytest.raises(BlocksNotFoundError, match=r"blocks='model.norm' is a Qwen3RMSNorm, expected a module list"):
        LazyStreamModel.from_pretrained(qwen3, 1, blocks="model.norm")
    with pytest.raises(BlocksNotFoundError, match=r"blocks='model.layerz' names no module of Qwen3ForCausalLM; "
                                                  r"its module lists are \['model.layers'\]"):
        LazyStreamModel.from_pretrained(qwen3, 1, blocks="model.layerz")
    assert device_allocations == []


def test_no_config(qwen3):
    (qwen3 / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="has no config.json"):
        LazyStreamModel.from_pretrained(qwen3, 1)


# -- 2. faults in the middle of a call ------------------------------------------------


def test_exception_inside_a_streamed_block_leaves_the_model_usable(ref_qwen3):
    path, ids, want = ref_qwen3
    model = LazyStreamModel.from_pretrained(path, 1, placement="first")
    streamer = streamer_of(model)
    block = model.model.layers[2]

    def broken(*args, **kwargs):
        raise ValueError("boom inside the block")

    block.forward = broken
    with torch.no_grad(), pytest.raises(ValueError, match="boom inside the block"):
        model(ids)
    del block.forward
    assert streamer._bound == {} and all(s.users == 0 for s in streamer._slots)
    assert all(isinstance(p, CheckpointWeight) for p in block.parameters())
    assert streamer._depth == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    # The lock was released: another thread can call too.
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("logits", model(ids).logits.detach()))
    thread.start()
    thread.join(timeout=60)
    assert torch.equal(out["logits"], want)
    streamer.close()


def test_keyboard_interrupt_while_waiting_for_a_block(ref_qwen3, monkeypatch):
    path, ids, want = ref_qwen3
    model = LazyStreamModel.from_pretrained(path, 0)
    original, hits = Ticket.wait, []

    def interrupted(self):
        if not hits:
            hits.append(1)
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Ticket, "wait", interrupted)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(ids)
    monkeypatch.setattr(Ticket, "wait", original)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    streamer_of(model).close()
    assert io_threads() == []


def test_two_threads_get_their_own_correct_outputs(ref_qwen3):
    path, ids, want = ref_qwen3
    other = ids.flip(0)
    with torch.no_grad():
        want_other = Qwen3ForCausalLM.from_pretrained(path).eval()(other).logits
    model = LazyStreamModel.from_pretrained(path, 1, prefetch=1)
    results: list[bool] = []

    def caller(x, expected):
        with torch.no_grad():
            for _ in range(5):
                results.append(torch.equal(model(x).logits, expected))

    threads = [threading.Thread(target=caller, args=a) for a in ((ids, want), (other, want_other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [True] * 10
    streamer_of(model).close()


# -- 3. resources -------------------------------------------------------------------


def test_close_releases_threads_maps_and_memory(ref_qwen3):
    path, ids, _ = ref_qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    with torch.no_grad():
        model(ids)
    streamer = streamer_of(model)
    assert io_threads() and mapped(path)
    streamer.close()
    assert io_threads() == []
    assert mapped(path) == []
    stats = streamer.stats()
    assert stats.device_bytes == 0 and stats.staging_bytes == 0
    with pytest.raises(ClosedError, match="was closed"):
        model(ids)


def test_garbage_collection_releases_everything(ref_qwen3):
    path, ids, _ = ref_qwen3
    model = LazyStreamModel.from_pretrained(path, 1)
    with torch.no_grad():
        model(ids)
    del model
    gc.collect()
    assert io_threads() == []
    assert mapped(path) == []


def test_no_descriptor_or_mapping_leak_over_100_cycles(ref_qwen3):
    path, ids, _ = ref_qwen3

    def cycle():
        model = LazyStreamModel.from_pretrained(path, 1)
        with torch.no_grad():
            model(ids)
        streamer_of(model).close()

    cycle()
    fds, maps = len(os.listdir("/proc/self/fd")), len(mapped(path))
    for _ in range(100):
        cycle()
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert len(mapped(path)) == maps == 0
    assert io_threads() == []


# -- 4. out of device memory ------------------------------------------------------------


def test_out_of_device_memory_gives_the_plan_and_a_keep_gpu_that_fits(ref_qwen3, monkeypatch):
    path = ref_qwen3[0]
    probe = LazyStreamModel.from_pretrained(path, 4, prefetch=1)
    full = streamer_of(probe).plan
    streamer_of(probe).close()
    budget = full.estimate_device_bytes(2)
    allocated: list[int] = []
    original = HostDevice.empty

    def limited(self, nbytes):
        if sum(allocated) + nbytes > budget:
            raise torch.OutOfMemoryError("simulated")
        allocated.append(nbytes)
        return original(self, nbytes)

    monkeypatch.setattr(HostDevice, "empty", limited)
    monkeypatch.setattr(HostDevice, "free_bytes", lambda self: budget)
    with pytest.raises(DeviceMemoryError, match=r"out of memory on cpu loading Qwen3ForCausalLM: the plan needs "
                                                r"[\d.]+ MiB \(resident [\d.]+, buffers [\d.]+, 0 slot\(s\) x 0.0, "
                                                r"cast scratch 0.0\) with keep_gpu=4; [\d.]+ MiB are free; "
                                                r"keep_gpu=2 would fit \(with prefetch=1\)") as err:
        LazyStreamModel.from_pretrained(path, 4, prefetch=1)
    assert isinstance(err.value, MemoryError)
    assert io_threads() == []
    allocated.clear()
    model = LazyStreamModel.from_pretrained(path, 2, prefetch=1)  # the suggestion does fit
    assert streamer_of(model).plan.device_bytes <= budget
    streamer_of(model).close()


# -- 5. a shard changed on disk while loaded ---------------------------------------------


def test_shard_truncated_while_loaded(qwen3):
    ids = torch.randint(0, 256, (1, 5))
    model = LazyStreamModel.from_pretrained(qwen3, 0)
    shard = shard_holding(qwen3, "model.layers.3.mlp.down_proj.weight")
    os.truncate(shard, 100)
    with torch.no_grad(), pytest.raises(ShardChangedError, match=r"changed on disk after it was opened: it now has "
                                                                 r"100 bytes") as err:
        model(ids)
    assert err.value.path == str(shard)
    streamer = streamer_of(model)
    assert streamer._bound == {} and streamer._depth == 0
    streamer.close()


# -- 6. other offloaders --------------------------------------------------------------


def test_diffusers_hooks_are_refused(tmp_path):
    from diffusers import ZImageTransformer2DModel
    from diffusers.hooks import HookRegistry, ModelHook

    path = build_zimage(tmp_path, max_shard_size="60KB")
    model = ZImageTransformer2DModel.from_pretrained(path)
    HookRegistry.check_if_exists_or_initialize(model.layers[1]).register_hook(ModelHook(), "someone-elses")
    with pytest.raises(OtherOffloaderError, match="module 'layers.1' already carries diffusers offloading hooks"):
        attach(model, path, 1)


def test_keyboard_interrupt_inside_a_block_releases_lock_and_slots(ref_qwen3):
    """torch skips always_call hooks for a BaseException; the root wrapper cleans up."""
    path, ids, want = ref_qwen3
    model = LazyStreamModel.from_pretrained(path, 1, placement="first", prefetch=2)
    streamer = streamer_of(model)
    block = model.model.layers[2]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for _ in range(3):  # more interrupts than slots: none may leak
        block.forward = interrupted
        with torch.no_grad(), pytest.raises(KeyboardInterrupt):
            model(ids)
        del block.forward
        assert streamer._bound == {} and streamer._depth == 0
        assert all(s.users == 0 for s in streamer._slots)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("logits", model(ids).logits.detach()))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and torch.equal(out["logits"], want)
    streamer.close()


def test_submodule_called_directly_from_two_threads(ref_qwen3):
    """Calling model.model (which holds the blocks) bypasses the root wrapper; each streamed
    block then takes the lock itself, so weights never mix."""
    path, ids, _ = ref_qwen3
    ref = Qwen3ForCausalLM.from_pretrained(path).eval()
    inputs = [ids, ids.flip(0), ids[:, :5]]
    with torch.no_grad():
        wants = [ref.model(x).last_hidden_state for x in inputs]
    model = LazyStreamModel.from_pretrained(path, 1, prefetch=1)
    results: list[bool] = []

    def caller(x, want):
        with torch.no_grad():
            for _ in range(4):
                results.append(torch.equal(model.model(x).last_hidden_state, want))

    threads = [threading.Thread(target=caller, args=a) for a in zip(inputs, wants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [True] * 12
    assert streamer_of(model)._depth == 0
    streamer_of(model).close()
