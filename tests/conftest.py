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
import torch

# Tiny tensors gain nothing from intra-op threads, and tests that start subprocesses (torchrun, spawn) would
# oversubscribe the cores; one thread also makes timings of the suite steadier on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the generated quickstart dataset, shared by a module's tests (generated on first use)."""
    return tmp_path_factory.mktemp("quickstart")


@pytest.fixture(scope="session")
def original() -> Path:
    """Path of the original D-FINE checkout named by env ``DFINE_ORIG_DIR``, put on ``sys.path``.

    Only the environment variable counts (no default location), so a CI machine that happens to have a
    checkout somewhere does not silently turn these slow local checks on.
    """
    value = os.environ.get("DFINE_ORIG_DIR")
    path = Path(value).expanduser().resolve() if value else None
    if path is None or not (path / "src" / "zoo" / "dfine").is_dir():
        pytest.skip("original D-FINE checkout not found: set DFINE_ORIG_DIR")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(scope="session")
def deim() -> Path:
    """Path of the DEIM checkout named by env ``DEIM_DIR``, put on ``sys.path`` (only the variable counts, as
    for ``original``). Mark such tests ``@pytest.mark.deim``."""
    value = os.environ.get("DEIM_DIR")
    path = Path(value).expanduser().resolve() if value else None
    if path is None or not (path / "engine" / "deim" / "deim_criterion.py").is_file():
        pytest.skip("DEIM checkout not found: set DEIM_DIR")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path
