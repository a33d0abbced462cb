"""Shared fixtures and the markers' behaviour (`gpu` tests skip themselves where CUDA is absent)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords: item.add_marker(skip)


@pytest.fixture
def root() -> Path:
    "The repository's root folder."
    return ROOT
