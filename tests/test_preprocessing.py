"""Real runs of import + nnU-Net preprocessing + slice store, on the demo and on the shared real data."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage

from conftest import SHARED_DATA
from gem3d.config import config_from_dict, load_config
from gem3d.data.nnunet import preprocessed_cases
from gem3d.data.slice_store import SliceStore, from_slices, letterbox_pad, mask_to_grey, to_original, to_slices
from gem3d.io import read_json, read_volume
from gem3d.paths import Paths
from gem3d.pipeline import build_slices, import_data, make_phantoms, preprocess

pytestmark = pytest.mark.slow


def run_data_stages(cfg):
    if cfg.phantoms is not None:
        make_phantoms(cfg)
    import_data(cfg)
    preprocess(cfg)
    build_slices(cfg)
    return SliceStore(Paths(cfg).slices)


def assert_within_one_voxel(mapped: np.ndarray, original: np.ndarray):
    """Every voxel whose label changed has a voxel of its new label in the original within one voxel."""
    assert mapped.shape == original.shape
    for lab in np.unique(mapped):
        grown = ndimage.binary_dilation(original == lab, structure=np.ones((3, 3, 3)))
        assert np.all(grown[mapped == lab]), f"label {lab} moved by more than one voxel"


def check_round_trip(store: SliceStore, case_id: str, raw_dataset):
    """Mapping the slice-store mask back to the original grid lands within one voxel, same affine."""
    case = store.load(case_id)
    original = read_volume(raw_dataset / "labelsTr" / f"{case_id}.nii.gz")
    native = from_slices(case.label, case.geometry, is_label=True)
    g = case.geometry
    assert native.shape == tuple(g["preprocessed_shape"])
    # the preprocessed grid's voxel size covers the cropped region's physical volume (shapes are
    # rounded to whole voxels, so up to half a voxel per axis)
    mm3_preprocessed = np.prod(np.array(g["preprocessed_shape"]) * np.array(g["spacing_preprocessed"]))
    mm3_cropped = np.prod(g["shape_after_cropping"]) * np.prod(g["original_spacing"])
    assert mm3_preprocessed == pytest.approx(mm3_cropped, rel=0.06)
    back = to_original(native, case.geometry, is_label=True, fill=0)
    np.testing.assert_allclose(back.affine, original.affine)
    mapped = np.where(back.array < 0, 0, back.array)  # the outside level maps back to background
    assert_within_one_voxel(mapped, original.array.astype(np.int16))
    # the native-resolution copy maps back exactly
    exact = to_original(case.label_native, case.geometry, is_label=True, fill=0).array
    np.testing.assert_array_equal(np.where(exact < 0, 0, exact), original.array)


def test_letterbox_keeps_aspect_ratio():
    vol = np.zeros((2, 10, 20), np.float32)
    vol[:, 2:8, 5:15] = 1.0
    top, bottom, left, right = letterbox_pad(10, 20)
    assert (top, bottom, left, right) == (5, 5, 0, 0)
    out = to_slices(vol, 20, is_label=False)
    assert out.shape == (2, 20, 20) and np.all(out[:, :5] == -1)  # padding, not stretching
    geometry = {"preprocessed_shape": [2, 10, 20], "letterbox": [top, bottom, left, right]}
    np.testing.assert_allclose(from_slices(out, geometry, is_label=False), vol, atol=1e-5)


def test_mask_levels_are_distinct():
    grey = mask_to_grey(np.array([-1, 0, 1, 2, 3]), max_label=3)
    np.testing.assert_allclose(grey, [-1 - 2 / 3, -1, -1 / 3, 1 / 3, 1])


def test_demo_import_preprocess_slices(in_tmp, monkeypatch):
    from conftest import REPO

    cfg = load_config(REPO / "config" / "config.yaml", check_paths=False)
    store = run_data_stages(cfg)
    ids = store.case_ids()
    assert len(ids) == cfg.phantoms.n_cases
    assert len(store.case_ids("test")) == 3 and len(store.case_ids("train")) == 9
    # found in review: nnU-Net planned on every case, so the target spacing, CT clipping and mean / std (applied to
    # the generator's training slices and to synthetic CT) held test-case statistics; now the training cases' only
    fingerprint = read_json(Paths(cfg).preprocessed_dataset / "dataset_fingerprint.json")
    assert len(fingerprint["spacings"]) == len(fingerprint["shapes_after_crop"]) == 9
    assert len(preprocessed_cases(Paths(cfg).preprocessed_dataset / "nnUNetPlans_3d_fullres")) == 12
    case = store.load(ids[0])
    s = cfg.preprocess.slice_size
    assert case.image.shape[1:] == (s, s) and case.label.shape == case.image.shape
    assert case.image.min() >= -1 and case.image.max() <= 1 and case.image.max() > 0.5
    assert set(np.unique(case.label)) <= {-1, 0, 1, 2, 3} and -1 in case.label  # nnU-Net's outside level kept
    assert np.all((case.label >= 0).sum(axis=(1, 2)) > 0)  # every slice holds part of the head
    for case_id in ids[:3]:
        check_round_trip(store, case_id, Paths(cfg).raw_dataset)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"shared real data not found at {SHARED_DATA}")
def test_real_hippocampus_and_brats(in_tmp):
    hip = config_from_dict({
        "name": "hip10", "data": {"format": "msd", "path": str(SHARED_DATA / "MSD_Task04_Hippocampus"),
                                  "labels": {"background": 0, "anterior": 1, "posterior": 2}, "max_cases": 10},
        "preprocess": {"dataset_id": 981, "slice_size": 32},
        "vae": {"model": {"channel_mult": [1, 2]}}})  # latents 16x16: the default U-Nets' factor 8 divides them
    store = run_data_stages(hip)
    assert len(store.case_ids()) == 10
    for case_id in store.case_ids()[:2]:
        check_round_trip(store, case_id, Paths(hip).raw_dataset)

    brats = config_from_dict({
        "name": "brats2", "data": {"format": "brats", "path": str(SHARED_DATA / "BraTS2015_deepmedic"),
                                   "labels": {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 3},
                                   "max_cases": 2, "modality": "FLAIR", "test_fraction": 0.5},
        "preprocess": {"dataset_id": 982, "slice_size": 64}})
    store = run_data_stages(brats)
    ids = store.case_ids()
    assert len(ids) == 2
    case = store.load(ids[0])
    assert case.geometry["original_shape"] == [240, 240, 155]
    assert case.geometry["shape_after_cropping"][0] < 155  # cropped to the brain (brain mask applied)
    assert -1 in case.label and 3 in case.label
    check_round_trip(store, ids[0], Paths(brats).raw_dataset)


def test_progress_bars_log_their_final_state_only(caplog):
    """nnU-Net's tqdm bars redraw with \\r: one log line per bar, not one per redraw."""
    import logging
    import sys

    from gem3d.data.nnunet import run_logged

    script = "import sys\nfor i in range(50):\n    sys.stdout.write(f'\\rbar {i}/49')\nsys.stdout.write('\\n')\nprint('done')"
    caplog.set_level(logging.INFO, logger="gem3d")
    run_logged([sys.executable, "-c", script], env=dict(os.environ), what="bar")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[nnU-Net]")]
    assert lines == ["[nnU-Net] bar 49/49", "[nnU-Net] done"]
