"""Moving bytes from the shards into device buffers.

A job is a list of copy runs into one destination buffer (a slot, the resident arena).
Jobs complete in submission order. Three ways for a job's bytes to travel:

  staged      (every job on CUDA in "mmap" and "direct" mode) a ring of small staging
              buffers, one pinned allocation sliced: the job is cut into pieces of at most
              one buffer, several reader threads each fill a piece, and each piece's
              device copy is issued on the copy stream as soon as that piece is full, in
              whatever order the pieces fill. A job's copies are issued only after every
              copy of the jobs before it, so a slot's wait for its previous reader never
              holds up an earlier job; reading runs ahead, into the next jobs, as far as
              the ring has free buffers.
  registered  (mode "register") each shard is mapped a second time, shared and
              read-only, and page-locked for the device (``cudaHostRegister``): the copy
              engine reads the page cache itself, no reader thread touches a byte.
  unstaged    (the CPU device in "mmap" mode) straight from the map into the slot.

Two ways to read the shards into staging (``IOConfig.mode``):
  mmap    copy out of the memory-mapped shards (``numpy.copyto``, GIL released): served
          by the page cache when the checkpoint is cached, else by page faults and the
          kernel's readahead;
  direct  ``preadv`` on ``O_DIRECT`` descriptors into the aligned staging ring, one
          request per reader thread in flight (a queue depth of read_threads): the page
          cache is neither used nor filled, so a checkpoint larger than the RAM does not
          evict every other cached file on each call (and is never served from the cache).

Every ordering runs on the CPU device too (``IOConfig(staged=True)``, or mode "direct"
or "register"); only the thin layer in devices.py differs.
"""

from .config import (AUTO_RING_BYTES, DEFAULT_BLOCK_BYTES, DIRECT_ALIGN, DIRECT_QUEUE_DEPTH, FILL_PER_THREAD,
                     MAX_BUFFER_BYTES, MAX_PIECES_PER_SECOND, MAX_READ_THREADS, MIN_BUFFER_BYTES, MODES, IOConfig, RingLayout, _round_up,
                     ring_layout, usable_cores)
from .direct import READ_CHUNK_BYTES, AlignedRead, DirectReader, Placement, _direct_segments
from .jobs import Ticket, _covered, _segments
from .loader import Loader, _mem_available

__all__ = ["IOConfig", "Loader", "RingLayout", "Ticket", "DirectReader", "AlignedRead", "Placement", "ring_layout",
           "usable_cores", "MODES", "DIRECT_ALIGN", "READ_CHUNK_BYTES"]
