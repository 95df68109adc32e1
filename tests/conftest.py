import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"shared test data must sit beside the project: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data) -> Path:
    return shared_data / "wsi"
