"""Shared pytest fixtures.

``original``: tests that compare against the original D-FINE implementation take this fixture; it makes the
checkout importable (``from src.zoo.dfine... import ...``) and skips the test when no checkout is available,
so CI (which has none) stays green. Mark such tests ``@pytest.mark.original`` as well.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

DEFAULT_ORIGINAL_DIR = "/work/orig"


@pytest.fixture(scope="session")
def original() -> Path:
    """Path of the original D-FINE checkout (env ``DFINE_ORIG_DIR``, default /work/orig), on ``sys.path``."""
    path = Path(os.environ.get("DFINE_ORIG_DIR", DEFAULT_ORIGINAL_DIR)).expanduser().resolve()
    if not (path / "src" / "zoo" / "dfine").is_dir():
        pytest.skip("original D-FINE checkout not found: set DFINE_ORIG_DIR")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path
