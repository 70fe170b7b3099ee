"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest

ASYNC = os.environ.get("LAZYSTREAM_TEST_DEVICE") == "async"


def cpu_device_class() -> type:
    """The device class lazystream uses for the CPU in this run (HostDevice, or AsyncDevice
    under ``LAZYSTREAM_TEST_DEVICE=async``): tests that patch it patch this one."""
    import torch

    from lazystream.devices import device_ops

    return type(device_ops(torch.device("cpu")))


@pytest.fixture(autouse=True)
def no_ordering_hazards():
    """On the async device (``LAZYSTREAM_TEST_DEVICE=async``), fail a test during which any
    write landed in bytes that compute was still reading (see lazystream/async_device.py)."""
    if not ASYNC:
        yield
        return
    from lazystream import async_device

    async_device.HAZARDS.clear()
    yield
    async_device.settle_all()
    found, async_device.HAZARDS[:] = list(async_device.HAZARDS), []
    assert not found, "ordering hazards on the async device:\n" + "\n".join(found[:10])


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test with ``HF_HUB_OFFLINE=1``, as a user without network sets it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def lazystream_cache(tmp_path_factory: pytest.TempPathFactory):
    """Probe results and calibrations go to a temporary folder, not the user's cache."""
    import os

    previous = os.environ.get("LAZYSTREAM_CACHE")
    os.environ["LAZYSTREAM_CACHE"] = str(tmp_path_factory.mktemp("lazystream-cache"))
    yield
    if previous is None:
        del os.environ["LAZYSTREAM_CACHE"]
    else:
        os.environ["LAZYSTREAM_CACHE"] = previous


def qwen3_with_logits(folder, seq_len: int, seed: int):
    """A tiny sharded Qwen3 checkpoint in ``folder``, input ids of shape (2, seq_len), and
    the logits the library's own loader gives for them."""
    import torch
    from transformers import Qwen3ForCausalLM

    from lazystream.synthetic import build_qwen3

    path = build_qwen3(folder, max_shard_size="60KB")
    ids = torch.randint(0, 256, (2, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = Qwen3ForCausalLM.from_pretrained(path).eval()(ids).logits
    return path, ids, logits


def keeps_holes(folder) -> bool:
    """Whether files in ``folder`` stay sparse: a header-only checkpoint of real size then
    takes no disk space."""
    probe = folder / "sparse-probe"
    with open(probe, "wb") as f:
        f.truncate(2**24)
    sparse = probe.stat().st_blocks * 512 < 2**20
    probe.unlink()
    return sparse


def write_odd_checkpoint(folder, sizes: list[list[int]], seed: int):
    """Shards of uint8 tensors of ``sizes`` (one list per shard), chosen to put most offsets
    off any alignment, with their index; returns ``folder``."""
    import json

    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(sizes):
        name = f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors"
        tensors = {f"t{i}_{j}": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
                   for j, n in enumerate(shard)}
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder
