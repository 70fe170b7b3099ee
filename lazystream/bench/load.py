"""How busy other processes keep the machine's CPUs: on a shared machine a run's
figures mean little when something else ran beside it, so each row records it."""

from __future__ import annotations

import os
import resource
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Other processes using less than this many CPUs on average count as "quiet".
QUIET_CORES = 0.25


def _machine_busy_s() -> float:
    """CPU seconds every process has used since boot (Linux; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    # Steal is time the hypervisor gave to other machines: on a VM it slows us the same way.
    return (user + nice + system + irq + softirq + steal) / _TICK


def _own_s() -> float:
    """CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherLoad:
    """Context manager: ``.cores`` is the average number of CPUs that processes other than
    this one and its (waited-for) children kept busy while the block ran."""

    cores = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = (time.monotonic(), _machine_busy_s(), _own_s())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = time.monotonic(), _machine_busy_s(), _own_s()
        elapsed = wall - self._start[0]
        if elapsed > 0:
            self.cores = max(0.0, ((busy - self._start[1]) - (own - self._start[2])) / elapsed)


def wait_for_quiet(limit_s: float, window_s: float = 1.0) -> float:
    """Wait (up to ``limit_s``) until other processes use fewer than QUIET_CORES CPUs
    over a ``window_s`` window; return the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        with OtherLoad() as other:
            time.sleep(window_s)
        if other.cores < QUIET_CORES:
            break
    return time.monotonic() - start
