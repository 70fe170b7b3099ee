"""How bytes travel (:class:`IOConfig`) and the staging ring's shape, sized from the block
and the bandwidths (:func:`ring_layout`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

MODES = ("mmap", "direct", "register")
# O_DIRECT needs the file offset, the length and the buffer address aligned to the
# device's logical block size (512 or 4096 bytes); 4096 satisfies both.
DIRECT_ALIGN = 4096

# -- sizing the ring (IOConfig fields left at None) ------------------------------------
# What one reader thread copies from the page cache into pinned memory, at the low end of
# what servers reach (6-12 GB/s): it sets how many threads keep up with the copy engine.
FILL_PER_THREAD = 6e9
MAX_READ_THREADS = 8
# NVMe drives reach their full bandwidth with about 8 requests in flight.
DIRECT_QUEUE_DEPTH = 8
# A piece of at least 1 MiB keeps the per-copy cost (~10 us to launch and set up the DMA)
# under 20% of the copy at 50 GB/s; at most 16 MiB, so the first copy of a block starts
# early and a block spreads over every reader.
MIN_BUFFER_BYTES = 2**20
MAX_BUFFER_BYTES = 16 * 2**20
# The loader issues each piece in Python under one lock (about 28 us a piece on a server
# core, see tools/bench_issue.py): pieces large enough that the copy engine needs at most
# this many a second leave that path more than half idle (PCIe 5 at 55 GB/s: 4 MiB).
MAX_PIECES_PER_SECOND = 16_000
# The most pinned memory a ring takes unless asked for more: reading a whole block ahead
# while its slot is still busy helps only where the readers are slower than the copy
# engine, and pinned host memory is scarce on the machines lazystream is for.
AUTO_RING_BYTES = 256 * 2**20
# The block size assumed for a plan with no streamed block (the ring then only loads).
DEFAULT_BLOCK_BYTES = 64 * 2**20



@dataclass(frozen=True)
class IOConfig:
    """How bytes travel. Defaults suit both devices; tests flip them to cover every path.

    Args:
        threaded: ``submit`` returns at once and a dispatcher thread cuts the job into
            pieces (else ``submit`` returns when the job's copies are issued). Reader
            threads fill the staging ring either way.
        staged: go through the staging ring; None means on CUDA (and the asynchronous test
            device), or in "direct" mode.
        staging_bytes: size of each staging buffer (one piece of a job); None: from the
            block size, between 1 and 16 MiB.
        staging_buffers: buffers in the ring; None: two per reader thread, more (up to
            256 MiB in all) so the readers can fill most of the next block ahead.
        mode: "mmap" (copy out of the mapped shards, through the page cache), "direct"
            (O_DIRECT reads that bypass it; always staged, on the CPU device too) or
            "register" (CUDA: the shard mappings page-locked, the copy engine reads the
            page cache directly; every shard's pages stay locked in RAM while loaded, so
            the RAM must hold the checkpoint).
        read_threads: reader threads filling the ring; None: enough to keep up with the
            probed host-to-device bandwidth (at most 8 and the cores less one), or 8 in
            "direct" mode (its queue depth).

    Example:
        >>> LazyStreamModel.from_pretrained(repo, keep_gpu=8, io=IOConfig(mode="direct"))
    """

    threaded: bool = True
    staged: bool | None = None
    staging_bytes: int | None = None
    staging_buffers: int | None = None
    mode: str = "mmap"
    read_threads: int | None = None

    def __post_init__(self) -> None:
        if self.staging_bytes is not None and self.staging_bytes < DIRECT_ALIGN:
            raise ValueError(f"IOConfig.staging_bytes must be >= {DIRECT_ALIGN}, got {self.staging_bytes}")
        if self.staging_buffers is not None and self.staging_buffers < 1:
            raise ValueError(f"IOConfig.staging_buffers must be >= 1, got {self.staging_buffers}")
        if self.mode not in MODES:
            raise ValueError(f"IOConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.read_threads is not None and self.read_threads < 1:
            raise ValueError(f"IOConfig.read_threads must be >= 1, got {self.read_threads}")
        if self.mode == "direct" and self.staged is False:
            raise ValueError("IOConfig(mode='direct') reads into the aligned staging ring: "
                             "leave staged at None or set True")
        if self.mode == "register" and self.staged:
            raise ValueError("IOConfig(mode='register') copies from the registered shard mappings without "
                             "staging: leave staged at None")


@dataclass(frozen=True)
class RingLayout:
    """The staging ring: ``buffers`` of ``buffer_bytes`` each, filled by ``threads`` readers."""

    buffers: int
    buffer_bytes: int
    threads: int

    @property
    def nbytes(self) -> int:
        return self.buffers * self.buffer_bytes


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ring_layout(config: IOConfig, block_bytes: int, *, h2d: float | None = None,
                cores: int | None = None) -> RingLayout:
    """The ring for blocks of up to ``block_bytes``: the fields ``config`` leaves at None
    sized from the block and the bandwidths (``h2d``: pinned host-to-device bytes/s, None
    on the CPU device).

    Threads: enough that their fills (FILL_PER_THREAD each) keep up with the copy engine,
    at most MAX_READ_THREADS and the cores less one (the model's own host thread needs
    one); on the CPU device 2; in "direct" mode DIRECT_QUEUE_DEPTH. Buffers: a power of
    two between 1 and 16 MiB, about a block over twice the threads, so every reader has a
    piece of each block and one waits to be copied while the next fills; at least large
    enough that the copy engine needs at most MAX_PIECES_PER_SECOND. Ring: two
    buffers per thread at least, up to a block and a piece per thread beyond it within
    AUTO_RING_BYTES; a power of two in all, as torch rounds pinned allocations up to one.
    """
    cores = cores or usable_cores()
    block = block_bytes or DEFAULT_BLOCK_BYTES
    if config.read_threads is not None:
        threads = config.read_threads
    elif config.mode == "direct":
        threads = DIRECT_QUEUE_DEPTH
    elif config.mode == "register":
        threads = 1  # issues copies only; nothing to read
    else:
        wanted = math.ceil(h2d / FILL_PER_THREAD) if h2d else 2
        threads = max(1, min(wanted, MAX_READ_THREADS, cores - 1 if cores > 2 else cores))
    if config.staging_bytes is not None:
        size = config.staging_bytes
    elif block <= MIN_BUFFER_BYTES:
        size = _round_up(block, DIRECT_ALIGN)
    else:
        size = 1 << max(0, (block // (2 * threads)).bit_length() - 1)
        least = max(MIN_BUFFER_BYTES, 1 << (math.ceil(h2d / MAX_PIECES_PER_SECOND) - 1).bit_length()) if h2d \
            else MIN_BUFFER_BYTES
        size = min(MAX_BUFFER_BYTES, max(least, size), _round_up(block, DIRECT_ALIGN))
    if config.staging_buffers is not None:
        buffers = config.staging_buffers
    else:
        floor = 2 * threads
        buffers = max(floor, min(math.ceil(block / size) + threads, AUTO_RING_BYTES // size))
        if size & (size - 1) == 0:
            buffers = 1 << (buffers - 1).bit_length()
    return RingLayout(buffers, size, threads)



def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
