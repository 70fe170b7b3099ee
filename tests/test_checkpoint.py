"""Checkpoint: finding the weight files (folders, variants, the Hugging Face cache),
validating every safetensors header, reading tensors, and refusing shards that changed
after they were mapped. Every error test asserts the type, ``.path``, ``.tensor`` and the
parts of the message that say what was expected and what was found."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lazystream import Checkpoint
from lazystream.checkpoint import CopyRun, coalesce
from lazystream.errors import (
    CheckpointNotFoundError,
    ClosedError,
    HeaderNotJSONError,
    HeaderTooLargeError,
    IndexMismatchError,
    InvalidIndexError,
    InvalidOffsetsError,
    InvalidShapeError,
    LazyStreamError,
    MissingShardError,
    OffsetOutOfRangeError,
    OverlappingTensorsError,
    ShardChangedError,
    TensorSizeMismatchError,
    TruncatedShardError,
    UnknownDtypeError,
    UnsupportedFormatError,
)
from lazystream.header import DTYPES, MAX_HEADER_BYTES, read_header

# -- helpers ----------------------------------------------------------------------------


def write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    """Write a safetensors file byte by byte: u64 little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    """One tensor's header entry; tuples become JSON lists, anything else is written as given."""
    def as_json(value: object) -> object:
        return list(value) if isinstance(value, tuple) else value

    return {"dtype": as_json(dtype), "shape": as_json(shape), "data_offsets": as_json(offsets)}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random, NaN-free values of any dtype in DTYPES."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_same_tensor(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if actual.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no equality kernel on CPU: compare bytes
        assert torch.equal(as_bytes(actual), as_bytes(expected))
    else:
        assert torch.equal(actual, expected)


def small_tensors(seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        f"{prefix}weight": random_tensor(torch.float32, (4, 3), seed),
        f"{prefix}bias": random_tensor(torch.float32, (3,), seed + 1),
        f"{prefix}steps": random_tensor(torch.int64, (2,), seed + 2),
    }


def write_sharded(folder: Path, shards: list[dict[str, torch.Tensor]], *, stem: str = "model",
                  variant: str | None = None) -> dict[str, torch.Tensor]:
    """Write shards and index as transformers and diffusers name them; return all tensors."""
    v = f".{variant}" if variant else ""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, everything = {}, {}
    for i, tensors in enumerate(shards, 1):
        name = f"{stem}{v}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        everything.update(tensors)
    total = sum(t.numel() * t.element_size() for t in everything.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index{v}.json").write_text(json.dumps(index))
    return everything


def assert_checkpoint_holds(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert set(ckpt) == set(tensors)
    for name, expected in tensors.items():
        assert_same_tensor(ckpt.tensor(name), expected)


def error_from(call, *args, **kwargs) -> LazyStreamError:
    with pytest.raises(LazyStreamError) as info:
        call(*args, **kwargs)
    return info.value


# -- 1. dtypes, read_into and coalescing --------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_every_dtype_reads_as_safe_open_reads_it(tmp_path, dtype_name):
    dtype = DTYPES[dtype_name]
    tensors = {
        "matrix": random_tensor(dtype, (5, 3)),
        "empty": random_tensor(dtype, (0, 4)),
        "scalar": random_tensor(dtype, (), seed=1),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)

    with Checkpoint.open(tmp_path) as ckpt, safe_open(path, framework="pt") as reference:
        assert set(ckpt) == set(reference.keys())
        for name in tensors:
            assert ckpt[name].dtype == dtype
            assert_same_tensor(ckpt.tensor(name), reference.get_tensor(name))
        assert ckpt.tensor("scalar").shape == ()
        assert ckpt.tensor("empty").shape == (0, 4)


@pytest.fixture
def every_dtype_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {name.lower(): random_tensor(dtype, (3, 2), seed=i) for i, (name, dtype) in enumerate(DTYPES.items())}
    tensors["empty"] = random_tensor(torch.float32, (0,))
    tensors["scalar"] = random_tensor(torch.float64, ())
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


def test_read_into_packs_every_record_into_one_buffer(every_dtype_file):
    folder, tensors = every_dtype_file
    order = sorted(tensors, reverse=True)  # not file order, so the runs cannot all merge
    with Checkpoint.open(folder) as ckpt:
        items, dest_offset = [], 0
        for name in order:
            items.append((ckpt[name], dest_offset))
            dest_offset += ckpt[name].nbytes
        dest = torch.full((dest_offset,), 0xAA, dtype=torch.uint8)

        copied = ckpt.read_into(items, dest)

    assert copied == dest_offset == sum(as_bytes(t).numel() for t in tensors.values())
    assert torch.equal(dest, torch.cat([as_bytes(tensors[name]) for name in order]))


def test_read_into_in_file_order_is_one_copy(every_dtype_file):
    folder, tensors = every_dtype_file
    with Checkpoint.open(folder) as ckpt:
        records = sorted(ckpt.values(), key=lambda r: r.offset)
        items, dest_offset = [], 0
        for rec in records:
            items.append((rec, dest_offset))
            dest_offset += rec.nbytes
        assert len(coalesce(items)) == 1
        dest = torch.empty(dest_offset, dtype=torch.uint8)
        assert ckpt.read_into(items, dest) == dest_offset
    assert torch.equal(dest, torch.cat([as_bytes(tensors[r.name]) for r in records]))


@pytest.fixture
def three_adjacent_records(tmp_path):
    """Records a, b, c of 8 bytes each, back to back in the data section."""
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(8, 16)), "c": entry(offsets=(16, 24))}
    path = write_raw(tmp_path / "model.safetensors", header, bytes(range(24)))
    h = read_header(path)
    a, b, c = sorted(h.records, key=lambda r: r.name)
    return path, h.data_start, a, b, c


