"""Shared test fixtures: the real datasets' path and importable fake client apps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
# ../shared/datasets beside the repository (CI clones the repo with shared/ beside it).
DATA_ROOT = Path(os.environ.get("FEDGE_DATA_DIR") or REPO.parent / "shared" / "datasets")

# Worker processes import fake client apps by reference ("fakeapps:..."), so the support
# folder must be importable in them too (multiprocessing passes sys.path on). Only that
# folder: tests/fedge/ on sys.path would shadow the fedge package.
SUPPORT_DIR = TESTS_DIR / "support"
if str(SUPPORT_DIR) not in sys.path:
    sys.path.insert(0, str(SUPPORT_DIR))


@pytest.fixture
def data_root() -> Path:
    """The shared datasets folder; skips the test if it is absent."""
    if not DATA_ROOT.is_dir():
        pytest.skip(f"shared datasets not found at {DATA_ROOT}")
    return DATA_ROOT
