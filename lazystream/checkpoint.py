"""An opened checkpoint: every header validated, a tensor index, each shard mapped
once, and reads of tensor bytes that are zero-copy or coalesced into one copy per run."""

from __future__ import annotations

import json
import mmap
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .errors import (
    ClosedError,
    IndexMismatchError,
    InvalidConfigError,
    LazyStreamError,
    InvalidIndexError,
    MissingShardError,
    ShardChangedError,
)
from .gguf import is_gguf, read_gguf_header
from .header import ShardHeader, TensorRecord, read_header
from .resolve import WeightFiles, resolve
from .source import TensorSource

if TYPE_CHECKING:
    from .plan import TensorPlacement


def _read_json(path: Path, what: str, error: type[LazyStreamError]) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: expected a JSON {what}, found text that does not parse: {str(exc)[:200]}", path=path) from None


def read_config(path: Path) -> dict:
    obj = _read_json(path, "config", InvalidConfigError)
    if not isinstance(obj, dict):
        raise InvalidConfigError(f"{path}: expected a JSON object, found a JSON {type(obj).__name__}", path=path)
    return obj


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name → shard file name) of a safetensors index."""
    obj = _read_json(path, "index", InvalidIndexError)
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidIndexError(
            f"{path}: expected an object with a 'weight_map' of tensor name to shard file name, found {str(obj)[:200]}",
            path=path,
        )
    for name, shard in weight_map.items():
        if Path(shard).name != shard or shard in {"", ".", ".."}:
            raise InvalidIndexError(
                f"{path}: tensor {name!r} maps to {shard!r}; expected a file name in the index's own folder",
                path=path,
                tensor=name,
            )
    return weight_map


@dataclass(frozen=True)
class CopyRun:
    """One contiguous copy: ``nbytes`` from ``offset`` in ``file`` to ``dest_offset``."""

    file: Path
    offset: int
    dest_offset: int
    nbytes: int


class StoredBytes(Protocol):
    """Bytes of a file: a :class:`TensorRecord` or a :class:`~lazystream.source.ByteRun`."""

    file: Path
    offset: int
    nbytes: int


def coalesce(items: Iterable[tuple[StoredBytes, int]]) -> list[CopyRun]:
    """Merge (stored bytes, destination offset) pairs into the fewest contiguous copies.

    Two pieces merge when they are adjacent both in their file and in the destination.
    """
    runs: list[CopyRun] = []
    for rec, dest in sorted(items, key=lambda it: (str(it[0].file), it[0].offset)):
        if rec.nbytes == 0:
            continue
        last = runs[-1] if runs else None
        if (last is not None and last.file == rec.file and last.offset + last.nbytes == rec.offset
                and last.dest_offset + last.nbytes == dest):
            runs[-1] = CopyRun(last.file, last.offset, last.dest_offset, last.nbytes + rec.nbytes)
        else:
            runs.append(CopyRun(rec.file, rec.offset, dest, rec.nbytes))
    return runs


def copy_runs(placements: Iterable[TensorPlacement]) -> list[CopyRun]:
    """The fewest copies that lay each placement's source runs at its buffer offset."""
    return coalesce((run, t.offset + run.dest) for t in placements for run in t.source.runs)


# Linux's value where Python's mmap module does not name it (before 3.13).
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


