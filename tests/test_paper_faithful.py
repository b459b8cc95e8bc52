"""Where gem3d follows the paper (issue #11 items 1, 2, 3, 6): the left-right-only mask flip, the
enhanced datasets on the TRUE masks, de-enhancement started at the fixed slice's relative depth, and
MONAI's HD95 with BraTS' empty-mask value in the downstream metrics and their table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CONFIG
from gem3d.config import AugmentationConfig, SamplingConfig, config_from_dict, load_config
from gem3d.data.slice_store import SliceStore
from gem3d.io import InputError, Volume, read_json, read_volume, write_json, write_volume
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeSampler
from gem3d.sampling.informed import InformedSpec, relative_slice
from gem3d.sampling.sample_sets import build_jobs, fixed_informed, informed_key, pick_informed, sample_set
from gem3d.sampling.sets import enhanced_sets, set_spec

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. flip: left-right only
def test_flip_default_and_shipped_brain_config_are_left_right_only():
    assert AugmentationConfig().flip_axes == (2,)
    brats = load_config(REPO / "config" / "brats.yaml", check_paths=False)
    assert brats.augmentation.flip_axes == (2,)
    assert load_config(REPO / "config" / "abdomenct1k.yaml", check_paths=False).augmentation.flip_axes == ()


@pytest.mark.parametrize("axes", [[0], [1], [0, 1, 2], [2, 2]])
def test_config_refuses_slice_axis_and_front_back_flips(axes):
    with pytest.raises(InputError, match=r"augmentation\.flip_axes") as err:
        config_from_dict({**TINY_CONFIG, "augmentation": {"flip_axes": axes}}, source="tiny.yaml",
                         check_paths=False)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- 2. enhancement: true masks
def test_enhancement_default_and_shipped_configs_use_the_true_masks():
    assert SamplingConfig().enhancement_set == "IC"
    for name in ("brats.yaml", "abdomenct1k.yaml"):
        cfg = load_config(REPO / "config" / name, check_paths=False)
        assert cfg.sampling.enhancement_set == "IC" and not cfg.sampling.sets["IC"].get("augment", False)
    # the MA-based enhancement stays available when asked for
    ma = config_from_dict({**TINY_CONFIG, "sampling": {**TINY_CONFIG["sampling"], "enhancement_set": "IC_MA"}},
                          check_paths=False)
    assert enhanced_sets(ma, 2) == ["IC_MA", "IC_MA_copy1"] and set_spec(ma, "IC_MA_copy1").augment


def test_enhancement_copies_keep_the_masks_and_change_informed_slices_and_seeds(in_run):
    cfg = dataclasses.replace(in_run, sampling=dataclasses.replace(in_run.sampling, enhancement_multiples=(1, 2, 6)))
    assert enhanced_sets(cfg, 2) == ["IC", "IC_copy1"]
    store = SliceStore(Paths(cfg).slices)
    sampler = VolumeSampler(cfg)
    copies = [build_jobs(cfg, set_spec(cfg, name), store, sampler) for name in enhanced_sets(cfg, 6)]
    for per_case in zip(*copies):
        case = store.load(per_case[0].source_case)
        for job in per_case:
            assert job.source_case == case.case_id and job.label_native is None and job.augmentation is None
            np.testing.assert_array_equal(job.label, case.label)  # the true mask, untouched
        assert len({informed_key(j.informed) for j in per_case}) == len(per_case)  # distinct informed slices
        assert len({j.seed for j in per_case}) == len(per_case)
        assert all(j.informed.source == "IC" and j.informed.case != case.case_id for j in per_case)
    # end to end: the copy's masks on disk are the real training masks
    manifest = read_json(sample_set(in_run, "IC_copy1") / "manifest.json")
    out = Paths(in_run).sample_shard("IC_copy1", 0, 1)
    for v in manifest["volumes"]:
        assert v["augmentation"] is None and v["copy"] == 1
        label = read_volume(out / "labelsTr" / f"{v['sample_id']}.nii.gz")
        real = read_volume(Paths(in_run).raw_dataset / "labelsTr" / f"{v['source_case']}.nii.gz")
        np.testing.assert_array_equal(label.array, real.array)


class FewSlices:
    """A latent store of two training volumes of depth 2: IC has one other volume and 2 slices to offer."""

    root = Path("latents")
    case_ids = ["a", "b"]

    def depth(self, i: int) -> int:
        return 2


def test_copy_redraws_an_informed_slice_an_earlier_copy_used():
    spec = set_spec(config_from_dict(TINY_CONFIG, check_paths=False), "IC")
    for seed in range(10):
        taken = {informed_key(InformedSpec("IC", "b", 0))}
        start, informed = pick_informed(spec, "a", 2, np.random.default_rng(seed), FewSlices(), taken)
        assert informed == InformedSpec("IC", "b", 1) and start == 1
    # every choice taken: a repeat is kept (no endless loop)
    taken = {informed_key(InformedSpec("IC", "b", s)) for s in (0, 1)}
    assert pick_informed(spec, "a", 2, np.random.default_rng(0), FewSlices(), taken)[1].case == "b"


# ----------------------------------------------------------------------------- 3. de-enhancement start
def test_deenhancement_starts_at_the_fixed_slice_relative_depth(in_run):
    store = SliceStore(Paths(in_run).slices)
    train = store.case_ids("train")
    cfg = dataclasses.replace(in_run, sampling=dataclasses.replace(in_run.sampling,
                                                                   deenhance_informed=f"{train[1]}:3"))
    fixed = fixed_informed(cfg, store)
    assert (fixed.case, fixed.slice) == (train[1], 3)
    fixed_depth = store.index["cases"][fixed.case]["preprocessed_shape"][0]
    jobs = build_jobs(cfg, set_spec(cfg, "deenhanced"), store, VolumeSampler(cfg))
    assert [j.source_case for j in jobs] == train
    for job in jobs:
        assert job.informed == fixed
        assert job.start == relative_slice(3, fixed_depth, job.label.shape[0])
        assert job.start / (job.label.shape[0] - 1) == pytest.approx(3 / (fixed_depth - 1), abs=0.5 / (
            job.label.shape[0] - 1))
    assert next(j for j in jobs if j.source_case == train[1]).start == 3  # its own volume: the slice itself


# ----------------------------------------------------------------------------- 6. HD95 in the downstream metrics
def _brats_cfg():
    return config_from_dict({**TINY_CONFIG, "name": "hdtable"}, source="hd.yaml", check_paths=False)


def test_downstream_means_score_a_missed_region_373_mm(tmp_path):
    from gem3d.evaluation.downstream import Case, region_means, score

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ref = np.zeros((12, 10, 8), np.uint8)
    ref[2:8, 2:8, 2:6] = 2
    ref[3:6, 3:6, 3:5] = 3
    pred = ref.copy()
    pred[pred == 3] = 2  # the enhancing tumour (ET) is missed; WT is right
    write_volume(tmp_path / "img.nii.gz", Volume(np.ones(ref.shape, np.float32), affine))
    write_volume(tmp_path / "ref.nii.gz", Volume(ref, affine), np.uint8)
    (tmp_path / "pred").mkdir()
    write_volume(tmp_path / "pred" / "c0.nii.gz", Volume(pred, affine), np.uint8)
    cfg = _brats_cfg()
    per_case = score(cfg, tmp_path / "pred", [Case("c0", tmp_path / "img.nii.gz", tmp_path / "ref.nii.gz")])
    mean = region_means(per_case, ["WT", "TC", "ET"])
    assert per_case["c0"]["regions"]["ET"]["hd95"] == 373.13
    assert mean["ET"]["hd95"] == 373.13 and mean["ET"]["hd95_one_empty"] == 1
    assert mean["ET"]["hd95_both"] is None  # no case where both masks hold the region: no comparable mean
    assert mean["WT"]["hd95"] == 0.0 and mean["WT"]["hd95_one_empty"] == 0 and mean["WT"]["hd95_both"] == 0.0


def test_segmentation_table_states_the_hd95_convention(tmp_path, monkeypatch):
    from gem3d.evaluation import downstream, stages

    monkeypatch.chdir(tmp_path)
    cfg = _brats_cfg()
    for data in downstream.downstream_data(cfg):
        write_json(downstream.metrics_path(cfg, data, 0), metrics_record(data, ["x", "y"], ("WT", "TC", "ET")))
    stages.evaluate_segmentation(cfg)
    text = stages.table_path(cfg, "segmentation").with_suffix(".md").read_text()
    assert "MONAI's definition" in text and "larger of the two directed 95th-percentile" in text
    assert "one empty -> 373.13 mm" in text and "both masks empty -> 0" in text
    assert "hd95_both_mean" in text  # and the mean over the cases where both masks hold the region


def metrics_record(data: str, cases: list[str], regions, dice: float = 0.5, hd95: float = 2.0) -> dict:
    """A downstream metrics.json with per-case scores (every case the same)."""
    return {"data": data, "seed": 0, "mean": {r: {"dice": dice, "hd95": hd95} for r in regions},
            "cases": {c: {"regions": {r: {"dice": dice, "hd95": hd95, "n_pred": 5, "n_ref": 5} for r in regions}}
                      for c in cases}, "n_training_cases": 4, "test_cases": cases,
            "trainer": "T", "configuration": "3d_fullres", "fold": "all", "device": "cpu"}
