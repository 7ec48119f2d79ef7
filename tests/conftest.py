import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("BERTPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only sample data (../shared/data); never copied into the repository."""
    data = SHARED / "data"
    if not data.exists():
        pytest.skip(f"sample data not found at {data}; set BERTPIPE_SHARED")
    return data
