"""Shared test helpers: tiny NIfTI datasets written on the fly, and the shared real data location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gem3d.io import Volume, write_volume

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GEM3D_SHARED_DATA", REPO.parent / "shared" / "data"))


def has_gpu() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu():
            item.add_marker(skip_gpu)


def make_case(shape=(20, 18, 16), seed=0, labels=(1, 2), affine=None) -> tuple[Volume, Volume]:
    """A tiny head-like case: a bright ellipsoid on a zero background with labelled blobs inside."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.5, 1.0]) if affine is None else affine
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    image = np.where(r < 0.9, 100 + 20 * rng.standard_normal(shape), 0).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    for i, lab in enumerate(labels):
        c = np.array([0.3 * (i - 0.5), 0.1, 0.0])
        mask[np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0)) < 0.25] = lab
    return Volume(image, affine), Volume(mask, affine)


def write_folder_dataset(root: Path, n=4, shape=(20, 18, 16), labels=(1, 2)) -> Path:
    """Generic-folder layout: images/<id>.nii.gz and masks/<id>.nii.gz."""
    for i in range(n):
        image, mask = make_case(shape, seed=i, labels=labels)
        write_volume(root / "images" / f"case{i:02d}.nii.gz", image)
        write_volume(root / "masks" / f"case{i:02d}.nii.gz", mask, np.uint8)
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    return write_folder_dataset(tmp_path / "data")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test with the working directory in tmp_path (results/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
