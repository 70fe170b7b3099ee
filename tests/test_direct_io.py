"""IOConfig(mode="direct"): O_DIRECT reads into the aligned staging ring give exactly the
bytes of the mapped shards, bypass the page cache, and fall back with a warning where
the filesystem refuses O_DIRECT."""

from __future__ import annotations

import errno
import fcntl
import os
import warnings
from pathlib import Path

import pytest
from conftest import qwen3_with_logits, write_odd_checkpoint
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lazystream import Checkpoint, IOConfig, LazyStreamModel, streamer_of
from lazystream.bench.pagecache import cached_fraction, evict
from lazystream.checkpoint import CopyRun, coalesce
from lazystream.devices import device_ops
from lazystream.errors import ShardChangedError
from lazystream.io import DIRECT_ALIGN, Loader, _direct_segments, ring_layout

O_DIRECT = getattr(os, "O_DIRECT", 0)


# -- the layout of aligned reads, checked against a simulated file ---------------------


def _simulate(runs: list[CopyRun], files: dict[Path, bytes], size: int) -> bytearray:
    """Run _direct_segments as the reader would, reading ``files`` (a short read at EOF)."""
    dest = bytearray(max(r.dest_offset + r.nbytes for r in runs))
    usable = size // DIRECT_ALIGN * DIRECT_ALIGN
    for reads, places in _direct_segments(runs, size):
        buf = bytearray(size)
        spans = []
        for r in reads:
            assert r.offset % DIRECT_ALIGN == r.length % DIRECT_ALIGN == r.buf_offset % DIRECT_ALIGN == 0
            assert 0 < r.need <= r.length and r.buf_offset + r.length <= usable
            data = files[r.file][r.offset:r.offset + r.length]
            assert len(data) >= r.need
            buf[r.buf_offset:r.buf_offset + len(data)] = data
            spans.append((r.buf_offset, r.buf_offset + r.length))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "reads overlap in the buffer"
        for p in places:
            dest[p.dest_offset:p.dest_offset + p.nbytes] = buf[p.buf_offset:p.buf_offset + p.nbytes]
    return dest


@st.composite
def _runs(draw):
    n_files = draw(st.integers(1, 3))
    files = {Path(f"/f{i}"): bytes(draw(st.binary(min_size=1, max_size=30_000))) for i in range(n_files)}
    runs, dest = [], 0
    for _ in range(draw(st.integers(1, 8))):
        path = draw(st.sampled_from(sorted(files)))
        size = len(files[path])
        offset = draw(st.integers(0, size - 1))
        nbytes = draw(st.integers(1, size - offset))
        dest += draw(st.integers(0, 300))
        runs.append(CopyRun(path, offset, dest, nbytes))
        dest += nbytes
    return files, runs


@settings(max_examples=300, deadline=None)
@given(case=_runs(), size=st.sampled_from([DIRECT_ALIGN, DIRECT_ALIGN + 100, 3 * DIRECT_ALIGN, 64 * 1024]))
def test_aligned_reads_put_every_run_where_it_belongs(case, size):
    files, runs = case
    got = _simulate(runs, files, size)
    for r in runs:
        assert got[r.dest_offset:r.dest_offset + r.nbytes] == files[r.file][r.offset:r.offset + r.nbytes]


def test_neighbouring_runs_share_one_read():
    f = Path("/f")
    runs = [CopyRun(f, 100, 0, 1000), CopyRun(f, 1200, 2048, 5000), CopyRun(f, 6300, 8192, 100)]
    [(reads, places)] = list(_direct_segments(runs, 64 * 1024))
    assert [(r.offset, r.length) for r in reads] == [(0, 8192)]
    assert [(p.buf_offset, p.dest_offset) for p in places] == [(100, 0), (1200, 2048), (6300, 8192)]


# -- real reads on a checkpoint with tensors at unaligned offsets ----------------------


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory) -> Path:
    """Two shards of uint8 tensors whose sizes put most offsets off any alignment."""
    return write_odd_checkpoint(tmp_path_factory.mktemp("odd"), [[1, 4095, 4097, 10_000, 3, 70_001], [8191, 5, 200_003]],
                                seed=0)


def _read_all(ckpt: Checkpoint, io: IOConfig) -> torch.Tensor:
    items, end = [], 0
    for name in sorted(ckpt):  # not file order: runs are discontiguous and shuffled
        items.append((ckpt[name], end))
        end += ckpt[name].nbytes + 17  # gaps keep the runs apart in the destination
    dest = torch.zeros(end, dtype=torch.uint8)
    loader = Loader(ckpt, device_ops(torch.device("cpu")), io)
    try:
        loader.submit(coalesce(items), dest).wait()
    finally:
        loader.close()
    return dest


def _want(ckpt: Checkpoint) -> torch.Tensor:
    # Unstaged: the runs' bytes and nothing between them (a staged copy carries the gaps'
    # staging garbage, which the async device poisons).
    return _read_all(ckpt, IOConfig(mode="mmap", staged=False))


DIRECT_CONFIGS = {
    "one-thread-inline": IOConfig(mode="direct", threaded=False, read_threads=1),
    "threads-small-ring": IOConfig(mode="direct", staging_bytes=DIRECT_ALIGN * 3, read_threads=3),
    "unaligned-staging-size": IOConfig(mode="direct", staging_bytes=DIRECT_ALIGN * 5 + 123, staging_buffers=3),
    "default-size": IOConfig(mode="direct"),
}


