"""Shared test helpers: tiny NIfTI datasets written on the fly, and the shared real data location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gem3d.io import Volume, write_volume

torch.set_num_threads(1)
# Every test computes on the CPU, GPU or not, so results (bit-exact resume, seeded samples) do not
# depend on the card; tests marked `gpu` switch to CUDA themselves (tests/test_gpu.py).
os.environ.setdefault("GEM3D_DEVICE", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GEM3D_SHARED_DATA", REPO.parent / "shared" / "data"))
# files in the GEM-3D authors' release layout with their networks' outputs (tiny, random weights; no image data)
SHARED_FIXTURES = Path(os.environ.get("GEM3D_SHARED_FIXTURES", SHARED_DATA.parent / "fixtures"))


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


TINY_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "data": {"format": "brats", "path": "results/tiny/phantoms", "modality": "FLAIR", "test_fraction": 0.34,
             "labels": {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 3}},
    "phantoms": {"n_cases": 6, "shape": [32, 32, 24], "n_scanners": 2, "seed": 0},
    "preprocess": {"dataset_id": 977, "num_processes": 1, "slice_size": 16},
    "vae": {"model": {"base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "latent_channels": 4,
                      "norm_groups": 4},
            "train": {"steps": 20, "lr": 2e-3, "batch_size": 8, "log_every": 10, "checkpoint_every": 10,
                      "precision": "fp32"},
            "scale_slices": 64, "eval_slices": 16},
    "slice_model": {"model": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                              "attention_levels": [1], "head_dim": 8, "norm_groups": 4},
                    "train": {"steps": 10, "lr": 1e-3, "batch_size": 4, "log_every": 5, "checkpoint_every": 5, "precision": "fp32"},
                    "position_dim": 16},
    "volume_model": {"window": 4,
                     "model": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                               "attention_levels": [1], "head_dim": 8, "norm_groups": 4, "ff_mult": 0},
                     "stage1": {"steps": 10, "lr": 1e-3, "batch_size": 2, "log_every": 5, "checkpoint_every": 5, "precision": "fp32"},
                     "stage2": {"steps": 5, "lr": 1e-3, "batch_size": 2, "log_every": 5, "checkpoint_every": 5, "precision": "fp32"}},
    "sampling": {"steps": 4, "volumes_per_batch": 2, "precision": "fp32",
                 "sets": {"IC": {"informed": "IC"}, "IC_MA": {"informed": "IC", "augment": True},
                          "IG": {"informed": "IG"}},
                 "enhancement_multiples": [1, 2]},
    "evaluation": {"fid_extractor": "random_conv",
                   "segmentation": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1,
                                    "num_processes": 1}},
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A whole tiny run trained once per test session: data stages and all five networks.

    Yields (workdir, cfg); tests chdir into workdir (results/tiny/...) through `in_run`.
    """
    workdir = tmp_path_factory.mktemp("tiny_run")
    return workdir, train_tiny_run(workdir)


def train_tiny_run(workdir: Path, overrides: dict | None = None):
    """Data stages and all five networks of TINY_CONFIG (plus `overrides`) in workdir; returns the config."""
    from gem3d import pipeline
    from gem3d.config import config_from_dict

    old = os.getcwd()
    os.chdir(workdir)
    try:
        cfg = config_from_dict({**TINY_CONFIG, **(overrides or {})}, source="tiny", check_paths=False)
        for stage in (pipeline.make_phantoms, pipeline.import_data, pipeline.preprocess, pipeline.build_slices,
                      pipeline.train_vae, pipeline.encode, pipeline.train_slice):
            stage(cfg)
        for model in ("gem3d", "baseline"):
            pipeline.train_volume(cfg, 1, model)
            pipeline.train_volume(cfg, 2, model)
    finally:
        os.chdir(old)
    return cfg


@pytest.fixture
def in_run(trained_run, monkeypatch):
    workdir, cfg = trained_run
    monkeypatch.chdir(workdir)
    return cfg


def tiny_raw(**changes) -> dict:
    """A deep copy of TINY_CONFIG with "section.key" -> value changes."""
    return with_changes(TINY_CONFIG, changes)


def with_changes(raw: dict, changes: dict) -> dict:
    """A deep copy of a raw config with "section.key" -> value changes (parents created as needed)."""
    import copy

    raw = copy.deepcopy(raw)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def assert_one_error(rc, err, *words):
    """rc 2, a last line `error: ...` holding every word, no other error line, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    for word in words:
        assert str(word) in lines[-1], (word, lines[-1])


@pytest.fixture
def run_copy(trained_run, tmp_path, monkeypatch):
    """A private copy of the tiny run (for tests that break or retrain its files on purpose)."""
    import shutil

    workdir, cfg = trained_run
    shutil.copytree(workdir / "results", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    return cfg