def test_coalesce_merges_records_adjacent_in_file_and_destination(three_adjacent_records):
    path, start, a, b, c = three_adjacent_records
    # Given out of order: coalesce sorts by file position first.
    assert coalesce([(c, 116), (a, 100), (b, 108)]) == [CopyRun(path, start, 100, 24)]


@pytest.mark.parametrize(
    "dest_offsets, expected_runs",
    [
        pytest.param((0, 8, 40), [(0, 0, 16), (16, 40, 8)], id="gap-before-c"),
        pytest.param((0, 16, 24), [(0, 0, 8), (8, 16, 16)], id="gap-after-a"),
        pytest.param((16, 8, 0), [(0, 16, 8), (8, 8, 8), (16, 0, 8)], id="reversed-in-destination"),
    ],
)
def test_coalesce_splits_where_the_destination_is_not_adjacent(three_adjacent_records, dest_offsets, expected_runs):
    path, start, a, b, c = three_adjacent_records
    runs = coalesce(zip((a, b, c), dest_offsets))
    assert runs == [CopyRun(path, start + off, dest, n) for off, dest, n in expected_runs]


def test_coalesce_skips_zero_size_records_and_keeps_files_apart(tmp_path):
    first = write_raw(tmp_path / "first.safetensors", {"x": entry(offsets=(0, 8)), "e": entry(shape=(0,), offsets=(8, 8))},
                      bytes(8))
    second = write_raw(tmp_path / "second.safetensors", {"y": entry(offsets=(0, 8))}, bytes(8))
    x, e = sorted(read_header(first).records, key=lambda r: r.name, reverse=True)
    (y,) = read_header(second).records
    # x and y share no file, so even adjacent destinations make two copies.
    assert coalesce([(x, 0), (e, 8), (y, 8)]) == [CopyRun(first, x.offset, 0, 8), CopyRun(second, y.offset, 8, 8)]


def test_read_into_leaves_gaps_in_the_destination_untouched(three_adjacent_records):
    path, _, a, b, c = three_adjacent_records
    with Checkpoint.open(path.parent) as ckpt:
        dest = torch.full((40,), 0xEE, dtype=torch.uint8)
        assert ckpt.read_into([(a, 0), (c, 32)], dest) == 16
    assert dest[:8].tolist() == list(range(0, 8))
    assert dest[8:32].eq(0xEE).all()
    assert dest[32:].tolist() == list(range(16, 24))


def test_read_into_refuses_a_destination_too_small_or_of_the_wrong_dtype(three_adjacent_records):
    path, _, a, b, c = three_adjacent_records
    with Checkpoint.open(path.parent) as ckpt:
        with pytest.raises(ValueError, match="dest holds 16 bytes; the records need 24"):
            ckpt.read_into([(a, 0), (b, 8), (c, 16)], torch.empty(16, dtype=torch.uint8))
        with pytest.raises(ValueError, match="dest must be a 1-D uint8 CPU tensor, found torch.float32"):
            ckpt.read_into([(a, 0)], torch.empty(8, dtype=torch.float32))


def test_read_into_refuses_a_negative_destination_offset(three_adjacent_records):
    """A negative offset must not count from the end of dest, as a Python slice would."""
    path, _, a, b, c = three_adjacent_records
    with Checkpoint.open(path.parent) as ckpt:
        dest = torch.zeros(16, dtype=torch.uint8)
        with pytest.raises(ValueError, match="-12"):
            ckpt.read_into([(a, -12)], dest)
    assert dest.eq(0).all(), f"bytes were written into dest[4:12]: {dest.tolist()}"


# -- 2. sharded, variant, single-file and subfolder layouts --------------------------------


@pytest.fixture(scope="module")
def tiny_qwen3():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


def assert_checkpoint_matches_state_dict(ckpt: Checkpoint, state_dict: dict[str, torch.Tensor]) -> None:
    # Tied weights are saved once: lm_head.weight is embed_tokens.weight and may be left out.
    dropped = set(state_dict) - set(ckpt)
    assert dropped <= {"lm_head.weight"}, dropped
    assert set(ckpt) <= set(state_dict)
    for name in ckpt:
        assert_same_tensor(ckpt.tensor(name), state_dict[name])


