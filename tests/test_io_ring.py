"""The staging ring of lazystream.io on the CPU device: several reader threads filling
small buffers of one allocation, each piece's copy issued as soon as it is full, jobs
completing in submission order, reading ahead into the next job, failures reaching the
caller named, and every device call made on a thread bound to the device."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import cpu_device_class, write_odd_checkpoint
import torch

from lazystream import Checkpoint, IOConfig, LazyStreamModel, streamer_of
from lazystream.checkpoint import CopyRun, coalesce
from lazystream.devices import HostDevice, device_ops
from lazystream.errors import ShardChangedError, StagingMemoryError
from lazystream.io import DIRECT_ALIGN, Loader, RingLayout, ring_layout

MIB = 2**20


# -- sizing -----------------------------------------------------------------------------


def test_ring_for_real_blocks_keeps_up_with_pcie5():
    # A Z-Image transformer block in bfloat16 (about 360 MB), 50 GB/s of pinned H2D, 16 cores.
    layout = ring_layout(IOConfig(), 360_000_000, h2d=50e9, cores=16)
    assert layout == RingLayout(buffers=16, buffer_bytes=16 * MIB, threads=8)
    assert layout.nbytes == 256 * MIB  # the cap, a power of two: no pinned rounding waste
    # PCIe 4 (25 GB/s) needs fewer readers; a 48 MiB block smaller pieces, a ring of a block and more.
    assert ring_layout(IOConfig(), 48 * MIB, h2d=25e9, cores=16) == RingLayout(32, 4 * MIB, 5)
    # Few cores: the model's own thread keeps one.
    assert ring_layout(IOConfig(), 48 * MIB, h2d=50e9, cores=4).threads == 3


@pytest.mark.parametrize("h2d", [12e9, 25e9, 55e9])
def test_pieces_are_large_enough_for_the_issue_path(h2d):
    from lazystream.io import MAX_PIECES_PER_SECOND

    for block in (4 * MIB, 16 * MIB, 48 * MIB, 360_000_000):
        layout = ring_layout(IOConfig(), block, h2d=h2d, cores=16)
        assert h2d / layout.buffer_bytes <= MAX_PIECES_PER_SECOND or layout.buffer_bytes >= block
    # PCIe 5 and a 16 MiB block: 4 MiB pieces, not the 1 MiB one per reader thread would give.
    assert ring_layout(IOConfig(), 16 * MIB, h2d=55e9, cores=16).buffer_bytes == 4 * MIB


def test_ring_sizes_on_the_cpu_and_for_tiny_and_explicit_settings():
    assert ring_layout(IOConfig(), 48 * MIB, cores=2) == RingLayout(8, 8 * MIB, 2)
    tiny = ring_layout(IOConfig(), 100_000, cores=2)
    assert tiny == RingLayout(4, 102_400, 2)  # the block rounded up to a page: no more than it needs
    assert ring_layout(IOConfig(mode="direct"), 48 * MIB, cores=2).threads == 8  # a queue depth of 8
    explicit = IOConfig(staging_bytes=8192, staging_buffers=3, read_threads=5)
    assert ring_layout(explicit, 48 * MIB, h2d=50e9, cores=16) == RingLayout(3, 8192, 5)
    assert ring_layout(IOConfig(), 0, cores=2).buffer_bytes == 16 * MIB  # nothing streamed: sized for loading


# -- a checkpoint whose tensors sit at odd offsets ----------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    return write_odd_checkpoint(tmp_path_factory.mktemp("odd-ring"),
                                [[1, 4095, 4097, 10_000, 3, 70_001], [8191, 5, 200_003, 33_333]], seed=3)


def _jobs(ckpt: Checkpoint, n: int) -> list[tuple[list[CopyRun], int]]:
    """``n`` jobs over the checkpoint's tensors, in shuffled order with gaps in between."""
    names = sorted(ckpt)
    random.Random(n).shuffle(names)
    jobs = []
    for part in range(n):
        items, end = [], 0
        for name in names[part::n]:
            items.append((ckpt[name], end))
            end += ckpt[name].nbytes + 17
        jobs.append((coalesce(items), end))
    return jobs


