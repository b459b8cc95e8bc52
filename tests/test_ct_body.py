"""CT body outlines for the informed-slice fit guard (issue #24.2): on CT nnU-Net's non-zero region is the whole
field of view (air is -1000 HU, not 0), so the guard, which scored that region, gave every candidate Dice 1 on CT
(AbdomenCT-1K, where the paper's failure cases are). The slice store now keeps a body outline per CT case."""

from __future__ import annotations

import numpy as np
import pytest

from gem3d.config import InformedFitConfig, config_from_dict
from gem3d.data.phantoms import ct_phantom
from gem3d.data.slice_store import OUTSIDE, SliceStore, ct_body
from gem3d.io import Volume, write_volume
from gem3d.sampling.informed import InformedSpec, StoreOutlines, choose_fitting, slice_fit

SHAPE = (40, 40, 12)  # (x, y, z), 1 x 1 x 2.5 mm
GUARD = InformedFitConfig(min_dice=0.85, max_tumour_outside=0.1, max_tries=5)


def test_ct_body_fills_the_lungs_and_leaves_the_table_out():
    hu, _, body = ct_phantom(1.0, SHAPE)
    found = ct_body(hu.transpose(2, 1, 0))  # slices along axis 0
    assert np.array_equal(found, body.transpose(2, 1, 0))
    assert (hu[:, 34:36] > 0).all() and not found[:, 34:36].any()  # the table: above the air threshold, not body


@pytest.fixture(scope="module")
def ct_store(tmp_path_factory):
    """Five CT phantoms (three large bodies, two small) through the real import, nnU-Net preprocessing (CT
    normalisation) and slice store."""
    import os

    from gem3d.pipeline import build_slices, import_data, preprocess
    from gem3d.paths import Paths

    root = tmp_path_factory.mktemp("ct")
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    bodies = {}
    for i, (name, scale) in enumerate([("large0", 1.0), ("large1", 0.95), ("large2", 1.0), ("small0", 0.6),
                                       ("small1", 0.55)]):
        hu, mask, body = ct_phantom(scale, SHAPE, seed=i)
        write_volume(root / "data" / "images" / f"{name}.nii.gz", Volume(hu, affine), np.int16)
        write_volume(root / "data" / "masks" / f"{name}.nii.gz", Volume(mask, affine), np.uint8)
        bodies[name] = body.transpose(2, 1, 0)  # (z, y, x), as nnU-Net's arrays of an identity-oriented image
    cfg = config_from_dict({
        "name": "ct", "data": {"format": "folder", "path": str(root / "data"), "modality": "CT",
                               "labels": {"background": 0, "organ": 1},
                               "split": {"train": ["large0", "large1", "small0", "small1"], "test": ["large2"]}},
        "preprocess": {"dataset_id": 983, "num_processes": 1, "slice_size": 32},
        "vae": {"model": {"channel_mult": [1, 2]}}}, source="ct")
    old = os.getcwd()
    os.chdir(root)
    try:
        import_data(cfg)
        preprocess(cfg)
        build_slices(cfg)
    finally:
        os.chdir(old)
    return cfg, SliceStore(root / Paths(cfg).slices), bodies


def test_ct_store_keeps_the_body_not_the_field_of_view(ct_store):
    _, store, bodies = ct_store
    assert store.is_ct
    for case in ("large0", "small0"):
        native = store.body_native(case)
        assert native.shape == bodies[case].shape and np.array_equal(native, bodies[case])
        assert (store.load(case).label_native != OUTSIDE).all()  # nnU-Net's region: the whole field of view
        body = store.body(case)
        assert body.shape == store.load(case).label.shape and 0.1 < body.mean() < 0.6


def test_small_body_slice_for_a_large_body_mask_fails_the_guard(ct_store):
    """Issue #24.2's test: a small-body informed slice for a large-body mask scores < 0.85 (it scored 1.0)."""
    _, store, _ = ct_store
    outlines = StoreOutlines(store)
    z = 4  # the organ's slices, where the mask has labels
    target = np.asarray(store.load("large0").label[z])
    assert (target > 0).any()
    region = store.body("large0")[z]
    small = slice_fit(outlines("small0", z), target, region)
    assert small.dice < 0.85 and not small.passes(GUARD)
    old = np.asarray(store.load("small0").label[z]) != OUTSIDE  # nnU-Net's region, the outline before
    assert slice_fit(old, target, target != OUTSIDE).dice == 1.0  # no signal
    assert slice_fit(outlines("large1", z), target, region).dice > 0.95
    chosen, record = choose_fitting([InformedSpec("IC", "small0", z), InformedSpec("IC", "large1", z)], target,
                                    region, outlines, GUARD)
    assert chosen.case == "large1" and record["rejected"] == 1 and record["passed"] is True


def test_fit_guard_draws_on_ct_find_the_misfits(ct_store):
    """The IC set's draws (report/informed_fit.fit_draws): blind draws that pair body sizes fail, the guard
    replaces them with a body of the mask's size."""
    from gem3d.report.informed_fit import fit_draws

    cfg, store, _ = ct_store
    rows = fit_draws(cfg, store, 10, GUARD)
    blind = np.array([r["blind_fit"]["dice"] for r in rows])
    guarded = np.array([r["guarded_fit"]["dice"] for r in rows])
    assert (blind < 0.85).mean() > 0.3 and (guarded >= 0.85).all()
    assert all((r["blind"].case[:5] == r["case"][:5]) == (r["blind_fit"]["dice"] >= 0.85) for r in rows)


@pytest.mark.parametrize("fit", ["letterbox", "stretch"])
def test_ct_body_outline_is_squared_as_the_store_squares_its_labels(tmp_path, fit):
    """Found in review: the CT body outline was always letterboxed, so under preprocess.slice_fit: stretch (the
    abdomen release config) it missed the stretched labels (a region's fit with itself: Dice 0.67)."""
    from gem3d.data.slice_store import to_slices
    from gem3d.io import write_json

    native = np.zeros((3, 12, 30), bool)  # (d, y, x): not square in-plane
    native[:, 3:9, 5:25] = True
    np.save(tmp_path / "c0_body.npy", native)
    write_json(tmp_path / "index.json", {"slice_size": 16, "slice_fit": fit, "cases": {"c0": {}},
                                         "normalization": {"scheme": "CTNormalization"}})
    store = SliceStore(tmp_path)
    labels = to_slices(np.where(native, 0, OUTSIDE).astype(np.int8), 16, is_label=True, fit=fit)
    assert np.array_equal(store.body("c0"), labels != OUTSIDE)


def test_outlines_are_read_slice_by_slice_as_the_whole_case_would_give(ct_store, monkeypatch):
    """Found in review: StoreOutlines kept every case's whole outline (14 GB for BraTS' 387 cases at 512 px in the
    informed-fit figure); it now reads single slices, equal to the whole case's, and keeps a bounded number."""
    from gem3d.sampling import informed

    _, store, _ = ct_store
    for case in ("large0", "small0"):
        whole = store.body(case)
        for index in range(whole.shape[0]):
            assert np.array_equal(store.body_slice(case, index), whole[index])
    monkeypatch.setattr(informed, "CACHED_OUTLINES", 3)
    outlines = StoreOutlines(store)
    for index in range(6):
        assert np.array_equal(outlines("large0", index), store.body("large0")[index])
    assert len(outlines._slices) == 3
