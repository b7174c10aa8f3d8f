import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "runners"))


@pytest.fixture(scope="session")
def build_dir() -> Path:
    d = Path(os.environ.get("CVMCONF_BUILD_DIR", REPO / "build"))
    if not (d / "suites").is_dir():
        pytest.fail(f"no build tree at {d}: run ./cvmconf build first")
    return d