def _expected(ckpt: Checkpoint, runs: list[CopyRun], size: int) -> torch.Tensor:
    dest = torch.zeros(size, dtype=torch.uint8)
    for run in runs:
        dest[run.dest_offset:run.dest_offset + run.nbytes] = ckpt.shard(run.file).bytes[run.offset:run.offset + run.nbytes]
    return dest


def _checked(dest: torch.Tensor, want: torch.Tensor, runs: list[CopyRun]) -> bool:
    return all(torch.equal(dest[r.dest_offset:r.dest_offset + r.nbytes], want[r.dest_offset:r.dest_offset + r.nbytes])
               for r in runs)


class Recording(cpu_device_class()):
    """The CPU device, recording which thread made each device call and in what order."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.bound: set[int] = set()
        self.unbound_calls: list[str] = []
        self.copies: list[int] = []  # data_ptr of the destination buffer of each copy
        self.lock = threading.Lock()

    def _check(self, what: str) -> None:
        if threading.get_ident() not in self.bound:
            self.unbound_calls.append(f"{what} on {threading.current_thread().name}")

    def bind_thread(self) -> None:
        self.bound.add(threading.get_ident())

    def copy_in(self, dst, src):
        self._check("copy_in")
        with self.lock:
            self.copies.append(dst.untyped_storage().data_ptr())
        super().copy_in(dst, src)

    def copy_mark(self):
        self._check("copy_mark")
        return super().copy_mark()

    def copy_waits_for(self, marker) -> None:
        self._check("copy_waits_for")


RING_CONFIGS = {
    "mmap-1-thread": IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 3, read_threads=1),
    "mmap-4-threads": IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 3, staging_buffers=5, read_threads=4),
    "mmap-inline": IOConfig(staged=True, threaded=False, staging_bytes=DIRECT_ALIGN * 2 + 7, read_threads=3),
    "mmap-sized": IOConfig(staged=True),
    "direct-3-threads": IOConfig(mode="direct", staging_bytes=DIRECT_ALIGN * 4, read_threads=3),
    "direct-inline": IOConfig(mode="direct", threaded=False, staging_bytes=DIRECT_ALIGN * 5 + 123),
    "register": IOConfig(mode="register"),
    "register-inline": IOConfig(mode="register", threaded=False),
}


@pytest.fixture
def jittered_reads(monkeypatch):
    """Each piece's read takes a random few milliseconds, so pieces finish out of order."""
    original, rng = Loader._read, random.Random(0)

    def slow(self, piece, buf):
        time.sleep(rng.random() * 0.004)
        return original(self, piece, buf)

    monkeypatch.setattr(Loader, "_read", slow)


@pytest.mark.parametrize("io", RING_CONFIGS.values(), ids=RING_CONFIGS.keys())
def test_pieces_filled_by_several_threads_land_bit_identically_and_in_job_order(odd, io, jittered_reads):
    with Checkpoint.open(odd) as ckpt:
        ops = Recording()
        loader = Loader(ckpt, ops, io)
        jobs = _jobs(ckpt, 4)
        dests = [torch.zeros(size, dtype=torch.uint8) for _, size in jobs]
        try:
            tickets = [loader.submit(runs, dest) for (runs, _), dest in zip(jobs, dests)]
            for k, ticket in enumerate(tickets):
                ticket.wait()
                assert all(t.done.is_set() for t in tickets[:k]), "a job finished before one submitted earlier"
        finally:
            loader.close()
        for (runs, size), dest in zip(jobs, dests):
            assert _checked(dest, _expected(ckpt, runs, size), runs)
        # Every copy of job k is issued before any copy of job k + 1.
        order = [[d.untyped_storage().data_ptr() for d in dests].index(p) for p in ops.copies]
        assert order == sorted(order) and set(order) == set(range(len(jobs)))
        assert ops.unbound_calls == []  # on CUDA: no device switch, no context on device 0
        assert loader.bytes_read == sum(sum(r.nbytes for r in runs) for runs, _ in jobs)
        if io.staging_bytes is not None:
            assert len(ops.copies) > len(jobs)  # the jobs went in several pieces