class Shard:
    """One safetensors file, memory-mapped read-only for its whole life.

    The map is copy-on-write (as ``torch.UntypedStorage.from_file`` maps), so a caller
    who writes into a view gets private pages instead of a crash; the file never changes.
    It reserves no memory up front: only pages written to take any.
    """

    def __init__(self, header: ShardHeader):
        self.path = header.path
        self._file = open(self.path, "rb")
        st = os.fstat(self._file.fileno())
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if st.st_size != header.file_size:
            self._file.close()
            raise ShardChangedError(
                f"{self.path} changed while it was being opened ({header.file_size} bytes, now {st.st_size})",
                path=self.path,
            )
        # MAP_NORESERVE: a private writable map is otherwise charged in full against the
        # commit limit, and one larger than RAM and swap (a 24 GB single-file checkpoint on
        # a 16 GB machine) fails with ENOMEM under the default heuristic overcommit.
        self._mmap = mmap.mmap(self._file.fileno(), 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._map = np.frombuffer(self._mmap, dtype=np.uint8)
        self.bytes = torch.from_numpy(self._map)

    def check_unchanged(self) -> None:
        """Raise ShardChangedError if the mapped file was truncated, rewritten or replaced.

        Reading a mapped page past a truncated end kills the process with SIGBUS; this check
        before each read turns that into an exception naming the file.
        """
        st = os.fstat(self._file.fileno())
        dev, ino, size, mtime = self._identity
        found = None
        if st.st_size != size:
            found = f"it now has {st.st_size} bytes (was {size})"
        elif st.st_mtime_ns != mtime:
            found = "it was rewritten in place (new modification time)"
        else:
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                found = "it was removed"
            else:
                if (now.st_dev, now.st_ino) != (dev, ino):
                    found = "another file was put at its path"
        if found:
            raise ShardChangedError(
                f"{self.path} changed on disk after it was opened: {found}. Reload the model to read the new file",
                path=self.path,
            )

    def close(self) -> None:
        # Views handed out keep the mapping alive through their base; dropping ours is safe.
        self.bytes = None
        self._map = None
        self._mmap = None
        self._file.close()


class Checkpoint(Mapping[str, TensorRecord]):
    """A safetensors checkpoint with every header validated and each shard mapped once.

    Maps tensor name to its :class:`TensorRecord`.

    Example:
        >>> with Checkpoint.open("Qwen/Qwen3-0.6B") as ckpt:
        ...     emb = ckpt.tensor("model.embed_tokens.weight")   # zero-copy view
    """

    def __init__(self, files: WeightFiles):
        self.files = files
        self.folder = files.folder
        self.config: dict | None = read_config(files.config) if files.config else None
        headers = self._read_headers(files)
        self._records: dict[str, TensorRecord] = {}
        if files.index is None:
            self._records = {r.name: r for r in headers[0].records}
        else:
            self._records = self._check_index(files.index, headers)
        self._shards: dict[Path, Shard] | None = {}
        try:
            for h in headers:
                self._shards[h.path] = Shard(h)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        repo: str | os.PathLike,
        *,
        subfolder: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> Checkpoint:
        """Resolve ``repo`` (folder or hub id), validate every header, map every shard.

        Raises:
            CheckpointNotFoundError, UnsupportedFormatError: see :func:`lazystream.resolve.resolve`.
            HeaderError, InvalidIndexError, IndexMismatchError, MissingShardError: a bad file,
                named with ``.path`` (and ``.tensor``), before any tensor byte is read.
        """
        return cls(resolve(repo, subfolder=subfolder, variant=variant, revision=revision,
                           cache_dir=cache_dir, token=token, local_files_only=local_files_only))

    @staticmethod
    def _read_headers(files: WeightFiles) -> list[ShardHeader]:
        if files.index is None:
            return [read_gguf_header(files.single) if is_gguf(files.single) else read_header(files.single)]
        names = sorted(set(read_index(files.index).values()))
        headers = []
        for name in names:
            path = files.folder / name
            if not path.is_file():
                raise MissingShardError(
                    f"{files.index} names shard {name!r}, but {path} does not exist; the download is "
                    "incomplete: fetch the missing file",
                    path=path,
                )
            headers.append(read_header(path))
        return headers

    @staticmethod
    def _check_index(index: Path, headers: list[ShardHeader]) -> dict[str, TensorRecord]:
        by_file = {h.path.name: {r.name: r for r in h.records} for h in headers}
        records = {}
        for name, shard in read_index(index).items():
            rec = by_file[shard].get(name)
            if rec is None:
                raise IndexMismatchError(
                    f"{index} says {shard} holds tensor {name!r}, but that shard's header has no such tensor; "
                    "the index and shards come from different versions: re-download them together",
                    path=index.parent / shard,
                    tensor=name,
                )
            records[name] = rec
        return records

    # -- Mapping ------------------------------------------------------------------------

    def __getitem__(self, name: str) -> TensorRecord:
        return self._records[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._records.values())

    @property
    def shard_paths(self) -> list[Path]:
        return list(self._live_shards())

    # -- reading ------------------------------------------------------------------------

    def _live_shards(self) -> dict[Path, Shard]:
        if self._shards is None:
            raise ClosedError(f"the checkpoint at {self.folder} is closed", path=self.folder)
        return self._shards

    def shard(self, path: Path) -> Shard:
        return self._live_shards()[path]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy CPU view of tensor ``name`` in its mapped shard.

        The view stays valid after :meth:`close`; writing to it changes only private pages.
        """
        return self.view(self._records[name])

    def view(self, rec: TensorRecord) -> torch.Tensor:
        """A zero-copy CPU view of the bytes ``rec`` describes (see :meth:`tensor`)."""
        shard = self.shard(rec.file)
        shard.check_unchanged()
        if rec.nbytes == 0:
            return torch.empty(rec.shape, dtype=rec.dtype)
        numel = rec.nbytes // rec.dtype.itemsize
        return torch.frombuffer(shard._map, dtype=rec.dtype, count=numel, offset=rec.offset).view(rec.shape)

    def read_into(self, items: Iterable[tuple[StoredBytes, int]], dest: torch.Tensor) -> int:
        """Copy each record's (or run's) bytes to ``dest[offset:offset + nbytes]``; return
        bytes copied.

        ``dest`` is a 1-D uint8 CPU tensor (pinned or not). Pieces adjacent in both their
        file and ``dest`` are copied as one run.
        """
        self._live_shards()
        runs = coalesce(items)
        if any(r.dest_offset < 0 for r in runs):
            raise ValueError(f"destination offsets must be >= 0, found {min(r.dest_offset for r in runs)}")
        if runs and (dest.dtype != torch.uint8 or dest.dim() != 1 or dest.device.type != "cpu"):
            raise ValueError(f"dest must be a 1-D uint8 CPU tensor, found {dest.dtype} {tuple(dest.shape)} on {dest.device}")
        end = max((r.dest_offset + r.nbytes for r in runs), default=0)
        if end > dest.numel():
            raise ValueError(f"dest holds {dest.numel()} bytes; the records need {end}")
        for path in {r.file for r in runs}:
            self.shard(path).check_unchanged()
        for run in runs:
            self.copy_run(run, dest)
        return sum(r.nbytes for r in runs)

    def copy_run(self, run: CopyRun, dest: torch.Tensor) -> None:
        """Copy one run with no checks; callers check the shard first (see read_into)."""
        src = self.shard(run.file).bytes
        dest[run.dest_offset:run.dest_offset + run.nbytes].copy_(src[run.offset:run.offset + run.nbytes])

    def close(self) -> None:
        """Unmap every shard. Idempotent."""
        shards, self._shards = self._shards, None
        for shard in (shards or {}).values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._shards is None else f"{len(self._shards)} shard(s)"
        return f"Checkpoint({str(self.folder)!r}, {len(self)} tensors, {self.nbytes / 2**20:.1f} MiB, {state})"


def read_value(ckpt: Checkpoint, source: TensorSource | TensorPlacement) -> torch.Tensor:
    """The stored value of one model tensor on the host, in its stored dtype and the
    model's shape.

    Args:
        ckpt: the open checkpoint the source's runs lie in.
        source: a :class:`~lazystream.source.TensorSource`, or a plan's
            :class:`~lazystream.plan.TensorPlacement` (its ``source``).

    Returns:
        A zero-copy, copy-on-write view of the mapped shard when the value is one
        contiguous run of it (a stored tensor, or a piece of one split along its first
        dimension); otherwise a fresh tensor assembled from the runs (stacked experts, a
        fused projection).

    Raises:
        ShardChangedError: a shard changed on disk since it was opened.
        ClosedError: the checkpoint was closed.

    Example:
        >>> value = read_value(ckpt, streamer.plan.blocks[0].tensors[0])
    """
    source = getattr(source, "source", source)
    if source.numel == 0:
        return torch.empty(source.shape, dtype=source.dtype)
    if len(source.runs) == 1:
        run = source.runs[0]
        shard = ckpt.shard(run.file)
        shard.check_unchanged()
        return torch.frombuffer(shard._map, dtype=source.dtype, count=source.numel, offset=run.offset).view(source.shape)
    out = torch.empty(source.nbytes, dtype=torch.uint8)
    ckpt.read_into(((run, run.dest) for run in source.runs), out)
    return out.view(source.dtype).view(source.shape)
