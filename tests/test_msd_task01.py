"""MSD Task01_BrainTumour (the paper's BraTS cohort): 4-D images, one channel chosen by name or index,
Task01's label scheme. The tests build a Task01 folder from the real BraTS cases of the shared data
(modalities stacked on the 4th axis, labels relabelled to Task01's scheme, zero outside the brain as
in the Decathlon release) and check that import, regions and the downstream metrics agree with the
same cases imported from the challenge folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA
from gem3d.config import config_from_dict
from gem3d.data.importers import BRATS_LABELS, import_dataset, segmentation_regions
from gem3d.evaluation.segmentation_metrics import region_metrics
from gem3d.io import Volume, read_json, read_volume, write_volume
from gem3d.paths import Paths

BRATS = SHARED_DATA / "BraTS2015_deepmedic"
pytestmark = pytest.mark.skipif(not BRATS.is_dir(), reason=f"shared BraTS cases not found at {BRATS}")

CASES = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1")
TASK01_CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # the Decathlon's dataset.json (v1)
BRATS2013_TO_TASK01 = {0: 0, 1: 2, 2: 1, 3: 2, 4: 3}  # necrosis and non-enhancing -> 2, oedema -> 1, enhancing -> 3
# The usual regions in each release's own label ids (shared data README; Decathlon paper)
REGIONS_2013 = {"WT": [1, 2, 3, 4], "TC": [1, 3, 4], "ET": [4]}
REGIONS_TASK01 = {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}


def write_task01(root, cases=CASES, dataset_json=True):
    """A Task01_BrainTumour folder from challenge-layout cases: imagesTr/BRATS_NNN.nii.gz (x, y, z, 4),
    labelsTr/BRATS_NNN.nii.gz, dataset.json. Channels: FLAIR and T1gd are the real scans; the shared data
    have no T1w or T2w, so those two channels are stand-ins computed from them."""
    for i, case in enumerate(cases, start=1):
        folder = BRATS / case
        flair = read_volume(folder / "Flair_subtrMeanDivStd.nii.gz")
        t1c = read_volume(folder / "T1c_subtrMeanDivStd.nii.gz").array
        brain = read_volume(folder / "brainmask.nii.gz").array > 0.5
        labels = read_volume(folder / "OTMultiClass.nii.gz").array.astype(int)
        stack = np.stack([flair.array, t1c - flair.array, t1c, flair.array + t1c], -1)  # FLAIR, T1w*, T1gd, T2w*
        stack = np.where(brain[..., None], stack, 0).astype(np.float32)
        relabelled = np.vectorize(BRATS2013_TO_TASK01.get)(labels).astype(np.uint8)
        write_volume(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", Volume(stack, flair.affine))
        write_volume(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", Volume(relabelled, flair.affine), np.uint8)
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({
            "name": "BRATS", "tensorImageSize": "4D", "modality": TASK01_CHANNELS,
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": len(cases)}))
    return root


def challenge_layout(root, cases=CASES):
    """The same cases as challenge folders (links to the shared files)."""
    root.mkdir(parents=True)
    for case in cases:
        (root / case).symlink_to(BRATS / case, target_is_directory=True)
    return root


def config(name, fmt, path, **data):
    return config_from_dict({"name": name, "preprocess": {"dataset_id": 950 if fmt == "brats" else 951},
                             "data": {"format": fmt, "path": str(path), "labels": BRATS_LABELS, "modality": "FLAIR",
                                      **data}})


def run_import(cfg):
    paths = Paths(cfg)
    return import_dataset(cfg, paths.raw_dataset.parent, paths.split, paths.import_report), paths


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The three cases imported twice: from a Task01 folder (FLAIR by name) and from the challenge folders."""
    import os

    work = tmp_path_factory.mktemp("task01")
    old = os.getcwd()
    os.chdir(work)
    try:
        task01 = write_task01(work / "Task01_BrainTumour")
        cfg_msd = config("task01", "msd_brats", task01, channel="FLAIR")
        cfg_brats = config("challenge", "brats", challenge_layout(work / "challenge"))
        (report_msd, paths_msd), (report_brats, paths_brats) = run_import(cfg_msd), run_import(cfg_brats)
    finally:
        os.chdir(old)
    names = dict(zip((f"BRATS_{i:03d}" for i in range(1, len(CASES) + 1)), CASES))
    return {"work": work, "task01": task01, "cfg_msd": cfg_msd, "cfg_brats": cfg_brats, "names": names,
            "raw_msd": work / paths_msd.raw_dataset, "raw_brats": work / paths_brats.raw_dataset,
            "report_msd": report_msd, "report_brats": report_brats}