def test_ring_is_one_allocation_sliced(odd, monkeypatch):
    calls: list[int] = []
    original = HostDevice.staging

    def counting(self, nbytes):
        calls.append(nbytes)
        return original(self, nbytes)

    monkeypatch.setattr(HostDevice, "staging", counting)
    with Checkpoint.open(odd) as ckpt:
        loader = Loader(ckpt, device_ops(torch.device("cpu")), IOConfig(staged=True, staging_bytes=8192,
                                                                         staging_buffers=6))
        loader.allocate(100_000)
        assert calls == [6 * 8192]
        assert loader.staging_bytes == 6 * 8192
        storages = {buf.untyped_storage().data_ptr() for buf in loader._buffers}
        assert len(storages) == 1
        loader.close()
        assert loader.staging_bytes == 0


def test_direct_ring_buffers_are_aligned_even_with_an_unaligned_size(odd):
    with Checkpoint.open(odd) as ckpt:
        loader = Loader(ckpt, device_ops(torch.device("cpu")),
                        IOConfig(mode="direct", staging_bytes=DIRECT_ALIGN + 100, staging_buffers=3))
        loader.allocate(100_000)
        assert all(buf.data_ptr() % DIRECT_ALIGN == 0 for buf in loader._buffers)
        assert [buf.numel() for buf in loader._buffers] == [DIRECT_ALIGN + 100] * 3
        loader.close()


def test_a_full_piece_is_copied_before_the_rest_of_its_job_is_read(odd, monkeypatch):
    """The first piece's copy does not wait for the whole block: the last piece's read
    holds until a copy has been issued (and fails the test if none comes)."""
    with Checkpoint.open(odd) as ckpt:
        ops = Recording()
        loader = Loader(ckpt, ops, IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 4, read_threads=2))
        runs, size = _jobs(ckpt, 1)[0]
        original, reads = Loader._read, []

        def read(self, piece, buf):
            reads.append(piece)
            if len(reads) > 1 and not ops.copies:
                deadline = time.monotonic() + 10
                while not ops.copies and time.monotonic() < deadline:
                    time.sleep(0.001)
            return original(self, piece, buf)

        monkeypatch.setattr(Loader, "_read", read)
        dest = torch.zeros(size, dtype=torch.uint8)
        start = time.monotonic()
        loader.submit(runs, dest).wait()
        loader.close()
        assert time.monotonic() - start < 10, "no piece was copied before the others were read"
        assert len(reads) > 2
        assert _checked(dest, _expected(ckpt, runs, size), runs)


def test_readers_fill_the_next_job_while_an_earlier_one_waits(odd, monkeypatch):
    """Reading runs ahead into the next job; its copies still wait for the earlier job's."""
    with Checkpoint.open(odd) as ckpt:
        ops = Recording()
        loader = Loader(ckpt, ops, IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 8, staging_buffers=8,
                                            read_threads=3))
        (first_runs, first_size), (second_runs, second_size) = _jobs(ckpt, 2)
        first = torch.zeros(first_size, dtype=torch.uint8)
        second = torch.zeros(second_size, dtype=torch.uint8)
        release, second_read, calls = threading.Event(), threading.Event(), []
        original = Loader._read

        def in_second(piece) -> bool:
            return any(r.file == s.file and s.offset <= r.offset < s.offset + s.nbytes
                       for r in piece.reads for s in second_runs)

        def read(self, piece, buf):
            calls.append(piece)
            if len(calls) == 1:
                release.wait(10)  # the first job's first piece is slow
            elif in_second(piece) and not release.is_set():
                second_read.set()
            return original(self, piece, buf)

        monkeypatch.setattr(Loader, "_read", read)
        t1 = loader.submit(first_runs, first)
        t2 = loader.submit(second_runs, second)
        assert second_read.wait(10), "no piece of the second job was read while the first job waited"
        assert not t1.done.is_set() and not t2.done.is_set()
        assert all(p != second.untyped_storage().data_ptr() for p in ops.copies)  # its copies wait
        release.set()
        t2.wait()
        assert t1.done.is_set()
        loader.close()
        assert _checked(first, _expected(ckpt, first_runs, first_size), first_runs)
        assert _checked(second, _expected(ckpt, second_runs, second_size), second_runs)
        order = [0 if p == first.untyped_storage().data_ptr() else 1 for p in ops.copies]
        assert order == sorted(order)


