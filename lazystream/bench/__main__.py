"""``python -m lazystream.bench``: the same as ``lazystream bench``."""

import sys

from . import main

sys.exit(main())