def test_task01_import_equals_the_challenge_import(both):
    """Every case: the FLAIR channel written as a 3-D image with the file's spatial affine, and the labels
    mapped to gem3d's BraTS ids, voxel for voxel the same as the challenge-layout import."""
    assert [c["case"] for c in both["report_msd"]["cases"]] == list(both["names"])
    assert all(c["channel"] == 0 for c in both["report_msd"]["cases"])
    for task01_id, case in both["names"].items():
        image = read_volume(both["raw_msd"] / "imagesTr" / f"{task01_id}_0000.nii.gz")
        label = read_volume(both["raw_msd"] / "labelsTr" / f"{task01_id}.nii.gz")
        ref_image = read_volume(both["raw_brats"] / "imagesTr" / f"{case}_0000.nii.gz")
        ref_label = read_volume(both["raw_brats"] / "labelsTr" / f"{case}.nii.gz")
        assert image.shape == (240, 240, 155)
        np.testing.assert_array_equal(image.array, ref_image.array)
        np.testing.assert_array_equal(label.array, ref_label.array)
        np.testing.assert_allclose(image.affine, read_volume(both["task01"] / "labelsTr" / f"{task01_id}.nii.gz").affine)
        np.testing.assert_allclose(image.affine, ref_image.affine)
    assert read_json(both["raw_msd"] / "dataset.json")["labels"] == BRATS_LABELS


def test_task01_regions_are_the_brats_regions(both):
    """One declaration of the regions: WT/TC/ET for both layouts, and on the imported labels they cover the
    voxels of Task01's own WT = 1+2+3, TC = 2+3, ET = 3 and of the 2013 scheme's WT/TC/ET."""
    regions = segmentation_regions(both["cfg_msd"].data)
    assert regions == segmentation_regions(both["cfg_brats"].data) == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    from gem3d.evaluation.downstream import segmentation_regions as table_regions
    assert table_regions(both["cfg_msd"]) == table_regions(both["cfg_brats"]) == regions  # the table's regions
    for task01_id, case in both["names"].items():
        imported = read_volume(both["raw_msd"] / "labelsTr" / f"{task01_id}.nii.gz").array
        task01 = read_volume(both["task01"] / "labelsTr" / f"{task01_id}.nii.gz").array
        raw2013 = read_volume(BRATS / case / "OTMultiClass.nii.gz").array
        for name, ids in regions.items():
            region = np.isin(imported, ids)
            assert region.any(), (case, name)
            np.testing.assert_array_equal(region, np.isin(task01, REGIONS_TASK01[name]))
            np.testing.assert_array_equal(region, np.isin(raw2013, REGIONS_2013[name]))


def test_task01_downstream_metrics_agree(both):
    """region_metrics of a prediction (the reference shifted 2 voxels and its enhancing core eroded away at
    one end) against each import's labels: the same Dice and HD95 per region for both layouts."""
    task01_id, case = next(iter(both["names"].items()))
    metrics = {}
    for layout, raw, cid in (("msd", both["raw_msd"], task01_id), ("brats", both["raw_brats"], case)):
        ref = read_volume(raw / "labelsTr" / f"{cid}.nii.gz")
        pred = np.roll(ref.array, 2, axis=0)
        pred[:, :, : ref.shape[2] // 2][pred[:, :, : ref.shape[2] // 2] == 3] = 1
        cfg = both[f"cfg_{layout}"]
        metrics[layout] = region_metrics(pred.transpose(2, 1, 0), ref.array.transpose(2, 1, 0),
                                         segmentation_regions(cfg.data), ref.spacing[::-1])
    assert metrics["msd"] == metrics["brats"]
    assert set(metrics["msd"]) == {"WT", "TC", "ET"}
    assert all(0 < m["dice"] < 1 for m in metrics["msd"].values()), metrics


def test_task01_channel_by_index_and_by_name_in_another_case(in_tmp):
    """data.channel 2 and 'T1GD' (names match case-insensitively) both import the T1gd channel: the real T1c
    scan, zero outside the brain."""
    task01 = write_task01(in_tmp / "Task01", CASES[:2])
    for name, channel in (("byindex", 2), ("byname", "T1GD")):
        _, paths = run_import(config(name, "msd_brats", task01, channel=channel))
        image = read_volume(paths.raw_dataset / "imagesTr" / "BRATS_002_0000.nii.gz").array
        t1c = read_volume(BRATS / CASES[1] / "T1c_subtrMeanDivStd.nii.gz").array
        brain = read_volume(BRATS / CASES[1] / "brainmask.nii.gz").array > 0.5
        np.testing.assert_array_equal(image, np.where(brain, t1c, 0))