@pytest.mark.parametrize("io", DIRECT_CONFIGS.values(), ids=DIRECT_CONFIGS.keys())
def test_direct_reads_equal_mapped_bytes(odd_checkpoint, io):
    with Checkpoint.open(odd_checkpoint) as ckpt:
        assert any(rec.offset % DIRECT_ALIGN for rec in ckpt.values())
        # Explicit small buffers split tensors over pieces; the sized ring holds the whole job.
        assert io.staging_bytes is None or max(rec.nbytes for rec in ckpt.values()) > io.staging_bytes
        assert torch.equal(_read_all(ckpt, io), _want(ckpt))


def test_direct_read_bypasses_the_page_cache(odd_checkpoint):
    with Checkpoint.open(odd_checkpoint) as ckpt:
        paths = ckpt.shard_paths
        evict(paths)
        if cached_fraction(paths) > 0.2:
            pytest.skip("this filesystem keeps evicted pages cached (posix_fadvise has no effect)")
        with _fd_flags_recorded() as flags:
            _read_all(ckpt, IOConfig(mode="direct"))
        if not any(f & O_DIRECT for f in flags):
            pytest.skip("O_DIRECT is refused here (the fallback test covers that path)")
        # Only the headers, read when the checkpoint was opened, may be cached.
        assert cached_fraction(paths) < 0.2


class _fd_flags_recorded:
    """Records the flags of every descriptor lazystream reads with."""

    def __enter__(self) -> list[int]:
        self.flags: list[int] = []
        self._preadv = os.preadv

        def preadv(fd, buffers, offset):
            self.flags.append(fcntl.fcntl(fd, fcntl.F_GETFL))
            return self._preadv(fd, buffers, offset)

        os.preadv = preadv
        return self.flags

    def __exit__(self, *exc) -> None:
        os.preadv = self._preadv


def test_refused_open_falls_back_to_pread_with_one_warning(odd_checkpoint, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    with Checkpoint.open(odd_checkpoint) as ckpt:
        with pytest.warns(RuntimeWarning, match=r"refused to open it with O_DIRECT.*plain pread") as record:
            got = _read_all(ckpt, IOConfig(mode="direct"))
        assert len(record) == 1
        monkeypatch.setattr(os, "open", real_open)
        assert torch.equal(got, _want(ckpt))


@pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")
def test_refused_read_falls_back_to_pread_with_one_warning(odd_checkpoint, monkeypatch):
    real_preadv = os.preadv

    def refuse_direct(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refuse_direct)
    with Checkpoint.open(odd_checkpoint) as ckpt:
        with pytest.warns(RuntimeWarning, match="refused an O_DIRECT read") as record:
            got = _read_all(ckpt, IOConfig(mode="direct", staging_bytes=DIRECT_ALIGN * 4))
        assert len(record) == 1
        monkeypatch.setattr(os, "preadv", real_preadv)
        assert torch.equal(got, _want(ckpt))


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_tmpfs_checkpoint_reads_through_the_fallback(odd_checkpoint, tmp_path):
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        folder = Path(shutil.copytree(odd_checkpoint, Path(shm) / "ckpt"))
        with Checkpoint.open(folder) as ckpt:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                got = _read_all(ckpt, IOConfig(mode="direct"))
            assert torch.equal(got, _want(ckpt))
            if not record:
                pytest.skip("this kernel's tmpfs accepts O_DIRECT (Linux >= 6.6)")
            assert len(record) == 1 and "O_DIRECT" in str(record[0].message)


def test_truncated_shard_raises_naming_the_file(odd_checkpoint, tmp_path):
    import shutil

    folder = Path(shutil.copytree(odd_checkpoint, tmp_path / "ckpt"))
    with Checkpoint.open(folder) as ckpt:
        victim = ckpt.shard_paths[-1]
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
        with pytest.raises(ShardChangedError, match=victim.name) as info:
            _read_all(ckpt, IOConfig(mode="direct"))
        assert info.value.path == str(victim)


def test_close_closes_every_descriptor(odd_checkpoint):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with Checkpoint.open(odd_checkpoint) as ckpt:
        before = open_fds()
        loader = Loader(ckpt, device_ops(torch.device("cpu")), IOConfig(mode="direct"))
        assert open_fds() == before + len(ckpt.shard_paths)
        loader.close()
        loader.close()
        assert open_fds() == before


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "odirect"}, "mode must be one of"),
    ({"mode": "direct", "staged": False}, "aligned staging ring"),
    ({"read_threads": 0}, "read_threads must be >= 1"),
    ({"staging_bytes": 100}, "staging_bytes must be >= 4096"),
    ({"staging_buffers": 0}, "staging_buffers must be >= 1"),
    ({"mode": "register", "staged": True}, "without staging"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IOConfig(**kwargs)


# -- a whole model, streamed with direct reads ----------------------------------------


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return qwen3_with_logits(tmp_path_factory.mktemp("qwen3-direct"), 11, seed=1)


@pytest.mark.parametrize("keep_gpu, io", [
    (0, IOConfig(mode="direct")),
    (2, IOConfig(mode="direct")),
    (4, IOConfig(mode="direct")),
    (1, IOConfig(mode="direct", staging_bytes=8192, threaded=False)),
], ids=["keep0", "keep2", "keep4", "keep1-8k-staging-inline"])
def test_direct_mode_logits_equal_library(qwen3, keep_gpu, io):
    path, ids, want = qwen3
    model = LazyStreamModel.from_pretrained(path, keep_gpu, io=io)
    streamer = streamer_of(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        with streamer.session():
            for _ in range(2):
                assert torch.equal(model(ids).logits, want)
    stats = streamer.stats()
    assert stats.staging_bytes == ring_layout(io, streamer.plan.slot_bytes).nbytes
    assert stats.last_call.blocks_streamed == 4 - keep_gpu
    streamer.close()
