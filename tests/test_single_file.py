"""Single-file checkpoints (original key names, fused qkv) loaded as diffusers'
``from_single_file`` loads them: config resolution (a folder, or the Hugging Face cache
offline), dtype rules, a pipeline with a single-file transformer, the plan from headers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from safetensors.torch import save_file

from conftest import keeps_holes
from lazystream import LazyStreamModel, streamer_of
from lazystream.checkpoint import Checkpoint
from lazystream.errors import CheckpointNotFoundError, UnknownModelClassError, UnsupportedFormatError
from lazystream.pipeline import LazyStreamPipeline, phases_of
from lazystream.synthetic import build_zimage_pipeline, zimage_config, zimage_inputs
from lazystream.synthetic.single_file import build_zimage_single_file, original_zimage_state

REPO = "Tongyi-MAI/Z-Image-Turbo"  # what diffusers infers from Z-Image's key names
FILE_REPO, FILE_NAME = "Comfy-Org/z_image_turbo", "split_files/diffusion_models/z_image_turbo_bf16.safetensors"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _outputs(model) -> torch.Tensor:
    x, t, cap = zimage_inputs(zimage_config("tiny"))
    dtype = next(model.parameters()).dtype
    x, cap = [v.to(dtype) for v in x], [c.to(dtype) for c in cap]
    with torch.no_grad():
        return torch.cat([sample.flatten() for sample in model(x, t, cap)[0]])


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """A Hugging Face cache holding Z-Image Turbo's transformer config and a single file in
    ComfyUI's layout (bfloat16, ``model.diffusion_model.`` keys), as after a download."""
    cache = tmp_path_factory.mktemp("hf-cache")
    snapshots = {}
    for repo in (REPO, FILE_REPO):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(REVISION)
        snapshots[repo] = folder / "snapshots" / REVISION
    build_zimage_single_file(snapshots[FILE_REPO] / FILE_NAME, dtype=torch.bfloat16, prefix="model.diffusion_model.",
                             config_folder=snapshots[REPO] / "transformer")
    return cache


