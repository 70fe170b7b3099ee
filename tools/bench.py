"""``lazystream bench`` from a source checkout: see lazystream/bench/__init__.py.

    python tools/bench.py [CHECKPOINT] [--quick] [--device cuda] [--out DIR] ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazystream.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
