"""``python -m dfine.eval``: the same as ``dfine-eval``."""

import sys

from .cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