def test_transformers_sharded_checkpoint_matches_the_model(tmp_path, tiny_qwen3):
    tiny_qwen3.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()

    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.files.index == tmp_path / "model.safetensors.index.json"
        assert len(ckpt.shard_paths) >= 2
        assert ckpt.config["model_type"] == "qwen3"
        assert_checkpoint_matches_state_dict(ckpt, tiny_qwen3.state_dict())


def test_transformers_variant_checkpoint_is_chosen_by_variant(tmp_path, tiny_qwen3):
    tiny_qwen3.save_pretrained(tmp_path, max_shard_size="50KB")
    half = {k: v.half() for k, v in tiny_qwen3.state_dict().items()}
    # save_pretrained pops entries from the state_dict it is given: pass a copy.
    tiny_qwen3.save_pretrained(tmp_path, max_shard_size="20KB", variant="fp16", state_dict=dict(half))
    fp16_shards = sorted(p.name for p in tmp_path.glob("model.fp16-0000?-of-0000?.safetensors"))
    assert len(fp16_shards) >= 2

    with Checkpoint.open(tmp_path, variant="fp16") as ckpt:
        assert ckpt.files.index.name == "model.safetensors.index.fp16.json"
        assert sorted(p.name for p in ckpt.shard_paths) == fp16_shards
        assert_checkpoint_matches_state_dict(ckpt, half)
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.files.index.name == "model.safetensors.index.json"
        assert_checkpoint_matches_state_dict(ckpt, tiny_qwen3.state_dict())


@pytest.mark.parametrize("stem", ["model", "diffusion_pytorch_model"])
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoint_with_index(tmp_path, stem, variant):
    tensors = write_sharded(tmp_path, [small_tensors(0, "a."), small_tensors(10, "b."), small_tensors(20, "c.")],
                            stem=stem, variant=variant)
    v = f".{variant}" if variant else ""
    with Checkpoint.open(tmp_path, variant=variant) as ckpt:
        assert ckpt.files.index == tmp_path / f"{stem}.safetensors.index{v}.json"
        assert len(ckpt.shard_paths) == 3
        assert ckpt.config is None
        assert_checkpoint_holds(ckpt, tensors)


@pytest.mark.parametrize("file_name, variant", [
    ("model.safetensors", None),
    ("diffusion_pytorch_model.safetensors", None),
    ("model.fp16.safetensors", "fp16"),
    ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
    ("weights_from_another_tool.safetensors", None),
])
def test_single_file_checkpoint(tmp_path, file_name, variant):
    tensors = small_tensors()
    save_file(tensors, tmp_path / file_name)
    with Checkpoint.open(tmp_path, variant=variant) as ckpt:
        assert ckpt.files.single == tmp_path / file_name and ckpt.files.index is None
        assert_checkpoint_holds(ckpt, tensors)


def test_variant_and_default_files_side_by_side(tmp_path):
    default, half = small_tensors(0), {k: v.half() for k, v in small_tensors(5).items() if v.is_floating_point()}
    save_file(default, tmp_path / "model.safetensors")
    save_file(half, tmp_path / "model.fp16.safetensors")
    with Checkpoint.open(tmp_path) as ckpt:
        assert_checkpoint_holds(ckpt, default)
    with Checkpoint.open(tmp_path, variant="fp16") as ckpt:
        assert_checkpoint_holds(ckpt, half)


def test_subfolder_of_a_diffusers_pipeline(tmp_path):
    unet, vae = small_tensors(0), small_tensors(7)
    write_sharded(tmp_path / "unet", [unet], stem="diffusion_pytorch_model")
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "vae").mkdir()
    save_file(vae, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "model_index.json").write_text("{}")

    with Checkpoint.open(tmp_path, subfolder="unet") as ckpt:
        assert ckpt.folder == tmp_path / "unet"
        assert ckpt.config == {"_class_name": "UNet2DModel"}
        assert_checkpoint_holds(ckpt, unet)
    with Checkpoint.open(tmp_path, subfolder="vae") as ckpt:
        assert_checkpoint_holds(ckpt, vae)


# -- 3. resolution errors and the Hugging Face cache -----------------------------------------


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_folder_that_does_not_exist(tmp_path, monkeypatch, offline):
    # An absolute path can only be meant as a folder: no hub lookup, online or not.
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no" / "such" / "model"
    err = error_from(Checkpoint.open, missing)
    assert isinstance(err, CheckpointNotFoundError) and isinstance(err, FileNotFoundError)
    assert err.path == str(missing)
    assert str(missing) in str(err)
    assert str(err) == (f"no such folder: {missing}; expected a folder holding config.json and safetensors files, "
                        "or a Hugging Face repo id such as 'Qwen/Qwen3-8B'")


def test_missing_subfolder(tmp_path):
    save_file(small_tensors(), tmp_path / "model.safetensors")
    err = error_from(Checkpoint.open, tmp_path, subfolder="unet")
    assert isinstance(err, CheckpointNotFoundError)
    assert err.path == str(tmp_path / "unet")
    assert str(err) == f"{tmp_path} has no subfolder 'unet'"


