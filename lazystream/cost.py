"""The cost model: predicted time per call of a placement, and the placement that
minimizes it.

A call runs the blocks in execution order. A streamed block's bytes cross one copy
engine in order; a copy starts when the engine is free and a slot is free (the block
``prefetch`` streamed blocks earlier has finished computing); a block computes when
the previous one has finished and, if streamed, its copy has landed. Inside a session
the copies of the next call start as soon as slots free up at the end of this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Seconds per block (execution order) and outside the blocks, for one call."""

    block_compute: tuple[float, ...]
    block_transfer: tuple[float, ...]  # if the block were streamed
    other_compute: float = 0.0  # embeddings, head: before the first block in this model


def simulate(timing: Timing, resident: set[int], prefetch: int, *, session: bool = True) -> float:
    """Predicted seconds per call in steady state (the second of two calls)."""
    n = len(timing.block_compute)
    copy_free = 0.0  # when the copy engine is next free
    slot_free: list[float] = []  # when each streamed block's slot was released, in order
    clock = 0.0
    duration = 0.0
    for call in range(2):
        start = clock
        if not session:
            copy_free = max(copy_free, start)
        clock += timing.other_compute
        for i in range(n):
            if i in resident:
                clock += timing.block_compute[i]
                continue
            slot_ready = slot_free[-prefetch] if len(slot_free) >= prefetch else 0.0
            copy_start = max(copy_free, slot_ready, 0.0 if session else start)
            copy_free = copy_start + timing.block_transfer[i]
            clock = max(clock, copy_free) + timing.block_compute[i]
            slot_free.append(clock)
        duration = clock - start
    return duration


def spread(n_blocks: int, keep: int) -> set[int]:
    n = min(keep, n_blocks)
    return {i * n_blocks // n for i in range(n)} if n else set()


def first(n_blocks: int, keep: int) -> set[int]:
    return set(range(min(keep, n_blocks)))


def cheapest_resident_set(timing: Timing, keep: int, prefetch: int, block_bytes: Sequence[int],
                          *, session: bool = True) -> set[int]:
    """The ``keep`` blocks to make resident for the lowest predicted time.

    Greedy: repeatedly make resident the block that saves the most predicted time per
    byte of device memory; then keep whichever of that, "spread" and "first" predicts
    fastest, so the choice is never predicted slower than either.
    """
    n = len(timing.block_compute)
    keep = min(keep, n)
    chosen: set[int] = set()
    while len(chosen) < keep:
        base = simulate(timing, chosen, prefetch, session=session)
        best = max(
            (i for i in range(n) if i not in chosen),
            key=lambda i: ((base - simulate(timing, chosen | {i}, prefetch, session=session)) / max(block_bytes[i], 1),
                           -i),
        )
        chosen.add(best)
    candidates = [spread(n, keep), chosen, first(n, keep)]  # on a tie (compute unknown), spread
    return min(candidates, key=lambda s: simulate(timing, s, prefetch, session=session))
