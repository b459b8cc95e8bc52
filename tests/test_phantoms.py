"""Synthetic phantom generator: layout, content, determinism, atomicity."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from gem3d.data import phantoms
from gem3d.data.phantoms import generate_phantoms, phantom_labels, synthesise_case
from gem3d.io import InputError, read_volume

SHAPE = (40, 44, 32)


def _load(root, case_id):
    img = nib.load(str(root / case_id / f"{case_id}_flair.nii.gz"))
    seg = nib.load(str(root / case_id / f"{case_id}_seg.nii.gz"))
    return img, seg


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph") / "synthetic_brats"
    ids = generate_phantoms(root, n_cases=4, shape=SHAPE, n_scanners=2, seed=3, spacing=(1.2, 1.0, 1.5))
    return root, ids


def test_layout_and_manifest(generated):
    root, ids = generated
    assert ids == [f"synthetic_{i:03d}" for i in range(4)]
    assert sorted(p.name for p in root.iterdir()) == sorted(ids + ["phantoms.json"])
    for cid in ids:
        assert sorted(p.name for p in (root / cid).iterdir()) == [f"{cid}_flair.nii.gz", f"{cid}_seg.nii.gz"]
    meta = json.loads((root / "phantoms.json").read_text())
    assert meta["synthetic"] is True and meta["seed"] == 3 and meta["shape"] == list(SHAPE)
    assert meta["labels"] == phantom_labels("2017")
    assert [c["case_id"] for c in meta["cases"]] == ids
    assert [c["scanner_id"] for c in meta["cases"]] == [0, 1, 0, 1]
    assert len(meta["scanners"]) == 2
    assert {"gamma", "noise_sigma", "bias_strength"} <= set(meta["scanners"][0])
    assert "anatomy" in meta["cases"][0] and "tumour" in meta["cases"][0]
    assert not list(root.parent.glob(".*tmp*"))  # no temp folders left behind


def test_volumes_dtype_geometry_content(generated):
    root, ids = generated
    for cid in ids:
        img, seg = _load(root, cid)
        a, s = np.asarray(img.dataobj), np.asarray(seg.dataobj)
        assert img.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
        assert a.shape == SHAPE and s.shape == SHAPE
        np.testing.assert_allclose(read_volume(root / cid / f"{cid}_flair.nii.gz").spacing, (1.2, 1.0, 1.5))
        np.testing.assert_allclose(img.affine, seg.affine)
        centre_world = img.affine @ np.r_[(np.array(SHAPE) - 1) / 2, 1]
        np.testing.assert_allclose(centre_world[:3], 0, atol=1e-4)  # float32 in the header
        assert set(np.unique(s)) == {0, 1, 2, 4}
        head = a != 0
        assert np.all(a >= 0) and 0.1 < head.mean() < 0.5
        for face in (a[0], a[-1], a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]):
            assert np.all(face == 0)  # background exactly 0
        assert np.all(head[s > 0])  # tumour inside the head
        # nested: the enhancing rim and core sit inside the oedema envelope (dilated core)
        wt = s > 0
        assert wt.sum() > (s == 4).sum() > 0
        # FLAIR-like: oedema brighter than the rest of the head on average
        healthy = head & (s == 0)
        assert a[s == 2].mean() > 1.2 * a[healthy].mean()
        # tumour off-centre
        centroid = np.argwhere(wt).mean(axis=0)
        assert np.linalg.norm(centroid - (np.array(SHAPE) - 1) / 2) > 2


def test_scanners_differ():
    s0, s1 = phantoms._scanner_params(0, 0), phantoms._scanner_params(0, 1)
    assert s0 != s1
    img0, seg0, _ = synthesise_case(0, 2, SHAPE, (1.0, 1.0, 1.0), s0)
    img1, seg1, _ = synthesise_case(0, 2, SHAPE, (1.0, 1.0, 1.0), s1)
    assert np.array_equal(seg0, seg1)  # same subject, only the scanner changes
    head = img0 > 0
    assert np.array_equal(head, img1 > 0)
    # the scanner changes the intensity curve, not just a global scale
    r = img1[head] / img0[head]
    assert r.std() / r.mean() > 0.02
    assert img0[head].min() >= s0["offset"] * 0.999 and img1[head].min() >= s1["offset"] * 0.999


def test_deterministic_and_seed_dependent(tmp_path):
    kw = dict(n_cases=2, shape=SHAPE, n_scanners=2)
    generate_phantoms(tmp_path / "a", seed=7, **kw)
    generate_phantoms(tmp_path / "b", seed=7, **kw)
    generate_phantoms(tmp_path / "c", seed=8, **kw)
    for cid in ("synthetic_000", "synthetic_001"):
        ia, sa = (np.asarray(x.dataobj) for x in _load(tmp_path / "a", cid))
        ib, sb = (np.asarray(x.dataobj) for x in _load(tmp_path / "b", cid))
        ic, sc = (np.asarray(x.dataobj) for x in _load(tmp_path / "c", cid))
        assert ia.tobytes() == ib.tobytes() and sa.tobytes() == sb.tobytes()
        assert not np.array_equal(ia, ic) and not np.array_equal(sa, sc)
    ja = json.loads((tmp_path / "a" / "phantoms.json").read_text())
    jb = json.loads((tmp_path / "b" / "phantoms.json").read_text())
    assert ja == jb


def test_case_independent_of_n_cases():
    scanner = phantoms._scanner_params(0, 1)
    a = synthesise_case(0, 5, SHAPE, (1.0, 1.0, 1.0), scanner)
    b = synthesise_case(0, 5, SHAPE, (1.0, 1.0, 1.0), scanner)
    c = synthesise_case(0, 6, SHAPE, (1.0, 1.0, 1.0), scanner)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_label_scheme_2013(tmp_path):
    generate_phantoms(tmp_path / "p", n_cases=2, shape=SHAPE, label_scheme="2013")
    for cid in ("synthetic_000", "synthetic_001"):
        s = np.asarray(_load(tmp_path / "p", cid)[1].dataobj)
        assert set(np.unique(s)) == {0, 1, 2, 3, 4}
    assert phantom_labels("2013")["non_enhancing"] == 3
    with pytest.raises(ValueError, match="label_scheme"):
        phantom_labels("2020")
    with pytest.raises(ValueError, match="label_scheme"):
        generate_phantoms(tmp_path / "q", label_scheme="bad")


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = phantoms.write_volume

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(phantoms, "write_volume", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_phantoms(tmp_path / "out", n_cases=3, shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_folder_and_replaces_own(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(InputError, match="phantoms.json"):
        generate_phantoms(foreign, n_cases=1, shape=SHAPE)
    assert (foreign / "precious.txt").exists()
    own = tmp_path / "own"
    generate_phantoms(own, n_cases=2, shape=SHAPE)
    generate_phantoms(own, n_cases=1, shape=SHAPE)  # regenerate in place
    assert sorted(p.name for p in own.iterdir()) == ["phantoms.json", "synthetic_000"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        generate_phantoms(tmp_path / "a", shape=(8, 8, 8))
    with pytest.raises(ValueError, match="spacing"):
        generate_phantoms(tmp_path / "a", spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="n_cases"):
        generate_phantoms(tmp_path / "a", n_cases=0)
