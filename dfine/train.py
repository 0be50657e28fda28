"""``python -m dfine.train``: the same as ``dfine-train`` (works under torchrun)."""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
