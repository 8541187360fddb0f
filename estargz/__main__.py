"""Entry point for ``python -m estargz``."""

import sys

from ._cli import main

sys.exit(main())
