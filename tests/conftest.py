import os
from pathlib import Path

import pytest

import detrkit  # noqa: F401  (before torch: sets the OpenMP wait policy, see detrkit/__init__.py)
import torch

# Keep the suite light on the 2-core machines it runs on.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_data(name: str) -> Path:
    """Path of a development data set beside the checkout; the test skips when it is absent."""
    path = Path(SHARED, name).resolve()
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path
