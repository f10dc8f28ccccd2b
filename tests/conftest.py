"""Shared pytest fixtures."""

from pathlib import Path

import pytest

# Real datasets for offline work live beside the checkout (see ../shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips (saying what is missing) where it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(
            f"shared real-data folder {SHARED_DATA} is absent (CI provides it beside the "
            "checkout as ../shared/data; on a dev machine copy or link it there)"
        )
    return SHARED_DATA
