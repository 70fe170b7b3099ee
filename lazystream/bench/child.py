"""The process of one benchmark run, or of the bandwidth probes:

    python -m lazystream.bench.child run '<Job as JSON>'
    python -m lazystream.bench.child probe CHECKPOINT DEVICE [BLOCK_BYTES]

prints its result as one line ``RESULT_PREFIX + JSON`` (lazystream.bench.methods).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from .methods import RESULT_PREFIX, Job, run_job
from .probes import measure_probes


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"] and len(argv) == 2:
        result = run_job(Job.from_json(argv[1]))
    elif argv[:1] == ["probe"] and len(argv) in (3, 4):
        result = asdict(measure_probes(argv[1], argv[2], int(argv[3]) if len(argv) == 4 else None))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
