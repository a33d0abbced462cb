"""Shared fixtures and the markers' behaviour (`gpu` tests skip themselves where CUDA is absent)."""
from pathlib import Path

import pytest

from project import ROOT


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"): item.add_marker(skip)   # the marker, not a keyword: a folder named gpu is no test


@pytest.fixture
def root() -> Path:
    "The repository's root folder."
    return ROOT


@pytest.fixture(scope="session")
def shapes_manifest(tmp_path_factory) -> Path:
    "A small built `shapes` dataset (400 images in one shard), shared by the session's tests."
    from prepretrain_lit.data import build_from_recipe, shipped_manifest
    return build_from_recipe(shipped_manifest("shapes"), tmp_path_factory.mktemp("shapes"), num_samples=400)


@pytest.fixture(scope="session")
def digits_manifests(tmp_path_factory) -> tuple[Path, Path]:
    "The built `digits` train and test splits (1,347 / 450 images), shared by the session's tests."
    from prepretrain_lit.data import build_from_recipe, shipped_manifest
    out = tmp_path_factory.mktemp("digits")
    return tuple(build_from_recipe(shipped_manifest(f"digits-{s}"), out / s) for s in ("train", "test"))