@pytest.fixture
def hub_cache(hub_files, monkeypatch):
    """``hub_files`` as the default cache, offline (diffusers reads a single file's config
    from the default cache whatever cache_dir says)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_files))
    return hub_files


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["default-float32", "float16"])
def test_config_and_file_from_the_hub_cache_offline(hub_cache, dtype):
    """No config given: the repo is inferred from the key names, as diffusers infers it;
    the file is a hub URL; both come from the cache. Without dtype diffusers loads in
    float32 (the bfloat16 file is cast on the device); with one, every tensor in it."""
    url = f"https://huggingface.co/{FILE_REPO}/blob/main/{FILE_NAME}"
    kwargs = {} if dtype is None else {"dtype": dtype}
    ref = ZImageTransformer2DModel.from_single_file(url, **kwargs).eval()
    for keep_gpu in (0, 2):
        model = LazyStreamModel.from_single_file(url, keep_gpu, model_cls=ZImageTransformer2DModel, device="cpu",
                                                 **kwargs)
        assert {p.dtype for p in model.parameters()} == {dtype or torch.float32}
        assert torch.equal(_outputs(model), _outputs(ref))
        streamer_of(model).close()


def test_a_file_missing_from_the_cache_offline_names_it(hub_cache):
    with pytest.raises(CheckpointNotFoundError, match="not in the Hugging Face cache"):
        LazyStreamModel.from_single_file(f"https://huggingface.co/{FILE_REPO}/blob/main/other.safetensors", 0,
                                         model_cls=ZImageTransformer2DModel)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage-single-file")
    return build_zimage_single_file(folder / "z.safetensors", config_folder=folder / "transformer"), folder


def test_the_model_class_comes_from_the_config(single_file):
    file, folder = single_file
    model = LazyStreamModel.from_single_file(file, 1, config=folder, subfolder="transformer", device="cpu")
    assert type(model) is ZImageTransformer2DModel
    ref = ZImageTransformer2DModel.from_single_file(str(file), config=str(folder), subfolder="transformer").eval()
    assert torch.equal(_outputs(model), _outputs(ref))
    # q, k and v are three pieces of one stored qkv tensor, each one run of the file.
    qkv = Checkpoint.open(file.parent)
    stored = qkv["layers.0.attention.qkv.weight"]
    sources = {t.name: t.source for b in streamer_of(model).plan.blocks for t in b.tensors}
    pieces = [sources[f"layers.0.attention.to_{p}.weight"] for p in "qkv"]
    assert [s.runs[0].offset for s in pieces] == [stored.offset + i * stored.nbytes // 3 for i in range(3)]
    qkv.close()
    streamer_of(model).close()


def test_refusals_name_what_to_pass(single_file, tmp_path):
    file, folder = single_file
    with pytest.raises(UnknownModelClassError, match="pass model_cls="):
        LazyStreamModel.from_single_file(file, 0)
    from diffusers import PixArtTransformer2DModel

    with pytest.raises(UnknownModelClassError, match="no single-file conversion"):
        LazyStreamModel.from_single_file(file, 0, config=folder, subfolder="transformer",
                                         model_cls=PixArtTransformer2DModel)
    (tmp_path / "model.ckpt").write_bytes(b"not safetensors")
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        LazyStreamModel.from_single_file(tmp_path / "model.ckpt", 0, config=folder, subfolder="transformer")
    with pytest.raises(CheckpointNotFoundError, match="neither a file nor a Hugging Face file URL"):
        LazyStreamModel.from_single_file(tmp_path / "missing.safetensors", 0, config=folder, subfolder="transformer")


def test_plan_of_a_single_file_reads_headers_only(single_file, monkeypatch, capsys):
    from lazystream.cli import main

    file, folder = single_file
    monkeypatch.setattr(Checkpoint, "copy_run", lambda *a: pytest.fail("the plan read tensor bytes"))
    assert main(["plan", str(file), "--config", str(folder), "--subfolder", "transformer", "--keep-gpu", "0",
                 "--device", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model_class"] == "ZImageTransformer2DModel"
    assert len(plan["blocks"]) == 8 and not any(b["resident"] for b in plan["blocks"])
    assert plan["streamed_share"] == plan["block_share"] > 0.5


def test_a_pipeline_streams_a_single_file_transformer(tmp_path):
    """The repo's transformer weights replaced by a single file, as users pass
    ``transformer=ZImageTransformer2DModel.from_single_file(...)`` to diffusers."""
    path = build_zimage_pipeline(tmp_path / "pipe", max_shard_size="60KB")
    state = ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer").state_dict()
    file = tmp_path / "z_image_turbo.safetensors"
    save_file({name: value.contiguous() * 1.5 for name, value in original_zimage_state(state).items()}, file)
    transformer = ZImageTransformer2DModel.from_single_file(str(file), config=str(path), subfolder="transformer")
    call = dict(prompt="a red cat", guidance_scale=2.0, num_inference_steps=2, height=32, width=32,
                max_sequence_length=48, output_type="pt")
    want = ZImagePipeline.from_pretrained(path, transformer=transformer)(
        generator=torch.Generator().manual_seed(7), **call).images
    pipe = LazyStreamPipeline.from_pretrained(path, {"transformer": 1, "text_encoder": 1},
                                              single_files={"transformer": file})
    got = pipe(generator=torch.Generator().manual_seed(7), **call).images
    assert torch.equal(got, want)
    assert streamer_of(pipe.transformer).ckpt.shard_paths == [file]
    phases_of(pipe).close()
    with pytest.raises(ValueError, match="single_files names"):
        LazyStreamPipeline.from_pretrained(path, {"text_encoder": 1}, single_files={"transformer": file})


def test_plan_of_a_real_size_flux1_file_from_its_header(tmp_path, capsys):
    """FLUX.1-dev as flux1-dev.safetensors lays it out (11.9B parameters in bfloat16, a
    sparse file here): diffusers' conversion, which only takes the real 3072-wide layers,
    traced from the header alone."""
    if not keeps_holes(tmp_path):
        pytest.skip("this file system does not keep holes: the file would take 24 GB")
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lazystream.cli import main
    from lazystream.synthetic.single_file import original_flux_state, write_header_only

    with init_empty_weights():
        model = FluxTransformer2DModel(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model.save_config(tmp_path / "config")
    state = original_flux_state({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    file = write_header_only(tmp_path / "flux1-dev.safetensors", state)
    assert main(["plan", str(file), "--config", str(tmp_path / "config"), "--keep-gpu", "20", "--device", "cpu",
                 "--dtype", "bfloat16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model_class"] == "FluxTransformer2DModel" and len(plan["blocks"]) == 19 + 38
    assert plan["param_bytes"] == sum(p.numel() for p in model.parameters()) * 2
    assert plan["block_share"] > 0.99 and sum(b["resident"] for b in plan["blocks"]) == 20


def test_plan_of_a_hub_single_file_reads_its_header_by_range_request(single_file, monkeypatch, tmp_path, capsys):
    """Not in the cache and online: the header comes from the hub's range-request API; the
    file is never downloaded."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants

    from lazystream.cli import main
    from lazystream.header import DTYPES, read_header

    file, folder = single_file
    header = read_header(file)
    names = {dtype: name for name, dtype in DTYPES.items()}

    def parse(repo, filename, revision=None):
        assert (repo, filename) == ("someone/z-image", "z.safetensors")
        start = header.data_start
        return SimpleNamespace(tensors={r.name: SimpleNamespace(
            dtype=names[r.dtype], shape=list(r.shape), data_offsets=(r.offset - start, r.offset - start + r.nbytes))
            for r in header.records})

    monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", parse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = ["--config", str(folder), "--subfolder", "transformer", "--keep-gpu", "3", "--device", "cpu", "--json"]
    assert main(["plan", "https://huggingface.co/someone/z-image/blob/main/z.safetensors", *args]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["plan", str(file), *args]) == 0
    local = json.loads(capsys.readouterr().out)
    assert remote["blocks"] == local["blocks"] and remote["param_bytes"] == local["param_bytes"]
