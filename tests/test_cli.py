"""First contact: the ``lazystream`` command run as a user runs it (the installed console
script, or ``python -m lazystream``, in a subprocess), its errors, its help, the cheap
``import lazystream``, and the README's first snippet."""

from __future__ import annotations

import argparse
import ast
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lazystream
from lazystream import LazyStreamModel
from lazystream.checkpoint import Checkpoint
from lazystream.cli import _parser, main
from lazystream.errors import CheckpointNotFoundError, HubUnreachableError, UnavailableDeviceError
from lazystream.resolve import select_weights, weight_subfolders
from lazystream.synthetic import build_qwen3, build_zimage_pipeline, byte_level_tokenizer

SCRIPT = shutil.which("lazystream", path=str(Path(sys.executable).parent)) or "lazystream"
# With CUDA present, a device index past the last one is the device this machine lacks.
NO_SUCH_CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"


def lazystream_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed ``lazystream`` console script, as a user runs it."""
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(run: subprocess.CompletedProcess, status: int, command: str, *fragments: str) -> str:
    assert run.returncode == status, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lazystream {command}: error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), max_shard_size="60KB")


@pytest.fixture
def hub_home(tmp_path) -> dict[str, str]:
    """A Hugging Face home with an empty cache and no token."""
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub")}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


# -- help, version, python -m -----------------------------------------------------------


def test_help_lists_the_commands_and_no_hidden_one():
    run = subprocess.run([sys.executable, "-m", "lazystream", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for command in ("plan", "demo", "bench", "--version", "--debug", "exit status"):
        assert command in run.stdout
    for hidden in ("_run", "SUPPRESS", "``"):
        assert hidden not in run.stdout
    plan_help = lazystream_cli("plan", "--help")
    assert plan_help.returncode == 0 and "--subfolder" in plan_help.stdout and "examples:" in plan_help.stdout


def test_every_option_has_help():
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("lazystream", parser), *commands.choices.items()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):  # its commands' help is checked above
                assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    assert set(commands.choices) == {"plan", "demo", "bench"}


@pytest.mark.parametrize("command", [[], ["bench"]], ids=["lazystream", "bench"])
def test_help_does_not_import_torch(command):
    code = (f"import sys\nfrom lazystream.cli import main\ntry:\n    main({command + ['--help']!r})\n"
            "except SystemExit:\n    pass\nimport lazystream\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_version():
    run = lazystream_cli("--version")
    assert run.returncode == 0
    assert run.stdout.startswith(f"lazystream {importlib.metadata.version('lazystream')} from ")
    assert lazystream.__version__ == importlib.metadata.version("lazystream")


# -- the public names, imported on first use --------------------------------------------


def test_public_names_resolve_and_match_the_type_checking_imports():
    for name in lazystream.__all__:
        assert getattr(lazystream, name).__name__ == name
    namespace: dict = {}
    exec("from lazystream import *", namespace)
    assert set(lazystream.__all__) <= set(namespace)
    assert set(lazystream.__all__) <= set(dir(lazystream))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        lazystream.nothing  # noqa: B018
    # The imports a type checker sees name the same objects from the same modules.
    tree = ast.parse(Path(lazystream.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {alias.name: "." + node.module for node in block.body for alias in node.names}
    assert seen == lazystream._EXPORTS


# -- argument errors: one line, exit status 2, nothing run ------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["plan", "x", "--keep-gpu", "lots"], ["argument --keep-gpu: expected a number of blocks >= 0 or 'auto', got 'lots'"]),
    (["plan", "x", "--prefetch", "0"], ["argument --prefetch: expected a whole number >= 1, got '0'"]),
    (["plan", "x", "--placement", "last"], ["argument --placement: invalid choice: 'last'"]),
    (["plan", "x", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["demo", "--keep-gpu", "-3"], ["argument --keep-gpu: expected a whole number >= 0, got '-3'"]),
    (["demo", "--tokens", "0"], ["argument --tokens: expected a whole number >= 1, got '0'"]),
    (["bench", "--build", "llama:small"], ["argument --build: expected FAMILY:SIZE with FAMILY one of"]),
    (["bench", "--build", "qwen3:huge"], ["argument --build: SIZE of 'qwen3:huge' must be one of"]),
], ids=["keep-gpu-lots", "prefetch-0", "placement", "unknown-option", "demo-keep-gpu-negative", "demo-tokens-0",
        "bench-build-family", "bench-build-size"])
def test_argument_errors(args, fragments, tmp_path):
    # An empty cache: were the arguments not checked first, demo would start building its checkpoint.
    run = lazystream_cli(*args, env={"XDG_CACHE_HOME": str(tmp_path)}, timeout=60)
    line = assert_one_line_error(run, 2, args[0], *fragments)
    assert line.endswith(f"(see 'lazystream {args[0]} --help')")
    assert not list(tmp_path.iterdir())


def test_byte_size_errors_name_the_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "x", "--vram", "lots"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("lazystream plan: error: argument --vram: expected a size such as 8GiB, 500MB "
                                       "or 6442450944, got 'lots' (see 'lazystream plan --help')\n")


# -- lazystream errors: one line, exit status 2 for bad input, 1 for a failure ----------


def test_a_path_that_does_not_exist(tiny):
    run = lazystream_cli("plan", str(tiny.parent / "tiny-qwen"))
    assert_one_line_error(run, 2, "plan", f"no such folder: {tiny.parent / 'tiny-qwen'}", "Hugging Face repo id",
                          f"did you mean {tiny}?")
    assert "HFValidationError" not in run.stderr and "Repo id must be" not in run.stderr


def test_debug_shows_the_traceback():
    with pytest.raises(CheckpointNotFoundError, match="no such folder: /no/such/path"):
        main(["--debug", "plan", "/no/such/path"])
    with pytest.raises(CheckpointNotFoundError):
        main(["plan", "/no/such/path", "--debug"])


def test_a_pipeline_folder_without_subfolder(tmp_path_factory):
    path = build_zimage_pipeline(tmp_path_factory.mktemp("pipeline"))
    run = lazystream_cli("plan", str(path))
    assert_one_line_error(run, 2, "plan", f"{path} holds no safetensors weights",
                          "diffusers pipeline whose components text_encoder, transformer, vae hold weights",
                          "pass --subfolder transformer")
    # The same from Python names the argument.
    with pytest.raises(CheckpointNotFoundError, match="pass subfolder='transformer' for one of them, or load them all "
                                                      "with LazyStreamPipeline"):
        Checkpoint.open(path)
    with pytest.raises(CheckpointNotFoundError, match=r"has no subfolder 'unet'; its subfolders text_encoder, "
                                                      r"transformer, vae hold weights"):
        Checkpoint.open(path, subfolder="unet")
    with Checkpoint.open(path, subfolder="transformer") as ckpt:
        assert len(ckpt) > 0


def test_a_hub_listing_names_the_subfolders_with_weights():
    listed = ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors.index.json", "vae/config.json", "a/b/model.safetensors"]
    assert weight_subfolders(listed) == ["text_encoder", "transformer"]
    with pytest.raises(CheckpointNotFoundError, match="it is a diffusers pipeline whose components text_encoder, "
                                                      "transformer hold weights: pass subfolder='transformer'"):
        select_weights(Path("."), ["model_index.json"], None, subfolders=lambda: weight_subfolders(listed))


def test_a_file_instead_of_its_folder(tiny):
    with pytest.raises(CheckpointNotFoundError, match=f"config.json is a file; expected the folder .*: pass {tiny}$"):
        Checkpoint.open(tiny / "config.json")


def test_cuda_without_a_gpu_from_the_command_line(tiny, tmp_path):
    run = lazystream_cli("plan", str(tiny), "--device", NO_SUCH_CUDA)
    assert_one_line_error(run, 2, "plan", f"--device {NO_SUCH_CUDA} is not available", "available here: cpu")
    # demo checks its device before it builds anything.
    run = lazystream_cli("demo", "--device", NO_SUCH_CUDA, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert_one_line_error(run, 2, "demo", f"--device {NO_SUCH_CUDA} is not available")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device, fragment", [
    (NO_SUCH_CUDA, f"device='{NO_SUCH_CUDA}' is not available"),
    ("gpu", "device='gpu' is not a device torch knows; expected e.g. 'cuda', 'cuda:1' or 'cpu'"),
])
def test_cuda_without_a_gpu_from_python(tiny, device, fragment):
    with pytest.raises(UnavailableDeviceError, match=re.escape(fragment)) as err:
        LazyStreamModel.from_pretrained(tiny, 2, device=device)
    assert isinstance(err.value, ValueError)
    if device.startswith("cuda"):
        assert "available here: cpu" in str(err.value)
        if not torch.cuda.is_available():
            assert f"this torch build ({torch.__version__}) has no CUDA" in str(err.value)


def test_a_budget_too_small_names_vram(tiny):
    run = lazystream_cli("plan", str(tiny), "--vram", "10KiB", "--activation-reserve", "0")
    line = assert_one_line_error(run, 1, "plan", "--keep-gpu auto found no plan within the budget",
                                 "from --vram", "raise --vram")
    assert "max_gpu_memory" not in line and "keep_gpu" not in line


def test_a_plan_over_vram_warns_and_prediction_states_only_what_is_known(tiny, tmp_path):
    run = lazystream_cli("plan", str(tiny), "--vram", "600KiB", "--keep-gpu", "3",
                         env={"LAZYSTREAM_CACHE": str(tmp_path)})  # nothing calibrated
    assert run.returncode == 0, run.stderr
    warning = run.stderr.splitlines()
    assert len(warning) == 1, run.stderr
    assert re.fullmatch(r"lazystream plan: warning: this plan needs [\d.]+ MiB of device memory, over --vram 0\.6 "
                        r"MiB; --keep-gpu [0-3] fits \(or --keep-gpu auto chooses within --vram\)", warning[0])
    assert "Qwen3ForCausalLM: 4 blocks" in run.stdout
    assert re.search(r"predicted per call: at least [\d.]+ ms, the transfer at the probed \w+ bandwidth", run.stdout)
    assert "compute: not calibrated yet" in run.stdout
    assert "bound by" not in run.stdout and "predicted 0.0 ms" not in run.stdout


def test_a_hub_repo_offline_and_not_cached(hub_home):
    run = lazystream_cli("plan", "org/not-cached", env={**hub_home, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(run, 2, "plan", "'org/not-cached' is not a folder", "is not in the Hugging Face cache",
                          "while offline (HF_HUB_OFFLINE", "hf download org/not-cached", "or pass a local folder")


def test_a_hub_repo_without_network_fails_at_once(hub_home):
    """huggingface_hub would retry the listing for about half a minute; the first request
    without retries fails at once (a refused connection), and says what to do."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    run = lazystream_cli("plan", "org/name", env={**hub_home, "HF_ENDPOINT": endpoint}, timeout=20)
    assert_one_line_error(run, 1, "plan", f"the Hugging Face Hub ({endpoint}) could not be reached",
                          "set HF_HUB_OFFLINE=1 to use the Hugging Face cache only, or pass a local folder")
    assert "Retrying" not in run.stderr


class _NotFoundHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a repo that does not exist."""

    def do_GET(self):  # noqa: N802 (the handler's protocol)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": "Repository not found"}).encode())

    def log_message(self, *args):
        pass


def test_hub_errors_from_python(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(HubUnreachableError, match="could not be reached") as err:
        Checkpoint.open("org/name", cache_dir=tmp_path)
    assert isinstance(err.value, ConnectionError) and err.value.path == "org/name"

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(CheckpointNotFoundError, match="the Hugging Face Hub has no repo 'org/nothing'"):
            Checkpoint.open("org/nothing", cache_dir=tmp_path)
    finally:
        server.shutdown()
        server.server_close()


# -- the README ---------------------------------------------------------------------------


def test_the_readme_first_snippet_runs_as_written(tmp_path):
    """Run with a tiny local checkpoint (and a tokenizer) in place of the hub repo."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert 'repo = "Qwen/Qwen3-8B"' in snippet
    path = build_qwen3(tmp_path / "qwen3", {"vocab_size": 512}, max_shard_size="60KB")
    byte_level_tokenizer().save_pretrained(path)
    exec(compile(snippet.replace('"Qwen/Qwen3-8B"', repr(str(path))), "README.md", "exec"), {})