# -- failures ---------------------------------------------------------------------------


class FailingStaging(cpu_device_class()):
    """Staging allocations above ``limit`` bytes fail as cudaHostAlloc's do."""

    def __init__(self, limit: int):
        super().__init__(torch.device("cpu"))
        self.limit = limit

    def staging(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.limit:
            raise RuntimeError("CUDA error: out of memory")
        return super().staging(nbytes)


def test_pinned_allocation_failure_takes_a_smaller_ring_with_one_warning(odd):
    with Checkpoint.open(odd) as ckpt:
        loader = Loader(ckpt, FailingStaging(limit=4 * 2 * MIB), IOConfig(staged=True))
        with pytest.warns(RuntimeWarning, match=r"could not be allocated \(CUDA error: out of memory\).*smaller ring")\
                as record:
            loader.allocate(48 * MIB)
        assert len(record) == 1
        assert loader.staging_bytes == 4 * 2 * MIB
        runs, size = _jobs(ckpt, 1)[0]
        dest = torch.zeros(size, dtype=torch.uint8)
        loader.submit(runs, dest).wait()
        loader.close()
        assert _checked(dest, _expected(ckpt, runs, size), runs)


def test_pinned_allocation_failure_of_an_explicit_ring_names_the_size(odd):
    with Checkpoint.open(odd) as ckpt:
        loader = Loader(ckpt, FailingStaging(limit=MIB), IOConfig(staged=True, staging_bytes=MIB, staging_buffers=4))
        with pytest.raises(StagingMemoryError, match=r"could not allocate 4194304 bytes \(4\.00 MiB\) of host staging "
                                                      r"memory \(4 buffers of 1048576 bytes\).*out of memory") as info:
            loader.allocate(48 * MIB)
        assert info.value.path == str(odd)
        loader.close()


def test_read_error_reaches_the_caller_as_itself_naming_shard_and_tensor(odd, monkeypatch):
    real_preadv = os.preadv
    with Checkpoint.open(odd) as ckpt:
        victim = ckpt["t1_2"]
        raised: list[OSError] = []

        def failing(fd, buffers, offset):
            if os.path.realpath(f"/proc/self/fd/{fd}") == str(victim.file.resolve()) and \
                    offset <= victim.offset + 10 < offset + sum(len(b) for b in buffers):
                raised.append(OSError(errno.EIO, "Input/output error"))
                raise raised[-1]
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", failing)
        loader = Loader(ckpt, device_ops(torch.device("cpu")), IOConfig(mode="direct", staging_bytes=DIRECT_ALIGN * 4))
        runs = coalesce([(ckpt[name], i * 300_000) for i, name in enumerate(sorted(ckpt))])
        ticket = loader.submit(runs, torch.zeros(len(ckpt) * 300_000, dtype=torch.uint8))
        with pytest.raises(OSError) as info:
            ticket.wait()
        loader.close()
        assert raised and info.value.errno == errno.EIO
        assert info.value.filename == str(victim.file)
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert str(victim.file) in notes and "t1_2" in notes


def test_mapped_read_error_names_the_tensor_and_later_jobs_still_run(odd, monkeypatch):
    import numpy as np

    with Checkpoint.open(odd) as ckpt:
        loader = Loader(ckpt, device_ops(torch.device("cpu")), IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 4))
        victim = ckpt["t0_5"]
        bad_at = ckpt.shard(victim.file).bytes.data_ptr() + victim.offset + 100
        real_copyto, raised = np.copyto, []

        def copyto(dst, src, **kwargs):
            if src.ctypes.data <= bad_at < src.ctypes.data + src.nbytes:
                raised.append(OSError(errno.EIO, "Input/output error"))
                raise raised[-1]
            return real_copyto(dst, src, **kwargs)

        monkeypatch.setattr(np, "copyto", copyto)
        t_bad = loader.submit(coalesce([(victim, 0)]), torch.zeros(victim.nbytes, dtype=torch.uint8))
        dest = torch.zeros(ckpt["t1_0"].nbytes, dtype=torch.uint8)
        t_good = loader.submit(coalesce([(ckpt["t1_0"], 0)]), dest)
        with pytest.raises(OSError) as info:
            t_bad.wait()
        assert raised and info.value is raised[0]  # the original error, not a wrapper
        notes = "\n".join(info.value.__notes__)
        assert str(victim.file) in notes and "t0_5" in notes
        t_good.wait()
        loader.close()
        assert torch.equal(dest, ckpt.tensor("t1_0"))


