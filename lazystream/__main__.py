"""``python -m lazystream``: the same as the ``lazystream`` command."""

import sys

from .cli import main

sys.exit(main())
