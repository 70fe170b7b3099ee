"""Time LazyStreamModel.from_pretrained(load=False) (building the model and its plan, no
weight bytes read) and report the process's peak RSS.

    PYTHONPATH=. python tools/bench_load.py CHECKPOINT [--repeat 4]

Run it once per lazystream version (PYTHONPATH) in fresh processes to compare them; the
first load includes imports and is reported apart.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()

    import lazystream
    from lazystream import LazyStreamModel, streamer_of

    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        model = LazyStreamModel.from_pretrained(args.checkpoint, 0, device="cpu", load=False)
        times.append(time.perf_counter() - start)
        streamer_of(model).close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{os.path.dirname(lazystream.__file__)}: first load {times[0]:.3f} s, median of the next "
          f"{len(times) - 1}: {statistics.median(times[1:]):.3f} s; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