def test_shard_changed_before_a_job_names_its_tensors(odd, tmp_path):
    import shutil

    folder = Path(shutil.copytree(odd, tmp_path / "ckpt"))
    with Checkpoint.open(folder) as ckpt:
        loader = Loader(ckpt, device_ops(torch.device("cpu")), IOConfig(staged=True))
        victim = ckpt["t1_2"]
        os.utime(victim.file, ns=(0, 0))  # rewritten in place, as far as the check can tell
        ticket = loader.submit(coalesce([(victim, 0)]), torch.zeros(victim.nbytes, dtype=torch.uint8))
        with pytest.raises(ShardChangedError, match="changed on disk") as info:
            ticket.wait()
        loader.close()
        assert info.value.path == str(victim.file) and info.value.tensor == "t1_2"


# -- timing figures ---------------------------------------------------------------------


def test_ticket_times_fill_and_copy_separately(odd):
    with Checkpoint.open(odd) as ckpt:
        loader = Loader(ckpt, device_ops(torch.device("cpu")), IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 4,
                                                                        read_threads=3))
        runs, size = _jobs(ckpt, 1)[0]
        ticket = loader.submit(runs, torch.zeros(size, dtype=torch.uint8))
        ticket.wait()
        loader.close()
        nbytes = sum(r.nbytes for r in runs)
        assert ticket.fill_bytes == nbytes and ticket.fill_seconds > 0
        copied, seconds = ticket.copy_time(wait=False)
        assert copied >= nbytes and seconds > 0  # a piece's copy includes the gaps between its runs
        assert len(ticket.copy_marks) > 1  # one per piece


def test_union_of_fill_spans_counts_overlap_once():
    from lazystream.io import _covered

    assert _covered([(0.0, 2.0, 1), (1.0, 3.0, 1), (5.0, 6.0, 1), (5.5, 5.7, 1)]) == pytest.approx(4.0)
    assert _covered([]) == 0.0


def test_close_on_a_reader_thread_does_not_deadlock(odd, monkeypatch):
    """Garbage collection may run a model's finalizer on one of the loader's own threads."""
    with Checkpoint.open(odd) as ckpt:
        loader = Loader(ckpt, device_ops(torch.device("cpu")), IOConfig(staged=True, staging_bytes=DIRECT_ALIGN * 4))
        original = Loader._read

        def read(self, piece, buf):
            self.close()
            return original(self, piece, buf)

        monkeypatch.setattr(Loader, "_read", read)
        runs, size = _jobs(ckpt, 1)[0]
        ticket = loader.submit(runs, torch.zeros(size, dtype=torch.uint8))
        ticket.wait()
        deadline = time.monotonic() + 10
        while loader.staging_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loader.staging_bytes == 0  # closed, from a thread of its own
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loader.close()  # idempotent


def test_streamed_model_reports_fill_copy_and_stall_separately(tmp_path):
    from conftest import qwen3_with_logits

    path, ids, want = qwen3_with_logits(tmp_path, 5, seed=4)
    model = LazyStreamModel.from_pretrained(path, 1, io=IOConfig(staged=True, read_threads=2))
    streamer = streamer_of(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    call = streamer.stats().last_call
    assert call.blocks_streamed == 3 and call.fill_bytes == call.bytes_streamed
    assert call.h2d_bytes >= call.bytes_streamed and call.h2d_gb_per_s > 0 and call.fill_gb_per_s > 0
    text = str(streamer.stats())
    assert "on-demand loads" in text and "waited" in text and "device copy" in text and "fill" in text
    assert " stalls (" not in text
    streamer.close()
