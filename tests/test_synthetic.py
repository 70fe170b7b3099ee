"""Synthetic checkpoints: tiny Qwen3 / Z-Image builds, byte-identical rebuilds, decoder blocks
straddling shard files, ``from_pretrained`` round trips and finite forwards."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors import safe_open
from transformers import Qwen3ForCausalLM

from lazystream.synthetic import SIZES, build_qwen3, build_zimage, qwen3_config, zimage_config, zimage_inputs

INDEX = {"qwen3": "model.safetensors.index.json", "zimage": "diffusion_pytorch_model.safetensors.index.json"}
BLOCK = {
    "qwen3": re.compile(r"^model\.layers\.\d+\."),
    "zimage": re.compile(r"^(?:layers|noise_refiner|context_refiner)\.\d+\."),
}
BUILD: dict[str, Callable[..., Path]] = {"qwen3": build_qwen3, "zimage": build_zimage}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.fixture(scope="module", params=["qwen3", "zimage"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    family = request.param
    return family, BUILD[family](tmp_path_factory.mktemp(family))


def test_tiny_folder_layout(tiny: tuple[str, Path]) -> None:
    family, folder = tiny
    weight_map = json.loads((folder / INDEX[family]).read_text())["weight_map"]
    shards = sorted(folder.glob("*.safetensors"))
    assert (folder / "config.json").is_file()
    assert len(shards) > 1
    assert set(weight_map.values()) == {shard.name for shard in shards}
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            assert {name for name, file in weight_map.items() if file == shard.name} == set(handle.keys())
    assert sum(shard.stat().st_size for shard in shards) < 4_000_000


def test_a_block_straddles_shard_files(tiny: tuple[str, Path]) -> None:
    family, folder = tiny
    files_per_block: dict[str, set[str]] = {}
    for name, file in json.loads((folder / INDEX[family]).read_text())["weight_map"].items():
        if match := BLOCK[family].match(name):
            files_per_block.setdefault(match.group(0), set()).add(file)
    assert files_per_block
    assert any(len(files) > 1 for files in files_per_block.values())


def test_same_seed_same_bytes(tiny: tuple[str, Path], tmp_path: Path) -> None:
    family, folder = tiny
    again = BUILD[family](tmp_path / "again")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    other = BUILD[family](tmp_path / "other", seed=1)
    shards = sorted(folder.glob("*.safetensors"))
    assert all(shard.read_bytes() != (other / shard.name).read_bytes() for shard in shards)


def is_norm_weight(name: str) -> bool:
    """Whether a tensor is the weight of a norm module (Z-Image's caption RMSNorm is ``cap_embedder.0``)."""
    return "norm" in name or name == "cap_embedder.0.weight"


def test_weight_statistics(tiny: tuple[str, Path]) -> None:
    _, folder = tiny
    tensors = read_tensors(folder)
    norms = torch.cat([t.flatten() for name, t in tensors.items() if is_norm_weight(name)])
    others = torch.cat([t.flatten() for name, t in tensors.items() if not is_norm_weight(name)])
    assert norms.mean().item() == pytest.approx(1.0, abs=0.01)
    assert others.mean().item() == pytest.approx(0.0, abs=0.001)
    assert norms.std().item() == pytest.approx(0.02, rel=0.1)
    assert others.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_round_trip_and_forward(tmp_path: Path, tied: bool) -> None:
    folder = build_qwen3(tmp_path, tie_word_embeddings=tied)
    saved = read_tensors(folder)
    model, info = Qwen3ForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    state = model.state_dict()
    assert set(saved) == set(state) - ({"lm_head.weight"} if tied else set())
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert ("lm_head.weight" in saved) != tied
    config = qwen3_config()
    input_ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (2, 11, config.vocab_size)
    assert torch.isfinite(logits).all()


def test_zimage_round_trip_and_forward(tmp_path: Path) -> None:
    folder = build_zimage(tmp_path)
    saved = read_tensors(folder)
    model, info = ZImageTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    x, t, cap_feats = zimage_inputs(zimage_config())
    with torch.no_grad():
        out = model(x, t, cap_feats).sample
    assert [o.shape for o in out] == [xi.shape for xi in x]
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("family", ["qwen3", "zimage"])
def test_bfloat16_build(tmp_path: Path, family: str) -> None:
    lines: list[str] = []
    folder = BUILD[family](tmp_path, dtype=torch.bfloat16, progress=lines.append)
    assert {t.dtype for t in read_tensors(folder).values()} == {torch.bfloat16}
    assert len(lines) == 3 and str(folder) in lines[-1]
    if family == "qwen3":
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_zimage_inputs_fit_the_config() -> None:
    x, t, cap_feats = zimage_inputs(zimage_config(), sizes=((64, 64),), cap_lens=(32,))
    assert (x[0].shape, t.shape, cap_feats[0].shape) == ((4, 1, 64, 64), (1,), (32, 32))
    with pytest.raises(ValueError, match="axes_lens"):
        zimage_inputs(zimage_config(), sizes=((66, 64),), cap_lens=(32,))
    with pytest.raises(ValueError, match="axes_lens"):
        zimage_inputs(zimage_config(), sizes=((64, 64),), cap_lens=(33,))


def test_rebuild_replaces_old_weight_files(tmp_path: Path) -> None:
    build_qwen3(tmp_path)
    build_qwen3(tmp_path, max_shard_size="10MB")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]


def test_size_overrides_merge_onto_tiny() -> None:
    config = qwen3_config({"num_hidden_layers": 2})
    assert (config.num_hidden_layers, config.hidden_size) == (2, SIZES["qwen3"]["tiny"]["hidden_size"])
    assert zimage_config({"n_layers": 1}) == {**SIZES["zimage"]["tiny"], "n_layers": 1}
    zimage_config()["axes_dims"].append(0)
    assert SIZES["zimage"]["tiny"]["axes_dims"] == [8, 12, 12]
    with pytest.raises(ValueError, match="huge"):
        qwen3_config("huge")
    for presets in SIZES.values():
        assert set(presets) == {"tiny", "medium", "real"}
        assert all(preset.keys() == presets["tiny"].keys() for preset in presets.values())


@pytest.mark.parametrize(
    ("family", "size", "params", "rel"),
    [
        pytest.param("qwen3", "medium", 1.5e9 / 4, 0.05, id="qwen3-medium-1.5GB-fp32"),
        pytest.param("qwen3", "real", 8.19e9, 0.01, id="qwen3-8B"),
        pytest.param("zimage", "medium", 1.5e9 / 4, 0.05, id="zimage-medium-1.5GB-fp32"),
        pytest.param("zimage", "real", 6.15e9, 0.01, id="zimage-turbo"),
    ],
)
def test_preset_parameter_counts(family: str, size: str, params: float, rel: float) -> None:
    """Counted on the meta device: nothing is allocated, the large presets are never built here."""
    model: torch.nn.Module
    with torch.device("meta"):
        if family == "qwen3":
            model = Qwen3ForCausalLM(qwen3_config(size))
        else:
            model = ZImageTransformer2DModel(**zimage_config(size))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=rel)
