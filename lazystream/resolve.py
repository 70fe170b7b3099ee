"""Find a checkpoint's weight files: a local folder as is, or a Hugging Face repo id
through huggingface_hub (only the config, the index and the shards it names)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointNotFoundError, UnsupportedFormatError

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
            raise CheckpointNotFoundError(f"{path} has no subfolder {subfolder!r}", path=folder)
        return select_weights(folder, sorted(os.listdir(folder)), variant)
    return _resolve_hub(str(repo), subfolder, variant, revision, cache_dir, token, local_files_only)


def select_weights(folder: Path, names: list[str], variant: str | None) -> WeightFiles:
    """Pick the index or single file among ``names``, as transformers and diffusers name them."""
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
        + (f" (variant {variant!r})" if variant else ""),
        path=folder,
    )


def _offline(local_files_only: bool) -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return local_files_only or env or constants.HF_HUB_OFFLINE


def _resolve_hub(repo_id, subfolder, variant, revision, cache_dir, token, local_files_only) -> WeightFiles:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    where = f"Hugging Face repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline = _offline(local_files_only)
    try:
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
                raise CheckpointNotFoundError(f"{where} has no subfolder {subfolder!r} in the cache", path=folder)
            return select_weights(folder, sorted(os.listdir(folder)), variant)
        listed = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        names = sorted(n[len(prefix):] for n in listed if n.startswith(prefix) and "/" not in n[len(prefix):])
        remote = select_weights(Path(prefix or "."), names, variant)
        wanted = [prefix + "config.json"] if "config.json" in names else []
        if remote.index is not None:
            index_name = prefix + remote.index.name
            index_path = Path(hf_hub_download(repo_id, index_name, revision=revision, cache_dir=cache_dir, token=token))
            wanted += [index_name] + [prefix + s for s in _shard_names(index_path)]
        else:
            wanted.append(prefix + remote.single.name)
        root = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=wanted
        ))
    except HFValidationError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid Hugging Face repo id", path=repo_id
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a folder, and {where} is not in the Hugging Face cache"
            + (f" at {cache_dir}" if cache_dir else "")
            + " while offline (HF_HUB_OFFLINE or local_files_only); download it first or go online",
            path=repo_id,
        ) from None
    except HfHubHTTPError as exc:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a folder, and {where} could not be fetched: {exc}", path=repo_id
        ) from exc
    folder = root / prefix
    return WeightFiles(
        folder,
        folder / remote.index.name if remote.index else None,
        folder / remote.single.name if remote.single else None,
    )


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
                                    local_files_only=_offline(local_files_only)))
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