def test_folder_with_only_pickle_weights(tmp_path):
    torch.save(small_tensors(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    err = error_from(Checkpoint.open, tmp_path)
    assert isinstance(err, UnsupportedFormatError) and isinstance(err, ValueError)
    assert err.path == str(tmp_path)
    message = str(err)
    assert "only PyTorch pickle weights (pytorch_model.bin)" in message
    assert "lazystream reads safetensors" in message
    assert "save_pretrained(dst, safe_serialization=True)" in message


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_folder_without_weights(tmp_path, variant):
    (tmp_path / "config.json").write_text("{}")
    if variant:  # the default weights are there, the requested variant is not
        save_file(small_tensors(), tmp_path / "model.safetensors")
    err = error_from(Checkpoint.open, tmp_path, variant=variant)
    assert isinstance(err, CheckpointNotFoundError)
    assert err.path == str(tmp_path)
    message = str(err)
    assert f"{tmp_path} holds no safetensors weights" in message
    v = f".{variant}" if variant else ""
    for looked_for in (f"model.safetensors.index{v}.json", f"model{v}.safetensors",
                       f"diffusion_pytorch_model{v}.safetensors"):
        assert looked_for in message
    assert ("(variant 'fp16')" in message) == bool(variant)


def test_folder_with_two_unrelated_safetensors_files(tmp_path):
    save_file(small_tensors(0), tmp_path / "encoder.safetensors")
    save_file(small_tensors(1), tmp_path / "decoder.safetensors")
    err = error_from(Checkpoint.open, tmp_path)
    assert isinstance(err, CheckpointNotFoundError)
    assert err.path == str(tmp_path)
    message = str(err)
    assert "cannot tell which weights to load" in message
    assert "'decoder.safetensors'" in message and "'encoder.safetensors'" in message
    assert "model.safetensors" in message  # what it expected


COMMIT = "3f2a9c1e5b7d4a6f8e0c2b4d6a8f0e1c3b5d7f9a"


def lay_out_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay out ``files`` (snapshot-relative name → content) as huggingface_hub's cache does:
    content in ``blobs/<sha256>``, ``snapshots/<commit>/<name>`` a relative symlink to its
    blob, ``refs/main`` holding the commit. Returns the snapshot folder."""
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / COMMIT
    for name, content in files.items():
        blob = repo_folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(COMMIT)  # written without a newline, as the hub does
    return snapshot


def record_tree_listing(cache_dir: Path, repo_id: str, files: dict[str, int]) -> None:
    """Write the per-commit tree listing (``trees/<commit>.json``, name → size) that
    ``snapshot_download`` keeps: it lists the whole repo, also files it did not download."""
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    listing = {name: {"size": size, "blob_id": hashlib.sha1(name.encode()).hexdigest()} for name, size in files.items()}
    (repo_folder / "trees").mkdir()
    (repo_folder / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": listing}))


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sharded_repo_files(tmp_path) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    staging = tmp_path / "staging"
    tensors = write_sharded(staging, [small_tensors(0, "x."), small_tensors(3, "y.")])
    (staging / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return folder_contents(staging), tensors


@pytest.mark.parametrize("subfolder", [None, "text_encoder"])
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_hub_cache_resolves_offline(tmp_path, monkeypatch, sharded_repo_files, how, subfolder):
    files, tensors = sharded_repo_files
    prefix = f"{subfolder}/" if subfolder else ""
    cache = tmp_path / "hub"
    snapshot = lay_out_hub_cache(cache, "org/name", {prefix + name: data for name, data in files.items()}
                                 | {"README.md": b"# tiny\n"})
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with Checkpoint.open("org/name", cache_dir=cache, subfolder=subfolder,
                         local_files_only=how == "local_files_only") as ckpt:
        assert ckpt.folder == snapshot / prefix
        assert ckpt.config == {"model_type": "tiny"}
        assert all(p.is_symlink() and p.parent == snapshot / prefix for p in ckpt.shard_paths)
        assert_checkpoint_holds(ckpt, tensors)


def test_hub_cache_resolves_a_commit_hash_revision(tmp_path, hf_offline, sharded_repo_files):
    files, tensors = sharded_repo_files
    snapshot = lay_out_hub_cache(tmp_path / "hub", "org/name", files)
    with Checkpoint.open("org/name", cache_dir=tmp_path / "hub", revision=COMMIT) as ckpt:
        assert ckpt.folder == snapshot
        assert_checkpoint_holds(ckpt, tensors)


def test_hub_cache_with_a_partial_snapshot_opens_offline(tmp_path, hf_offline, sharded_repo_files):
    """lazystream downloads only the config, the index and its shards (allow_patterns), while
    snapshot_download records the tree listing of the whole repo. Offline, that snapshot must
    still open: everything lazystream needs is there."""
    files, tensors = sharded_repo_files
    cache = tmp_path / "hub"
    snapshot = lay_out_hub_cache(cache, "org/name", files)
    record_tree_listing(cache, "org/name", {name: len(data) for name, data in files.items()}
                        | {"README.md": 10, "pytorch_model.bin": 4096, "onnx/model.onnx": 4096})

    with Checkpoint.open("org/name", cache_dir=cache) as ckpt:
        assert ckpt.folder == snapshot
        assert_checkpoint_holds(ckpt, tensors)


def test_hub_cache_missing_subfolder(tmp_path, hf_offline, sharded_repo_files):
    files, _ = sharded_repo_files
    snapshot = lay_out_hub_cache(tmp_path / "hub", "org/name", files)
    err = error_from(Checkpoint.open, "org/name", cache_dir=tmp_path / "hub", subfolder="unet")
    assert isinstance(err, CheckpointNotFoundError)
    assert err.path == str(snapshot / "unet")
    assert "Hugging Face repo 'org/name' has no subfolder 'unet' in the cache" in str(err)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_repo_not_in_the_cache_while_offline(tmp_path, monkeypatch, sharded_repo_files, how):
    lay_out_hub_cache(tmp_path / "hub", "org/name", sharded_repo_files[0])
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = error_from(Checkpoint.open, "org/other", cache_dir=tmp_path / "hub",
                     local_files_only=how == "local_files_only")
    assert isinstance(err, CheckpointNotFoundError) and isinstance(err, FileNotFoundError)
    assert err.path == "org/other"
    message = str(err)
    assert "Hugging Face repo 'org/other' is not in the Hugging Face cache" in message
    assert f"at {tmp_path / 'hub'}" in message
    assert "while offline (HF_HUB_OFFLINE or local_files_only)" in message
    assert "download it first or go online" in message


# -- 4. validation of headers and indexes ---------------------------------------------------


@pytest.fixture(params=["read_header", "Checkpoint.open"])
def validate(request):
    """Validate the file at a path, either alone or as a folder's model.safetensors."""
    if request.param == "read_header":
        return read_header
    return lambda path: Checkpoint.open(path.parent).close()


def assert_header_error(err: LazyStreamError, error_type: type, path: Path, tensor: str | None,
                        fragments: list[str]) -> None:
    assert type(err) is error_type, f"{type(err).__name__}: {err}"
    assert isinstance(err, ValueError)
    assert err.path == str(path)
    assert err.tensor == tensor
    message = str(err)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def a_and_b(a: dict, b: dict) -> dict:
    return {"a": a, "b": b}


INVALID_HEADERS = [
    # id, header, data length, error, tensor, message fragments
    ("offsets-past-the-end", {"a": entry(offsets=(0, 8))}, 4, OffsetOutOfRangeError, "a",
     ["tensor 'a' occupies data bytes [0, 8)", "the data section holds 4 bytes", "truncated", "re-download"]),
    ("second-tensor-past-the-end", a_and_b(entry(offsets=(0, 8)), entry(offsets=(8, 16))), 12, OffsetOutOfRangeError,
     "b", ["tensor 'b' occupies data bytes [8, 16)", "holds 12 bytes"]),
    ("overlapping", a_and_b(entry(offsets=(0, 8)), entry(offsets=(4, 12))), 12, OverlappingTensorsError, "b",
     ["tensors 'a'", "and 'b'", "overlap", "expected disjoint ranges"]),
    ("one-inside-another", a_and_b(entry(shape=(4,), offsets=(0, 16)), entry(offsets=(4, 12))), 16,
     OverlappingTensorsError, "b", ["'a'", "'b'", "overlap"]),
    ("same-range", a_and_b(entry(), entry()), 8, OverlappingTensorsError, "b", ["'a'", "'b'", "overlap"]),
    *[(f"dtype-{dtype!r}", {"a": entry(dtype=dtype)}, 8, UnknownDtypeError, "a",
       [f"tensor 'a' has dtype {dtype!r}", "expected one of F64, F32", "F8_E5M2"])
      for dtype in ["F4", "float32", "f32", "", 4, None]],
    ("dtype-missing", {"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, UnknownDtypeError, "a",
     ["tensor 'a' has dtype None"]),
    ("size-mismatch-shape", {"a": entry(shape=(3,), offsets=(0, 8))}, 12, TensorSizeMismatchError, "a",
     ["tensor 'a' of shape [3] and dtype F32 needs 12 bytes", "data_offsets [0, 8] span 8"]),
    ("size-mismatch-dtype", {"a": entry(dtype="F16", offsets=(0, 8))}, 8, TensorSizeMismatchError, "a",
     ["dtype F16 needs 4 bytes", "span 8"]),
    ("size-mismatch-empty", {"a": entry(shape=(0, 3), offsets=(0, 4))}, 8, TensorSizeMismatchError, "a",
     ["needs 0 bytes", "span 4"]),
    *[(f"shape-{shape!r}", {"a": entry(shape=shape)}, 8, InvalidShapeError, "a",
       ["tensor 'a': expected shape to be a list of non-negative integers", f"found {shape!r}"])
      for shape in [[-2], [2, -1], [2.0], [True, 2], ["2"], [[2]], "2", 2, None, {"0": 2}]],
    ("shape-missing", {"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, InvalidShapeError, "a", ["found None"]),
    *[(f"offsets-{offsets!r}", {"a": entry(offsets=offsets)}, 16, InvalidOffsetsError, "a",
       ["tensor 'a': expected data_offsets [begin, end] with 0 <= begin <= end", f"found {offsets!r}"])
      for offsets in [[8, 0], [-8, 0], [0], [0, 8, 16], [0.0, 8.0], [False, 8], ["0", "8"], "0,8", None, {}]],
    ("entry-not-an-object", {"a": [1, 2]}, 8, HeaderNotJSONError, "a",
     ["tensor 'a': expected an object with dtype, shape and data_offsets, found [1, 2]"]),
    *[(f"metadata-{metadata!r}", {"__metadata__": metadata, "a": entry()}, 8, HeaderNotJSONError, None,
       ["expected __metadata__ to map strings to strings", f"found {metadata!r}"])
      for metadata in [["format", "pt"], {"format": 1}, {"a": None}, "pt", None]],
]


@pytest.mark.parametrize("header, data_len, error_type, tensor, fragments",
                         [pytest.param(*case[1:], id=case[0]) for case in INVALID_HEADERS])
def test_invalid_header_entry(tmp_path, validate, header, data_len, error_type, tensor, fragments):
    path = write_raw(tmp_path / "model.safetensors", header, bytes(data_len))
    assert_header_error(error_from(validate, path), error_type, path, tensor, fragments)


@pytest.mark.parametrize("raw, fragments", [
    pytest.param(b'\xff\xfe{"a": 1}', ["expected a UTF-8 JSON header", "UnicodeDecodeError", "not safetensors"],
                 id="bad-utf8"),
    pytest.param(b'{"a": ', ["expected a UTF-8 JSON header", "JSONDecodeError"], id="bad-json"),
    pytest.param(b"", ["expected a UTF-8 JSON header", "JSONDecodeError"], id="empty"),
    pytest.param(b"[" * 100_000, ["expected a UTF-8 JSON header", "RecursionError"], id="deeply-nested"),
    pytest.param(b"[1, 2]", ["expected the header to be a JSON object, found a JSON list"], id="array"),
    pytest.param(b"null", ["expected the header to be a JSON object, found a JSON NoneType"], id="null"),
    pytest.param(b'"text"', ["expected the header to be a JSON object, found a JSON str"], id="string"),
])
def test_header_that_is_not_a_json_object(tmp_path, validate, raw, fragments):
    path = write_raw(tmp_path / "model.safetensors", raw, bytes(8))
    assert_header_error(error_from(validate, path), HeaderNotJSONError, path, None, fragments)


def test_valid_hand_written_header_is_accepted(tmp_path):
    header = {
        "__metadata__": {"format": "pt", "note": "hand written"},
        "b": entry(offsets=(8, 16)),
        "a": entry(offsets=(0, 8)),
        "empty": entry(shape=(0, 5), offsets=(4, 4)),  # zero-size ranges overlap nothing
        "scalar": entry(dtype="I8", shape=(), offsets=(16, 17)),
    }
    path = write_raw(tmp_path / "model.safetensors", header, bytes(range(17)) + b"trailing bytes are allowed")
    h = read_header(path)
    assert h.metadata == {"format": "pt", "note": "hand written"}
    assert [r.name for r in h.records] == ["a", "empty", "b", "scalar"]  # file order
    assert h.data_start == 8 + len(json.dumps(header))
    assert h.file_size == path.stat().st_size
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.tensor("b").view(torch.uint8).tolist() == list(range(8, 16))
        assert ckpt.tensor("scalar").item() == 16
        assert ckpt.tensor("empty").shape == (0, 5)


def test_zero_size_tensor_with_dimensions_torch_cannot_hold(tmp_path):
    """[0, 2**63] has no bytes, but no torch tensor has that shape: it must be refused when
    the header is read, not crash tensor() later."""
    header = {"huge": entry(shape=(0, 2**63), offsets=(0, 0)), "strides": entry(shape=(0, 2**62, 4), offsets=(0, 0))}
    path = write_raw(tmp_path / "model.safetensors", header)
    err = error_from(read_header, path)
    assert isinstance(err, InvalidShapeError)
    assert err.path == str(path) and err.tensor in {"huge", "strides"}
    assert "expected shape" in str(err)


@pytest.fixture
def valid_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(small_tensors(), path)
    return path


def test_file_cut_in_the_middle_of_the_data(valid_file, validate):
    size, data_start = valid_file.stat().st_size, read_header(valid_file).data_start
    os.truncate(valid_file, (data_start + size) // 2)
    err = error_from(validate, valid_file)
    assert type(err) is OffsetOutOfRangeError
    assert err.path == str(valid_file) and err.tensor in small_tensors()
    assert f"the data section holds {(data_start + size) // 2 - data_start} bytes" in str(err)
    assert "truncated" in str(err)


def test_file_cut_inside_the_header(valid_file, validate):
    header_len = read_header(valid_file).data_start - 8
    os.truncate(valid_file, 8 + header_len // 2)
    assert_header_error(error_from(validate, valid_file), TruncatedShardError, valid_file, None, [
        f"header says {header_len} bytes follow the length prefix, but the file has {header_len // 2}",
        "truncated", "re-download",
    ])


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_the_length_prefix(tmp_path, validate, size):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10" * size)
    assert_header_error(error_from(validate, path), TruncatedShardError, path, None, [
        f"expected at least 8 bytes (the header length), found {size}", "truncated or not safetensors",
    ])


@pytest.mark.parametrize("header_len", [MAX_HEADER_BYTES + 1, 2**64 - 1])
def test_header_length_above_the_cap(tmp_path, validate, header_len):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + b"{}")
    assert_header_error(error_from(validate, path), HeaderTooLargeError, path, None, [
        f"header length is {header_len} bytes, above the {MAX_HEADER_BYTES} byte cap", "corrupt or not safetensors",
    ])


def test_header_length_at_the_cap_is_not_too_large_but_truncated(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES) + b"{}")
    assert type(error_from(read_header, path)) is TruncatedShardError


@pytest.fixture
def two_shard_folder(tmp_path) -> Path:
    write_sharded(tmp_path, [small_tensors(0, "a."), small_tensors(1, "b.")])
    return tmp_path


INDEX = "model.safetensors.index.json"
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def test_index_names_a_missing_shard(two_shard_folder):
    (two_shard_folder / SHARD_2).unlink()
    err = error_from(Checkpoint.open, two_shard_folder)
    assert isinstance(err, MissingShardError) and isinstance(err, FileNotFoundError)
    assert err.path == str(two_shard_folder / SHARD_2)
    assert str(err) == (f"{two_shard_folder / INDEX} names shard {SHARD_2!r}, but {two_shard_folder / SHARD_2} does "
                        "not exist; the download is incomplete: fetch the missing file")


def test_index_names_a_tensor_its_shard_does_not_hold(two_shard_folder):
    index = json.loads((two_shard_folder / INDEX).read_text())
    index["weight_map"]["a.renamed"] = SHARD_1
    (two_shard_folder / INDEX).write_text(json.dumps(index))
    err = error_from(Checkpoint.open, two_shard_folder)
    assert type(err) is IndexMismatchError and isinstance(err, ValueError)
    assert err.path == str(two_shard_folder / SHARD_1)
    assert err.tensor == "a.renamed"
    assert f"says {SHARD_1} holds tensor 'a.renamed', but that shard's header has no such tensor" in str(err)
    assert "re-download them together" in str(err)


@pytest.mark.parametrize("content, fragment", [
    pytest.param(b'{"weight_map": {', "expected a JSON index, found text that does not parse", id="bad-json"),
    pytest.param(b'\xff{"weight_map": {}}', "expected a JSON index, found text that does not parse", id="bad-utf8"),
    pytest.param(b"[" * 100_000, "expected a JSON index, found text that does not parse", id="deeply-nested"),
    pytest.param(b'["weight_map"]', "expected an object with a 'weight_map' of tensor name to shard file name, "
                 "found ['weight_map']", id="array"),
    pytest.param(b'{"metadata": {}}', "with a 'weight_map'", id="no-weight-map"),
    pytest.param(b'{"weight_map": ["a"]}', "with a 'weight_map'", id="weight-map-a-list"),
    pytest.param(b'{"weight_map": {"a.weight": 1}}', "with a 'weight_map'", id="shard-not-a-string"),
])
def test_malformed_index(two_shard_folder, content, fragment):
    (two_shard_folder / INDEX).write_bytes(content)
    err = error_from(Checkpoint.open, two_shard_folder)
    assert type(err) is InvalidIndexError and isinstance(err, ValueError)
    assert err.path == str(two_shard_folder / INDEX)
    assert str(err).startswith(f"{two_shard_folder / INDEX}: ")
    assert fragment in str(err)


@pytest.mark.parametrize("shard", ["../model.safetensors", "sub/model.safetensors", "/tmp/model.safetensors",
                                   "..", ".", ""])
def test_index_entry_outside_the_index_folder(two_shard_folder, shard):
    (two_shard_folder / "sub").mkdir()
    save_file(small_tensors(), two_shard_folder / "sub" / "model.safetensors")
    index = json.loads((two_shard_folder / INDEX).read_text())
    index["weight_map"]["a.weight"] = shard
    (two_shard_folder / INDEX).write_text(json.dumps(index))
    err = error_from(Checkpoint.open, two_shard_folder)
    assert type(err) is InvalidIndexError
    assert err.path == str(two_shard_folder / INDEX)
    assert err.tensor == "a.weight"
    assert f"tensor 'a.weight' maps to {shard!r}; expected a file name in the index's own folder" in str(err)


def test_invalid_shard_header_is_named_through_the_index(two_shard_folder):
    write_raw(two_shard_folder / SHARD_2, {"b.weight": entry(dtype="F3")}, bytes(8))
    err = error_from(Checkpoint.open, two_shard_folder)
    assert type(err) is UnknownDtypeError
    assert err.path == str(two_shard_folder / SHARD_2) and err.tensor == "b.weight"


def mapped_files_under(folder: Path) -> set[str]:
    """The files under ``folder`` that this process has memory-mapped now (Linux /proc)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    gc.collect()
    fields = (line.split(maxsplit=5) for line in maps.read_text().splitlines())
    return {f[5] for f in fields if len(f) == 6 and f[5].startswith(f"{folder}/")}


def test_malformed_config_is_named_and_leaves_nothing_mapped(two_shard_folder):
    (two_shard_folder / "config.json").write_text('{"model_type": ')
    err = error_from(Checkpoint.open, two_shard_folder)
    assert isinstance(err, ValueError)
    assert err.path == str(two_shard_folder / "config.json")
    assert "config.json" in str(err)
    assert not mapped_files_under(two_shard_folder)


# -- 5. shards that change after they were mapped ---------------------------------------------


def truncate_in_place(path: Path) -> str:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"it now has {size // 2} bytes (was {size})"


def replace_with_another_file(path: Path) -> str:
    other = path.with_name("replacement.tmp")
    save_file(small_tensors(99, "b."), other, metadata={"format": "pt"})
    assert other.stat().st_size == path.stat().st_size
    os.replace(other, path)
    return "another file was put at its path"


def delete(path: Path) -> str:
    path.unlink()
    return "it was removed"


def rewrite_same_size_in_place(path: Path) -> str:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - 8)
        f.write(b"\x7f" * 8)
    # A coarse timestamp (1-2 s on some file systems) could leave mtime as it was.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert path.stat().st_size == st.st_size
    return "it was rewritten in place (new modification time)"


@pytest.mark.parametrize("change", [truncate_in_place, replace_with_another_file, delete, rewrite_same_size_in_place])
def test_shard_changed_after_mapping(two_shard_folder, change):
    shard = two_shard_folder / SHARD_2
    with Checkpoint.open(two_shard_folder) as ckpt:
        before = ckpt.tensor("b.weight").clone()
        found = change(shard)

        for read in (lambda: ckpt.tensor("b.weight"),
                     lambda: ckpt.read_into([(ckpt["b.bias"], 0)], torch.empty(64, dtype=torch.uint8))):
            err = error_from(read)
            assert type(err) is ShardChangedError and isinstance(err, RuntimeError)
            assert err.path == str(shard)
            assert str(err) == (f"{shard} changed on disk after it was opened: {found}. "
                                "Reload the model to read the new file")

        # The other shard is untouched and still reads.
        assert_same_tensor(ckpt.tensor("a.weight"), small_tensors(0, "a.")["a.weight"])
    assert_same_tensor(before, small_tensors(1, "b.")["b.weight"])


# -- 6. close -------------------------------------------------------------------------------


def test_close(two_shard_folder):
    ckpt = Checkpoint.open(two_shard_folder)
    view = ckpt.tensor("a.weight")
    rec = ckpt["a.bias"]
    ckpt.close()
    ckpt.close()  # idempotent

    assert "closed" in repr(ckpt)
    for read in (lambda: ckpt.tensor("a.weight"),
                 lambda: ckpt.read_into([(rec, 0)], torch.empty(rec.nbytes, dtype=torch.uint8)),
                 lambda: ckpt.shard_paths):
        err = error_from(read)
        assert type(err) is ClosedError and isinstance(err, RuntimeError)
        assert err.path == str(two_shard_folder)
        assert str(err) == f"the checkpoint at {two_shard_folder} is closed"
    # Records stay inspectable; a view taken before close still reads the mapped bytes.
    assert ckpt["a.bias"] == rec
    del ckpt
    assert_same_tensor(view, small_tensors(0, "a.")["a.weight"])
    # Only the view keeps its shard mapped; dropping it unmaps everything.
    assert mapped_files_under(two_shard_folder) == {str(two_shard_folder / SHARD_1)}
    del view
    assert not mapped_files_under(two_shard_folder)


def test_context_manager_closes(two_shard_folder):
    with Checkpoint.open(two_shard_folder) as ckpt:
        view = ckpt.tensor("b.steps")
    assert type(error_from(ckpt.tensor, "b.steps")) is ClosedError
    assert_same_tensor(view, small_tensors(1, "b.")["b.steps"])


def test_hub_download_fetches_generation_config_beside_the_config(tmp_path, monkeypatch, sharded_repo_files):
    """transformers' from_pretrained reads generation_config.json beside config.json: a repo
    lazystream downloads must bring it (and still nothing it does not need)."""
    import huggingface_hub
    from huggingface_hub import constants

    import lazystream.resolve

    files, tensors = sharded_repo_files
    files = files | {"generation_config.json": b'{"do_sample": true, "temperature": 0.6}'}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snapshot = lay_out_hub_cache(tmp_path / "hub", "org/name", files)
    asked: list[str] = []
    monkeypatch.setattr(lazystream.resolve, "list_hub_files",
                        lambda repo_id, revision=None, token=None: sorted(files) + ["README.md", "model.onnx"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(snapshot / filename))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns=None, **kw: asked.extend(allow_patterns) or str(snapshot))
    with Checkpoint.open("org/name", cache_dir=tmp_path / "hub") as ckpt:
        assert_checkpoint_holds(ckpt, tensors)
    assert "generation_config.json" in asked and "config.json" in asked
    assert "README.md" not in asked and "model.onnx" not in asked
