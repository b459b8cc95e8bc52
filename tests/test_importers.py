"""Importers for every input format, the split, and every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_case, write_folder_dataset
from gem3d.config import config_from_dict
from gem3d.data.importers import BRATS_LABELS, import_dataset
from gem3d.data.split import make_split
from gem3d.io import InputError, Volume, read_json, read_volume, write_volume
from gem3d.paths import Paths

FOLDER_LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}  # 1..3: the default augmentation.tumour_labels


def cfg_for(path, fmt="folder", labels=FOLDER_LABELS, **data):
    return config_from_dict({"name": "t", "data": {"format": fmt, "path": str(path), "labels": labels, **data}})


def run_import(cfg):
    paths = Paths(cfg)
    return import_dataset(cfg, paths.raw_dataset.parent, paths.split, paths.import_report), paths


def test_folder_format(in_tmp, folder_dataset):
    report, paths = run_import(cfg_for(folder_dataset))
    assert len(report["cases"]) == 4
    ds = read_json(paths.raw_dataset / "dataset.json")
    assert ds["numTraining"] == 4 and ds["labels"] == FOLDER_LABELS and ds["file_ending"] == ".nii.gz"
    img = read_volume(paths.raw_dataset / "imagesTr" / "case00_0000.nii.gz")
    src = read_volume(folder_dataset / "images" / "case00.nii.gz")
    np.testing.assert_array_equal(img.array, src.array)
    np.testing.assert_allclose(img.affine, src.affine)  # geometry kept
    split = read_json(paths.split)
    assert len(split["test"]) == 1 and len(split["train"]) == 3


@pytest.mark.parametrize("scheme", ["2017", "2013"])
def test_brats_label_schemes(in_tmp, scheme):
    root = in_tmp / "brats"
    raw = (1, 2, 4) if scheme == "2017" else (1, 2, 3, 4)
    for i in range(3):
        image, mask = make_case(seed=i, labels=raw)
        case = root / f"case{i}"
        if scheme == "2017":
            write_volume(case / f"BraTS_{i}_flair.nii.gz", image)
            write_volume(case / f"BraTS_{i}_seg.nii.gz", mask, np.uint8)
        else:  # the BRATS 2013-2015 / DeepMedic layout, with a brain mask and a constant outside value
            outside = image.array == 0
            write_volume(case / "Flair_subtrMeanDivStd.nii.gz", Volume(np.where(outside, -3.5, image.array), image.affine))
            write_volume(case / "OTMultiClass.nii.gz", mask, np.float32)
            write_volume(case / "brainmask.nii.gz", Volume((~outside).astype(np.float64), image.affine))
    report, paths = run_import(cfg_for(root, "brats", BRATS_LABELS))
    assert len(report["cases"]) == 3
    label = read_volume(paths.raw_dataset / "labelsTr" / "case0.nii.gz").array
    expected = {0, 1, 2, 3}  # 2013: 3 (non-enhancing) -> 1, 4 -> 3; 2017: 4 -> 3
    assert set(np.unique(label).astype(int)) == expected
    src = read_volume(next((root / "case0").glob("*[sS]eg*.nii.gz"), None) or root / "case0" / "OTMultiClass.nii.gz").array
    assert np.all(label[src == 4] == 3) and np.all(label[src == 2] == 2)
    if scheme == "2013":
        assert np.all(label[src == 3] == 1)
        img = read_volume(paths.raw_dataset / "imagesTr" / "case0_0000.nii.gz").array
        assert (img == 0).sum() > 0  # outside the brain mask set to 0 for nnU-Net's non-zero crop


def test_msd_format(in_tmp):
    root = in_tmp / "Task99"
    for i in range(3):
        image, mask = make_case(seed=i)
        write_volume(root / "imagesTr" / f"hip_{i:03d}.nii.gz", image)
        write_volume(root / "labelsTr" / f"hip_{i:03d}.nii.gz", mask, np.uint8)
    (root / "imagesTr" / "._hip_000.nii.gz").write_bytes(b"macos junk")
    report, _ = run_import(cfg_for(root, "msd"))
    assert [c["case"] for c in report["cases"]] == ["hip_000", "hip_001", "hip_002"]


def test_abdomenct1k_format(in_tmp):
    root = in_tmp / "AbdomenCT-1K"
    labels = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}
    for i in range(1, 4):
        image, mask = make_case(seed=i, labels=(1, 2, 3, 4))
        write_volume(root / "AbdomenCT-1K-ImagePart1" / f"Case_{i:05d}_0000.nii.gz", image)
        write_volume(root / "Mask" / f"Case_{i:05d}.nii.gz", mask, np.uint8)
    report, _ = run_import(cfg_for(root, "abdomenct1k", labels, modality="CT"))
    assert [c["case"] for c in report["cases"]] == ["Case_00001", "Case_00002", "Case_00003"]


def test_split_is_seeded():
    ids = [f"c{i}" for i in range(10)]
    assert make_split(ids, 0.2, 1) == make_split(ids, 0.2, 1)
    assert len({tuple(make_split(ids, 0.2, seed)["test"]) for seed in range(5)}) > 1
    s = make_split(ids, 0.2, 1)
    assert len(s["test"]) == 2 and not set(s["test"]) & set(s["train"]) and len(s["train"]) == 8


def _break(root, kind):
    """Corrupt case01 of a folder dataset in one specific way; return the file the error must name."""
    img_path, mask_path = root / "images" / "case01.nii.gz", root / "masks" / "case01.nii.gz"
    image, mask = read_volume(img_path), read_volume(mask_path)
    if kind == "unreadable":
        img_path.write_bytes(b"not a nifti at all")
        return img_path, "cannot read"
    if kind == "4d":
        write_volume(img_path, Volume(np.stack([image.array] * 2, -1), image.affine))
        return img_path, "expected a 3D volume"
    if kind == "shape":
        write_volume(mask_path, Volume(mask.array[:-2], mask.affine), np.uint8)
        return mask_path, "shape"
    if kind == "affine":
        aff = mask.affine.copy()
        aff[0, 3] += 2.0
        write_volume(mask_path, Volume(mask.array, aff), np.uint8)
        return mask_path, "affine"
    if kind == "nan":
        arr = image.array.copy()
        arr[3, 3, 3] = np.nan
        write_volume(img_path, Volume(arr, image.affine))
        return img_path, "NaN"
    if kind == "label":
        arr = mask.array.copy()
        arr[0, 0, 0] = 7
        write_volume(mask_path, Volume(arr, mask.affine), np.uint8)
        return mask_path, "unexpected label(s) [7]"
    if kind == "empty":
        write_volume(mask_path, Volume(np.zeros_like(mask.array), mask.affine), np.uint8)
        return mask_path, "empty"
    raise AssertionError(kind)


BAD_KINDS = ["unreadable", "4d", "shape", "affine", "nan", "label", "empty"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_case_stops_import_and_leaves_nothing(in_tmp, kind):
    root = write_folder_dataset(in_tmp / "data")
    bad_file, words = _break(root, kind)
    cfg = cfg_for(root)
    with pytest.raises(InputError) as err:
        run_import(cfg)
    msg = str(err.value)
    assert "\n" not in msg and str(bad_file) in msg and words in msg
    results = in_tmp / "results"
    leftovers = [p for p in results.rglob("*") if p.is_file()] if results.exists() else []
    assert leftovers == []


def test_bad_case_skipped_when_asked(in_tmp):
    root = write_folder_dataset(in_tmp / "data", n=5)
    _break(root, "nan")
    report, paths = run_import(cfg_for(root, on_bad_case="skip"))
    assert [s["case"] for s in report["skipped"]] == ["case01"]
    assert "NaN" in report["skipped"][0]["reason"]
    assert read_json(paths.raw_dataset / "dataset.json")["numTraining"] == 4
    assert read_json(paths.import_report)["skipped"][0]["case"] == "case01"


def test_failed_reimport_keeps_previous_dataset(in_tmp):
    root = write_folder_dataset(in_tmp / "data")
    cfg = cfg_for(root)
    _, paths = run_import(cfg)
    before = sorted(p.name for p in (paths.raw_dataset / "imagesTr").iterdir())
    _break(root, "label")
    with pytest.raises(InputError):
        run_import(cfg)
    assert sorted(p.name for p in (paths.raw_dataset / "imagesTr").iterdir()) == before
