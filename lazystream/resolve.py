"""Find a checkpoint's weight files: a local folder as is, or a Hugging Face repo id
through huggingface_hub (only the config, the index and the shards it names)."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointNotFoundError, HubUnreachableError, UnsupportedFormatError

_STEMS = ("model", "diffusion_pytorch_model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class WeightFiles:
    """The resolved files of one checkpoint: either an index or exactly one weights file."""

    folder: Path
    index: Path | None
    single: Path | None

    @property
    def config(self) -> Path | None:
        path = self.folder / "config.json"
        return path if path.is_file() else None


def resolve(
    repo: str | os.PathLike,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> WeightFiles:
    """Locate the safetensors weights of ``repo`` (a folder or a hub repo id).

    Raises:
        CheckpointNotFoundError: no such folder or repo, or no weights in it.
        UnsupportedFormatError: only pickle (``.bin``/``.pt``) weights are there.
    """
    path = Path(repo).expanduser()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointNotFoundError(
                f"{path} has no subfolder {subfolder!r}" + _subfolder_hint(_local_weight_subfolders(path)), path=folder
            )
        return select_weights(folder, sorted(os.listdir(folder)), variant,
                              subfolders=list if subfolder else lambda: _local_weight_subfolders(folder))
    if looks_like_path(repo):
        raise _no_such_folder(path)
    return _resolve_hub(str(repo), subfolder, variant, revision, cache_dir, token, local_files_only)


def looks_like_path(repo: str | os.PathLike) -> bool:
    """True for what can only be meant as a local path, never as a Hugging Face repo id
    (``org/name``): an absolute or ``./``, ``../``, ``~`` path, one with more than one
    ``/`` or a backslash, or an existing file."""
    text = os.fspath(repo)
    return (text in {".", ".."} or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1
            or "\\" in text or os.path.exists(text))


def _no_such_folder(path: Path) -> CheckpointNotFoundError:
    if path.exists():
        return CheckpointNotFoundError(
            f"{path} is a file; expected the folder that holds the checkpoint (config.json and the safetensors "
            f"files): pass {path.parent}",
            path=path,
        )
    try:
        close = difflib.get_close_matches(path.name, os.listdir(path.parent), n=1)
    except OSError:  # no parent folder either, or one we may not list
        close = []
    return CheckpointNotFoundError(
        f"no such folder: {path}; expected a folder holding config.json and safetensors files, or a Hugging Face "
        "repo id such as 'Qwen/Qwen3-8B'" + (f"; did you mean {path.parent / close[0]}?" if close else ""),
        path=path,
    )


def select_weights(folder: Path, names: list[str], variant: str | None,
                   subfolders: Callable[[], list[str]] = list) -> WeightFiles:
    """Pick the index or single file among ``names``, as transformers and diffusers name them.
    ``subfolders()``: those of ``folder`` that hold weights, named in the error when it has
    none (a pipeline's components); asked only then."""
    v = f".{variant}" if variant else ""
    looked_for = []
    for stem in _STEMS:
        index, single = f"{stem}.safetensors.index{v}.json", f"{stem}{v}.safetensors"
        looked_for += [index, single]
        if index in names:
            return WeightFiles(folder, folder / index, None)
        if single in names:
            return WeightFiles(folder, None, folder / single)
    if not variant:
        # Checkpoints written by other tools: accept a lone index or a lone file.
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        singles = [n for n in names if n.endswith(".safetensors")]
        if len(indexes) == 1:
            return WeightFiles(folder, folder / indexes[0], None)
        if not indexes and len(singles) == 1:
            return WeightFiles(folder, None, folder / singles[0])
        if indexes or singles:
            raise CheckpointNotFoundError(
                f"{folder}: cannot tell which weights to load; expected one of {looked_for} or a single "
                f"safetensors file or index, found {indexes + singles}",
                path=folder,
            )
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise UnsupportedFormatError(
            f"{folder} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); lazystream reads "
            "safetensors, which can be memory-mapped safely. Convert once with "
            "`Cls.from_pretrained(src).save_pretrained(dst, safe_serialization=True)` and load dst",
            path=folder,
        )
    raise CheckpointNotFoundError(
        f"{folder} holds no safetensors weights; looked for {', '.join(looked_for)}"
        + (f" (variant {variant!r})" if variant else "")
        + _subfolder_hint(subfolders(), pipeline="model_index.json" in names),
        path=folder,
    )


def weight_subfolders(paths: list[str]) -> list[str]:
    """The first-level folders among repo-relative file ``paths`` that hold safetensors weights."""
    return sorted({p.split("/", 1)[0] for p in paths if p.count("/") == 1 and _is_weights(p.rsplit("/", 1)[1])})


def _local_weight_subfolders(folder: Path) -> list[str]:
    found = []
    for sub in sorted(folder.iterdir()):
        with contextlib.suppress(OSError):  # a folder we may not list is not one we could load
            if sub.is_dir() and any(_is_weights(n) for n in os.listdir(sub)):
                found.append(sub.name)
    return found


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json"))


def _subfolder_hint(subfolders: list[str] | tuple[str, ...], pipeline: bool = False) -> str:
    if not subfolders:
        return ""
    # A diffusers pipeline's denoiser is the component people stream first.
    pick = next((s for s in ("transformer", "unet") if s in subfolders), subfolders[0])
    what = "it is a diffusers pipeline whose components" if pipeline else "its subfolders"
    return (f"; {what} {', '.join(subfolders)} hold weights: pass subfolder={pick!r} for one of them"
            + (", or load them all with LazyStreamPipeline" if pipeline else ""))


def is_offline(local_files_only: bool = False) -> bool:
    """Whether the hub must not be asked: ``local_files_only``, or HF_HUB_OFFLINE (or
    TRANSFORMERS_OFFLINE) set now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return local_files_only or env or constants.HF_HUB_OFFLINE


def _resolve_hub(repo_id, subfolder, variant, revision, cache_dir, token, local_files_only) -> WeightFiles:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    where = f"Hugging Face repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline = is_offline(local_files_only)
    with hub_errors(repo_id, revision, cache_dir=cache_dir, offline=offline):
        if offline:
            try:
                root = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
            except LocalEntryNotFoundError as exc:
                # A snapshot lazystream fetched holds only the files it needs; the library
                # calls that incomplete, but select_weights and the index check find what is missing.
                if getattr(exc, "snapshot_path", None) is None:
                    raise
                root = Path(exc.snapshot_path)
            folder = root / prefix
            if not folder.is_dir():
                raise CheckpointNotFoundError(
                    f"{where} has no subfolder {subfolder!r} in the cache" + _subfolder_hint(_local_weight_subfolders(root)),
                    path=folder,
                )
            return select_weights(folder, sorted(os.listdir(folder)), variant,
                                  subfolders=list if subfolder else lambda: _local_weight_subfolders(folder))
        listed = list_hub_files(repo_id, revision, token)
        names = sorted(n[len(prefix):] for n in listed if n.startswith(prefix) and "/" not in n[len(prefix):])
        remote = select_weights(Path(prefix or "."), names, variant,
                                subfolders=list if subfolder else lambda: weight_subfolders(listed))
        # generation_config.json: transformers' from_pretrained reads it beside the config.
        wanted = [prefix + n for n in ("config.json", "generation_config.json") if n in names]
        if remote.index is not None:
            index_name = prefix + remote.index.name
            index_path = Path(hf_hub_download(repo_id, index_name, revision=revision, cache_dir=cache_dir, token=token))
            wanted += [index_name] + [prefix + s for s in _shard_names(index_path)]
        else:
            wanted.append(prefix + remote.single.name)
        root = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=wanted
        ))
    folder = root / prefix
    return WeightFiles(
        folder,
        folder / remote.index.name if remote.index else None,
        folder / remote.single.name if remote.single else None,
    )


def list_hub_files(repo_id: str, revision: str | None = None, token: str | bool | None = None) -> list[str]:
    """Every file of a Hugging Face model repo, repo-relative.

    A first request without retries finds out whether the hub answers at all, and whether
    the repo and revision exist: huggingface_hub retries a listing on network errors for
    about half a minute, which without network only delays the error.
    """
    from huggingface_hub import HfApi, constants

    api = HfApi()
    api.model_info(repo_id, revision=revision, token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    return api.list_repo_files(repo_id, revision=revision, token=token)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, *, cache_dir: str | os.PathLike | None = None,
               offline: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's errors about ``repo_id`` into lazystream's: what was looked
    for, what went wrong, what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"Hugging Face repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    not_folder = f"{repo_id!r} is not a folder, and"
    try:
        yield
    except HFValidationError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid Hugging Face repo id (org/name)", path=repo_id
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if not offline and not isinstance(exc, OfflineModeIsEnabled):
            raise _unreachable(repo_id, where, exc) from exc
        raise CheckpointNotFoundError(
            f"{not_folder} {where} is not in the Hugging Face cache" + (f" at {cache_dir}" if cache_dir else "")
            + " while offline (HF_HUB_OFFLINE or local_files_only); download it first or go online "
            f"(hf download {repo_id}), or pass a local folder",
            path=repo_id,
        ) from None
    except GatedRepoError:
        raise CheckpointNotFoundError(
            f"{not_folder} {where} is gated: accept its conditions at {constants.ENDPOINT}/{repo_id}, then log in "
            "(hf auth login) or pass a token",
            path=repo_id,
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"{not_folder} the Hugging Face Hub has no repo {repo_id!r} (or it is private: log in with hf auth login "
            "or pass a token); check the name or the path",
            path=repo_id,
        ) from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(
            f"{not_folder} {where}: the repo has no such revision (branch, tag or commit); check the revision",
            path=repo_id,
        ) from None
    except HfHubHTTPError as exc:
        raise CheckpointNotFoundError(
            f"{not_folder} {where} could not be fetched: {_first_line(exc)}", path=repo_id
        ) from exc
    except Exception as exc:
        if not isinstance(exc, _network_errors()):
            raise
        raise _unreachable(repo_id, where, exc) from exc


def _unreachable(repo_id: str, where: str, exc: BaseException) -> HubUnreachableError:
    from huggingface_hub import constants

    # huggingface_hub reports a download it could neither fetch nor find in the cache as
    # LocalEntryNotFoundError; the network error is its cause.
    if isinstance(exc, FileNotFoundError):
        exc = exc.__cause__ or exc.__context__ or exc
    return HubUnreachableError(
        f"{repo_id!r} is not a folder, and the Hugging Face Hub ({constants.ENDPOINT}) could not be reached to "
        f"find {where}: {type(exc).__name__}: {_first_line(exc)}. Without network, set "
        "HF_HUB_OFFLINE=1 to use the Hugging Face cache only, or pass a local folder",
        path=repo_id,
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    """The errors of the HTTP client huggingface_hub uses that mean no answer came back
    (httpx2 in huggingface_hub 2, httpx in 1, requests before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        with contextlib.suppress(ImportError):
            errors += [getattr(importlib.import_module(module), name) for name in names]
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _shard_names(index_path: Path) -> list[str]:
    from .checkpoint import read_index

    return sorted(set(read_index(index_path).values()))


# -- single-file checkpoints ----------------------------------------------------------

_HUB_URL_PREFIXES = ("https://huggingface.co/", "huggingface.co/", "hf.co/", "https://hf.co/")


@dataclass(frozen=True)
class SingleWeightsFile(WeightFiles):
    """One weights file on its own (a single-file checkpoint): any config.json beside it
    belongs to something else; the model's config is resolved separately."""

    @property
    def config(self) -> Path | None:
        return None


def resolve_single_file(
    path_or_url: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> SingleWeightsFile:
    """Locate one safetensors file: a local path, or a file of a hub repo named as
    diffusers' ``from_single_file`` names it (``https://huggingface.co/<repo>/blob/main/<file>``),
    taken from the Hugging Face cache when offline.

    Raises:
        CheckpointNotFoundError: no such file, or not in the cache while offline.
        UnsupportedFormatError: a pickle checkpoint (``.ckpt``, ``.pt``, ``.bin``).
    """
    text = os.fspath(path_or_url)
    path = Path(text).expanduser()
    if not path.is_file():
        path = _hub_single_file(text, revision, cache_dir, token, local_files_only)
    if path.suffix in _PICKLE_SUFFIXES:
        raise UnsupportedFormatError(
            f"{path} is a PyTorch pickle checkpoint; lazystream reads safetensors, which can be memory-mapped "
            "safely. Convert it once (load it with the library's from_single_file and save_pretrained it)",
            path=path,
        )
    return SingleWeightsFile(path.parent, None, path)


def hub_file(text: str) -> tuple[str, str]:
    """(repo id, file name) of a Hugging Face file URL as diffusers' from_single_file reads
    it: ``https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>``.

    Raises:
        CheckpointNotFoundError: ``text`` is not such a URL.
    """
    import re

    rest = text
    for prefix in _HUB_URL_PREFIXES:
        rest = rest.replace(prefix, "")
    match = re.fullmatch(r"([^/]+)/([^/]+)/(?:blob/[^/]+/)?(.+)", rest) if rest != text else None
    if match is None:
        raise CheckpointNotFoundError(
            f"{text!r} is neither a file nor a Hugging Face file URL such as "
            "'https://huggingface.co/<owner>/<repo>/blob/main/<file>.safetensors'",
            path=text,
        )
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


def _hub_single_file(text: str, revision, cache_dir, token, local_files_only) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, filename = hub_file(text)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                                    local_files_only=is_offline(local_files_only)))
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{filename} of Hugging Face repo {repo_id!r} is not in the Hugging Face cache"
            + (f" at {cache_dir}" if cache_dir else "")
            + " while offline (HF_HUB_OFFLINE or local_files_only); download it first or go online",
            path=text,
        ) from None
    except HfHubHTTPError as exc:
        raise CheckpointNotFoundError(f"{filename} of Hugging Face repo {repo_id!r} could not be fetched: {exc}",
                                      path=text) from exc
