"""Evaluation stages on a tiny real pipeline state: phantoms -> import -> nnU-Net preprocessing ->
slice store (run once per module), then fake sample sets in the sampling layout (real cases plus
noise), then the tables; the downstream nnU-Net is trained for real (1 epoch, 2 iterations; slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from gem3d.cli import main
from gem3d.config import load_config
from gem3d.data.slice_store import SliceStore
from gem3d.evaluation import downstream
from gem3d.evaluation import stages
from gem3d.sampling import sets as samples
from gem3d.evaluation.tables import markdown_table
from gem3d.io import InputError, read_json, write_json
from gem3d.paths import Paths
from gem3d.pipeline import build_slices, import_data, make_phantoms, preprocess

torch.set_num_threads(2)

LABELS = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 3}
RAW = {
    "name": "evaltest",
    "data": {"format": "brats", "path": "results/evaltest/phantoms", "labels": LABELS, "modality": "FLAIR",
             "test_fraction": 0.34},
    "phantoms": {"n_cases": 6, "shape": [32, 32, 24], "n_scanners": 2, "seed": 0},
    "preprocess": {"dataset_id": 931, "num_processes": 1, "slice_size": 32},
    "vae": {"model": {"channel_mult": [1, 2]}},  # latents 16x16: the default U-Nets' factor 8 divides them
    "sampling": {"sets": {"IC": {"informed": "IC", "augment": False}, "IC_MA": {"informed": "IC", "augment": True}},
                 "enhancement_set": "IC_MA", "enhancement_multiples": [1, 2]},
    "evaluation": {"fid_extractor": "random_conv", "fid_batch_size": 64,
                   "segmentation": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "num_processes": 1}},
}
NOISE = {"baseline": 0.0, "IC": 0.4, "IC_MA": 0.2, "IC_MA_copy1": 0.2,
         "test_gem3d": 0.02, "test_baseline": 0.5, "test_no_overlap": 0.1, "test_no_stage2": 0.2}


def write_config(root: Path, name: str = "evaltest", **changes) -> Path:
    raw = json.loads(json.dumps(RAW))
    raw["name"] = name
    for key, value in changes.items():  # "evaluation.lpips_backbone_weights" -> nested key
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def write_set(cfg, name: str, kind: str, cases: list[str], noise: float, seed: int = 0, copy: int = 0,
              size: int | None = None) -> None:
    """A sample set in the sampling layout: the real cases' slices + Gaussian noise, their labels, their NIfTIs."""
    paths = Paths(cfg)
    store = SliceStore(paths.slices)
    root = paths.samples(name)
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("slices", "imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    volumes = []
    for case_id in cases:
        case = store.load(case_id)
        image, label = case.image, case.label
        if size is not None:  # another slice geometry
            image, label = image[:, :size, :size], label[:, :size, :size]
        image = np.clip(image + noise * rng.standard_normal(image.shape), -1, 1)
        sample_id = f"{case_id}_c{copy}"
        np.savez(root / "slices" / f"{sample_id}.npz", image=image.astype(np.float16), label=label.astype(np.int8))
        raw_image = case.geometry.get("raw_image")  # the real case's NIfTIs stand in for the generated ones
        if raw_image:
            raw = Path(raw_image).parent.parent
            shutil.copy(raw_image, root / "imagesTr" / f"{sample_id}_0000.nii.gz")
            shutil.copy(raw / "labelsTr" / f"{case_id}.nii.gz", root / "labelsTr" / f"{sample_id}.nii.gz")
        volumes.append({"sample_id": sample_id, "source_case": case_id, "copy": copy, "informed": {}, "start": 0,
                        "augmentation": None, "seed": seed, "checkpoints": {}})
    write_json(root / "manifest.json", {"set": name, "kind": kind, "volumes": volumes})


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """results/evaltest with a real slice store + nnU-Net raw dataset and every sample set (cwd: the folder)."""
    root = tmp_path_factory.mktemp("eval")
    old = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(write_config(root), check_paths=False)
        make_phantoms(cfg)
        import_data(cfg)
        preprocess(cfg)
        build_slices(cfg)
        store = SliceStore(Paths(cfg).slices)
        train, test = store.case_ids("train"), store.case_ids("test")
        for i, name in enumerate(samples.privacy_sets(cfg)):
            write_set(cfg, name, "train_masks", train, NOISE[name], seed=i, copy=1 if "copy" in name else 0)
        for i, name in enumerate(samples.test_sets(cfg)):
            write_set(cfg, name, "test_true", test, NOISE[name], seed=10 + i)
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def cfg(state, monkeypatch):
    monkeypatch.chdir(state)
    return load_config(state / "evaltest.yaml")


def other_config(state: Path, name: str, **changes):
    """A config sharing the slice store (and raw dataset) of `evaltest` under another results name."""
    path = write_config(state, name, **changes)
    for sub in ("slices", "nnunet", "split.json"):
        link = state / "results" / name / sub
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(state / "results" / "evaltest" / sub)
    return load_config(path)


def read_table(cfg, key: str) -> pd.DataFrame:
    path = stages.table_path(cfg, key)
    assert path.with_suffix(".md").is_file()
    return pd.read_csv(path)


# ----------------------------------------------------------------------------- set names, tables
def test_set_names(cfg):
    assert samples.generation_sets(cfg) == ["baseline", "IC", "IC_MA"]
    assert samples.enhancement_copies(cfg) == ["IC_MA_copy1"]
    assert downstream.downstream_data(cfg) == ["real", "enhanced_1x", "enhanced_2x", "baseline"]
    # registry order: GEM-3D with its ablations, then the mask-only baseline (gem3d/methods/registry.py)
    assert samples.test_sets(cfg) == ["test_gem3d", "test_no_overlap", "test_no_stage2", "test_baseline"]


def test_markdown_table_formats_cells():
    df = pd.DataFrame({"set": ["a", "b|c"], "x": [1.234567, float("nan")], "n": [3, 4]})
    text = markdown_table(df)
    assert text.splitlines()[0] == "| set | x | n |"
    assert "| a | 1.235 | 3 |" in text and "b\\|c | n/a | 4" in text


# ----------------------------------------------------------------------------- Table 1: FID
def test_running_moments_match_numpy():
    from gem3d.evaluation.quality import RunningMoments

    f = np.random.default_rng(0).normal(size=(57, 5)) * [1, 2, 3, 4, 5] + 7
    m = RunningMoments()
    for chunk in (f[:1], f[1:20], f[20:20], f[20:]):
        m.update(chunk)
    assert m.n == 57
    np.testing.assert_allclose(m.mean, f.mean(0))
    np.testing.assert_allclose(m.covariance(), np.cov(f, rowvar=False))


def test_generation_quality_table(cfg):
    assert main(["evaluate-generation", "--config", cfg.source]) == 0
    df = read_table(cfg, "generation").set_index("set")
    assert list(df.index) == ["baseline", "IC", "IC_MA"]
    assert {"FID-A", "FID-C", "FID-S", "n_volumes", "extractor"} <= set(df.columns)
    assert (df["n_volumes"] == 4).all() and df["extractor"].str.contains("random_conv").all()
    for col in ("FID-A", "FID-C", "FID-S"):
        assert abs(df.loc["baseline", col]) < 1e-6  # the real volumes themselves
        assert df.loc["IC", col] > df.loc["IC_MA", col] > 1e-3  # more noise, larger FID
    md = stages.table_path(cfg, "generation").with_suffix(".md").read_text()
    assert "Extractor: random_conv" in md and "not comparable" in md


def test_generation_missing_weights_and_bad_sets(state, cfg, capsys):
    bad = write_config(state, "evalweights", **{"evaluation.fid_extractor": "radimagenet_resnet50",
                                                "evaluation.fid_weights": "nowhere/radimagenet.pth"})
    assert main(["evaluate-generation", "--config", str(bad)]) == 2  # refused when the config loads
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "evaluation.fid_weights: weights missing at nowhere/radimagenet.pth" in err[0]
    unset = other_config(state, "evalunset", **{"evaluation.fid_extractor": "inception_v3"})
    with pytest.raises(InputError, match="fid_weights is not set"):
        stages.evaluate_generation(unset)

    geo = other_config(state, "evalgeo")
    store = SliceStore(Paths(geo).slices)
    write_set(geo, "baseline", "train_masks", store.case_ids("train"), 0.0)
    write_set(geo, "IC", "train_masks", store.case_ids("train"), 0.0, size=16)  # 16 x 16 slices vs 32 x 32
    write_set(geo, "IC_MA", "train_masks", store.case_ids("train"), 0.0)
    with pytest.raises(InputError, match="16x16 slices but the slice store has 32x32"):
        stages.evaluate_generation(geo)
    write_json(Paths(geo).samples("IC") / "manifest.json", {"set": "IC", "kind": "train_masks", "volumes": []})
    with pytest.raises(InputError, match="sample set IC is empty"):
        stages.evaluate_generation(geo)
    shutil.rmtree(Paths(geo).samples("IC"))
    with pytest.raises(InputError, match="sample set IC not found"):
        stages.evaluate_privacy(geo)


# ----------------------------------------------------------------------------- Table 2: paired fidelity
def test_fidelity_table_without_lpips_weights(cfg):
    stages.evaluate_fidelity(cfg)
    df = read_table(cfg, "fidelity").set_index("method")
    assert list(df.index) == ["test_gem3d", "test_no_overlap", "test_no_stage2", "test_baseline"]
    assert (df["n"] == 2).all()
    assert (df["LPIPS"] == "not computed: no backbone weights configured").all()
    assert df.loc["test_gem3d", "PSNR"] > 35 > df.loc["test_baseline", "PSNR"]
    assert df.loc["test_gem3d", "MS-SSIM"] > 0.95 > df.loc["test_baseline", "MS-SSIM"]
    assert df.loc["test_gem3d", "SSIM"] > df.loc["test_no_stage2", "SSIM"] > df.loc["test_baseline", "SSIM"]
    assert (df["MS-SSIM scales"].astype(str) == "2").all()  # 32 x 32 slices: 2 scales
    assert "scales used: 2" in stages.table_path(cfg, "fidelity").with_suffix(".md").read_text()


def test_fidelity_lpips_missing_and_given_weights(state, cfg):
    from torchvision.models import alexnet

    with pytest.raises(InputError, match="evaluation.lpips_backbone_weights: weights missing at nowhere/alexnet.pth"):
        other_config(state, "evallpips", **{"evaluation.lpips_backbone_weights": "nowhere/alexnet.pth"})

    torch.manual_seed(0)
    weights = state / "alex_features.pth"
    torch.save(alexnet(weights=None).features.state_dict(), weights)  # random weights, the real architecture
    given = other_config(state, "evallpips", **{"evaluation.lpips_backbone_weights": str(weights)})
    for name in samples.test_sets(given):
        shutil.copytree(Paths(cfg).samples(name), Paths(given).samples(name), dirs_exist_ok=True)
    stages.evaluate_fidelity(given)
    df = read_table(given, "fidelity").set_index("method")
    lpips = df["LPIPS"].astype(float)
    assert lpips["test_gem3d"] < lpips["test_baseline"]
    assert df["LPIPS model"].str.contains("lpips-alex").all()


def test_fidelity_too_small_slices(state, cfg):
    """A slice store of 12 x 12 slices: MS-SSIM cannot run; one line says so."""
    small = other_config(state, "evalsmall")
    (state / "results" / "evalsmall" / "slices").unlink()
    root = Paths(small).slices
    root.mkdir()
    rng = np.random.default_rng(0)
    cases = {}
    for case_id in ("a", "b", "c"):
        np.save(root / f"{case_id}_image.npy", rng.uniform(-1, 1, (4, 12, 12)).astype(np.float16))
        np.save(root / f"{case_id}_label.npy", np.zeros((4, 12, 12), np.int8))
        np.save(root / f"{case_id}_label_native.npy", np.zeros((4, 12, 12), np.int8))
        cases[case_id] = {}
    write_json(root / "index.json", {"slice_size": 12, "labels": LABELS, "max_label": 3,
                                     "split": {"train": ["a", "b"], "test": ["c"]}, "cases": cases})
    for name in samples.test_sets(small):
        write_set(small, name, "test_true", ["c"], 0.1)
    with pytest.raises(InputError, match="12x12 too small for MS-SSIM"):
        stages.evaluate_fidelity(small)


# ----------------------------------------------------------------------------- privacy
def test_privacy_tables(cfg):
    assert main(["evaluate-privacy", "--config", cfg.source]) == 0
    df = read_table(cfg, "privacy")
    assert len(df) == 4 * len(samples.privacy_sets(cfg))  # one row per generated volume
    assert {"set", "sample_id", "nearest_training", "pearson", "mse", "near_copy", "threshold_pearson"} \
        <= set(df.columns)
    base = df[df["set"] == "baseline"]
    assert base["near_copy"].all() and base["nearest_is_source"].all() and (base["pearson"] > 0.999).all()
    assert df[df["set"] == "IC"]["pearson"].mean() < base["pearson"].mean()
    training = read_table(cfg, "privacy_training")
    assert len(training) == 4 and (training["nearest_training"] != training["training_case"]).all()
    summary = read_table(cfg, "privacy_summary")
    assert summary["set"].iloc[0].startswith("training") and list(summary["set"][1:]) == samples.privacy_sets(cfg)
    md = stages.table_path(cfg, "privacy_summary").with_suffix(".md").read_text()
    assert "quantile of the training volumes" in md


# ----------------------------------------------------------------------------- Table 4: downstream nnU-Net
def test_enhanced_raw_dataset_links_every_copy(cfg):
    cases, sources = downstream.training_cases(cfg, "enhanced_2x")
    assert sources == ["IC_MA", "IC_MA_copy1"] and len(cases) == 8
    raw = downstream.build_raw_dataset(cfg, "enhanced_2x", cases)
    assert raw.name == "Dataset943_evaltest_enhanced_2x"
    images = sorted((raw / "imagesTr").iterdir())
    assert len(images) == 8 and all(p.is_symlink() and p.exists() for p in images)
    assert read_json(raw / "dataset.json")["numTraining"] == 8
    with pytest.raises(InputError, match="allowed: real, enhanced_1x, enhanced_2x, baseline"):
        downstream.training_cases(cfg, "enhanced_3x")


def test_the_adherent_row_names_the_volumes_it_leaves_out(cfg, caplog):
    """Found in review: the volumes min_adherence drops were listed nowhere (rebuilt by hand from the table)."""
    import dataclasses
    import logging

    seg = dataclasses.replace(cfg.evaluation.segmentation, min_adherence=0.5)
    adherent = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, segmentation=seg))
    written = []
    for name in ("IC_MA", "IC_MA_copy1"):
        volumes = [e["sample_id"] for e, _ in downstream.set_cases(cfg, name)]
        path = downstream.adherence_path(cfg, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"volumes": [{"sample_id": v, "mean_dice": 0.2 if i == 0 else 0.9}
                                      for i, v in enumerate(volumes)]})
        written.append((path, (name, volumes[0])))
    try:
        with caplog.at_level(logging.INFO, logger="gem3d.evaluation"):
            cases, _ = downstream.training_cases(adherent, "enhanced_2x_adherent")
        assert len(cases) == 8 - 2
        assert "enhanced_2x_adherent leaves out 2 volumes below min_adherence" in caplog.text
        assert all(f"{name}/{sample}" in caplog.text for _, (name, sample) in written)
        assert downstream.below_threshold(adherent, ["IC_MA", "IC_MA_copy1"]) == {w for _, w in written}
    finally:
        for path, _ in written:
            path.unlink()


def test_segmentation_table_collects_every_data_and_seed(state, cfg):
    """Table 4 from per-case metrics of every row x seed: means with intervals over test cases (seeds pooled per
    case), the seed spread, the paired difference to real, the HD95 over cases with both masks, and the long CSV."""
    from test_paper_faithful import metrics_record

    other = other_config(state, "evalseg", **{"evaluation.segmentation.seeds": 2})
    regions = list(downstream.segmentation_regions(other))
    assert regions == ["WT", "TC", "ET"]
    cases = [f"case{i}" for i in range(8)]
    for i, data in enumerate(downstream.downstream_data(other)):
        for seed in (0, 1):
            record = metrics_record(data, cases, regions, dice=0.5 + 0.1 * i + 0.02 * seed)
            for k, case in enumerate(cases):  # per-case variation; ET of case 0 missed (373.13 mm, one empty)
                for region in regions:
                    record["cases"][case]["regions"][region] = {"dice": 0.5 + 0.1 * i + 0.02 * seed + 0.01 * k,
                                                                "hd95": 2.0 + i + 0.1 * k, "n_pred": 5, "n_ref": 5}
            record["cases"]["case0"]["regions"]["ET"] = {"dice": 0.0, "hd95": 373.13, "n_pred": 0, "n_ref": 5}
            write_json(downstream.metrics_path(other, data, seed), record)
    stages.evaluate_segmentation(other)
    df = read_table(other, "segmentation").set_index(["row", "region"])
    assert list(dict.fromkeys(df.index.get_level_values(0))) == downstream.downstream_data(other)
    wt = df.loc[("real", "WT")]
    assert wt["dice_mean"] == pytest.approx(0.5 + 0.01 + 0.035)  # seeds pooled, then the mean over cases
    assert wt["dice_ci_low"] < wt["dice_mean"] < wt["dice_ci_high"] and wt["n_cases"] == 8 and wt["n_seeds"] == 2
    assert wt["dice_seed_std"] == pytest.approx(np.std([0.545, 0.565], ddof=1))
    assert df.loc[("enhanced_1x", "WT"), "dice_diff"] == pytest.approx(0.1)  # paired by case, minus real
    assert bool(df.loc[("enhanced_1x", "WT"), "dice_diff_excludes_0"])  # +0.1 on every case
    et = df.loc[("real", "ET")]
    assert et["hd95_both_mean"] == pytest.approx(np.mean([2.0 + 0.1 * k for k in range(1, 8)]))
    assert et["hd95_mean"] > 40  # the missed region counts 373.13 mm in the main mean
    assert df.loc[("real", "WT"), "label"] == "real"
    long = pd.read_csv(stages.table_path(other, "segmentation_cases"))
    assert len(long) == len(downstream.downstream_data(other)) * 2 * 8 * 3
    text = stages.table_path(other, "segmentation").with_suffix(".md").read_text()
    assert "bootstrap interval over test cases" in text and "paired by case id" in text
    downstream.metrics_path(other, "baseline", 1).unlink()
    with pytest.raises(InputError, match="segmentation metrics of baseline seed 1 not found"):
        stages.evaluate_segmentation(other)


def test_downstream_rows_and_their_dataset_ids(state):
    other = other_config(state, "evalrows", **{"evaluation.segmentation.real_plus": [2],
                                               "evaluation.segmentation.min_adherence": 0.6})
    rows = samples.downstream_rows(other)
    assert list(rows) == ["real", "enhanced_1x", "enhanced_2x", "baseline", "real_enhanced_2x",
                          "enhanced_2x_adherent"]
    assert rows["real_enhanced_2x"].real and rows["real_enhanced_2x"].sets == ("IC_MA", "IC_MA_copy1")
    assert rows["enhanced_2x_adherent"].adherent and not rows["enhanced_2x_adherent"].real
    ids = [downstream.dataset_name(other, r)[0] for r in rows]
    assert len(set(ids)) == len(ids)
    assert samples.adherence_sets(other) == ["IC_MA", "IC_MA_copy1", "baseline"]
    # the table note says whose volumes the filter leaves out: the adherent row's sets, not the baseline's
    assert stages.adherent_row_sets(other) == ["IC_MA", "IC_MA_copy1"]
    with pytest.raises(InputError, match=r"evaluation\.segmentation\.real_plus: \[3\] not in sampling"):
        other_config(state, "evalbad", **{"evaluation.segmentation.real_plus": [3]})


NNUNET_LOG = """2026-12-06 02:01:58.809692: Epoch 0 
2026-12-06 02:01:58.809814: Current learning rate: 0.01 
2026-12-06 02:04:03.050359: Pseudo dice [np.float32(0.0), np.float32(0.25)] 
2026-12-06 02:04:03.050516: Epoch time: 124.24 s 
2026-12-06 02:04:03.778433: Epoch 1 
2026-12-06 02:04:03.778438: Pseudo dice [0.5, 0.7] 
"""


def test_training_curve_from_nnunets_log(tmp_path):
    (tmp_path / "training_log_2026_12_6_02_01_57.txt").write_text(NNUNET_LOG)
    (tmp_path / "training_log_2026_12_6_03_00_00.txt").write_text(  # a resumed run's log continues
        "2026-12-06 03:00:00.000000: Epoch 2 \n2026-12-06 03:00:01.000000: Pseudo dice [np.float64(0.8), nan] \n")
    curve = downstream.training_curve(tmp_path)
    assert [c["epoch"] for c in curve] == [0, 1, 2]
    assert curve[0]["pseudo_dice"] == [0.0, 0.25] and curve[1]["mean"] == pytest.approx(0.6)
    assert curve[2]["mean"] == pytest.approx(0.8)  # NaN classes (never seen in validation) are left out


def test_training_curve_takes_the_newest_log_of_an_epoch(tmp_path):
    """Found in review: nnU-Net's log names do not zero-pad month and day, so 12_10 sorted before 12_9 and a
    restarted training's curve showed the discarded run's values."""
    (tmp_path / "training_log_2026_12_9_23_00_00.txt").write_text(
        "2026-12-09 23:00:00.000000: Epoch 0 \n2026-12-09 23:00:01.000000: Pseudo dice [0.1, 0.1] \n")
    (tmp_path / "training_log_2026_12_10_01_00_00.txt").write_text(
        "2026-12-10 01:00:00.000000: Epoch 0 \n2026-12-10 01:00:01.000000: Pseudo dice [0.9, 0.9] \n")
    assert downstream.training_curve(tmp_path)[0]["pseudo_dice"] == [0.9, 0.9]


def test_a_short_training_checkpoints_often_enough_to_resume_and_its_seed_defines_it(state, cfg):
    """Found in review: nnU-Net checkpoints every 50 epochs, so the studies' 30-epoch trainings, killed, restarted
    from epoch 0; and the config's seed (which sets nnU-Net's) was not in the training signature."""
    from gem3d.evaluation.nnunet_trainer import checkpoint_interval

    assert checkpoint_interval(30, 50) == 3 and checkpoint_interval(5, 50) == 1 and checkpoint_interval(1000, 50) == 50
    other = other_config(state, "evalseed", seed=7)
    assert downstream.training_signature(cfg, {"n_cases": 3}, 0) != downstream.training_signature(other, {"n_cases": 3}, 0)
    assert downstream.training_signature(cfg, {"n_cases": 3}, 1)["nnunet_seed"] == cfg.seed * 1000 + 1


def test_a_second_call_on_one_row_is_refused_while_the_first_runs(state):
    """Noticed in review: two direct `gem3d prepare-segmentation` / `train-segmentation` calls on one row at once
    wrote the same nnU-Net folders (Snakemake's lock covers only its own workflow)."""
    import fcntl

    other = other_config(state, "evallock")
    calls = (("prepare_real", lambda: downstream.prepare_row(other, "real"),
              r"prepare_real: another process \(pid 4242\) is preparing the nnU-Net dataset of row real now"),
             ("train_real_seed0", lambda: downstream.run_downstream(other, "real", 0),
              r"train_real_seed0: another process \(pid 4242\) is training row real with seed 0 now"))
    for job, call, match in calls:
        lock = downstream.lock_path(other, job)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock.with_name(lock.name + ".lock"), "a+") as held:  # the first call, still running
            held.truncate(0)
            held.write("4242\n")
            held.flush()
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(InputError, match=match) as err:
                call()
            assert "\n" not in str(err.value)
    with pytest.raises(InputError) as err:  # released: the call goes on (to this run's missing split)
        downstream.run_downstream(other, "real", 0)
    assert "another process" not in str(err.value)


def test_configuration_must_be_one_nnunet_planned(state, cfg, tmp_path):
    plans = tmp_path / "nnUNetPlans.json"
    write_json(plans, {"configurations": {"2d": {}, "3d_fullres": {}, "3d_cascade_fullres": {}}})
    downstream.check_configuration(cfg, plans)  # 3d_fullres
    for conf, match in (("3d_lowres", r"'3d_lowres' is not one nnU-Net planned .* 2d, 3d_cascade_fullres, 3d_fullres"),
                        ("3d_cascade_fullres", r"needs its 3d_lowres stage")):
        other = other_config(state, f"evalconf{conf[:3]}", **{"evaluation.segmentation.configuration": conf})
        with pytest.raises(InputError, match=match):
            downstream.check_configuration(other, plans)


def test_plans_edits_set_the_batch_and_scale_every_stage(tmp_path):
    """evaluation.segmentation.batch_size / base_features edit a copy of nnU-Net's plans, and nnU-Net builds the
    narrower network from them (an inheriting configuration gets its own architecture)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [32, 64, 128], "conv_op": "torch.nn.modules.conv.Conv2d",
                            "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]],
                            "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"configurations": {"2d": {"batch_size": 44, "architecture": arch},
                                "2d_wide": {"inherits_from": "2d", "batch_size": 20}}}
    before = json.dumps(plans, sort_keys=True)
    edited = downstream.edit_plans(plans, "2d", 12, 16)
    assert json.dumps(plans, sort_keys=True) == before  # the caller's plans are left as they were
    conf = edited["configurations"]["2d"]
    assert conf["batch_size"] == 12 and conf["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64]
    child = downstream.edit_plans(plans, "2d_wide", None, 8)["configurations"]
    assert child["2d_wide"]["batch_size"] == 20
    assert child["2d_wide"]["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32]
    assert child["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] == [32, 64, 128]
    assert downstream.edit_plans(plans, "2d", None, None) == plans
    a = conf["architecture"]
    net = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, 3,
                                 deep_supervision=False)
    out = net(torch.zeros(2, 1, 16, 16))
    assert out.shape == (2, 3, 16, 16)
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)][0] == 16
    # scripts/bench_nnunet_train.py times a training step of the edited network
    spec = importlib.util.spec_from_file_location("bench_nnunet_train", REPO / "scripts" / "bench_nnunet_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plans["configurations"]["2d"]["patch_size"] = [16, 16]
    assert 0 < bench.step_seconds(plans, "2d", 2, 8, steps=1) < 60


def test_trainer_length_from_environment(monkeypatch):
    from gem3d.evaluation.nnunet_trainer import ENV_EPOCHS, env_positive_int, plots_after

    assert [e for e in range(30) if plots_after(e, 3, 30)] == list(range(2, 30, 3))  # each checkpoint, the last
    assert [e for e in range(7) if plots_after(e, 3, 7)] == [2, 5, 6]

    monkeypatch.delenv(ENV_EPOCHS, raising=False)
    assert env_positive_int(ENV_EPOCHS, 1000) == 1000
    monkeypatch.setenv(ENV_EPOCHS, "3")
    assert env_positive_int(ENV_EPOCHS, 1000) == 3
    for bad in ("0", "x"):
        monkeypatch.setenv(ENV_EPOCHS, bad)
        with pytest.raises(ValueError, match=ENV_EPOCHS):
            env_positive_int(ENV_EPOCHS, 1000)


def test_nnunet_environment(state, cfg, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    train_env = downstream.nnunet_run_env(cfg, training=True)
    assert train_env["nnUNet_n_proc_DA"] == "1" and train_env["GEM3D_NNUNET_EPOCHS"] == "1"
    assert "GEM3D_NNUNET_THREADS" not in train_env and train_env["GEM3D_NNUNET_SEED"] == "0"
    assert downstream.nnunet_run_env(cfg, training=True, seed=2)["nnUNet_results"].endswith("results/seed2")
    inline = other_config(state, "evalenv", **{"evaluation.segmentation.augmentation_processes": 0})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Snakemake's share of cores for the job
    env = downstream.nnunet_run_env(inline, training=True)
    assert env["nnUNet_n_proc_DA"] == "0" and env["GEM3D_NNUNET_THREADS"] == "1"
    assert "nnUNet_n_proc_DA" not in downstream.nnunet_run_env(cfg, training=False)
    shim = Path(train_env["nnUNet_extTrainer"]) / "gem3d_nnunet_trainers.py"
    assert "nnUNetTrainerGem3d" in shim.read_text()
    assert Path(train_env["nnUNet_raw"]) == (Paths(cfg).evaluation / "nnunet" / "raw").resolve()


@pytest.mark.parametrize("mirroring", [True, False])
def test_prediction_mirrors_unless_the_config_says_not(state, monkeypatch, tmp_path, mirroring):
    """evaluation.segmentation.test_time_mirroring: false hands nnU-Net --disable_tta (a quarter of a 2d
    prediction's time: the demo's adherence check 57 -> 22 s); true (the default) keeps nnU-Net's mirroring."""
    run = other_config(state, f"evaltta{int(mirroring)}", **{"evaluation.segmentation.test_time_mirroring": mirroring})
    case = downstream.Case("c1", tmp_path / "c1.nii.gz", tmp_path / "c1_label.nii.gz")
    case.image.write_bytes(b"")
    commands = []

    def fake_nnunet(cmd, env, what):
        commands.append(cmd)
        (Path(cmd[cmd.index("-o") + 1]) / "c1.nii.gz").write_bytes(b"")

    monkeypatch.setattr(downstream, "run_logged", fake_nnunet)
    downstream.predict(run, "real", 0, [case], tmp_path / "predictions")
    assert (tmp_path / "predictions" / "c1.nii.gz").is_file()
    assert ("--disable_tta" in commands[0]) is not mirroring


def test_train_segmentation_needs_its_prepared_dataset(cfg):
    """Training a row before `prepare-segmentation` is a one-line refusal (exit 2). The real nnU-Net trainings,
    predictions and adherence are checked on the whole-DAG smoke run (tests/test_dag_smoke.py)."""
    assert main(["train-segmentation", "--data", "real", "--config", cfg.source]) == 2


def test_rules_dry_run(state, cfg):
    """The evaluation rules run on the existing state: 4 tables + one nnU-Net job per training data."""
    bin_dir = Path(sys.executable).parent
    snakefile = REPO / "workflow" / "Snakefile"
    if "rules/evaluation.smk" not in snakefile.read_text():  # not yet included by the main Snakefile
        wrapper = state / "Snakefile.eval"
        wrapper.write_text(f'include: "{snakefile}"\ninclude: "{REPO / "workflow" / "rules" / "evaluation.smk"}"\n')
        snakefile = wrapper
    rules = ["evaluate_generation", "evaluate_fidelity", "evaluate_segmentation", "evaluate_privacy",
             "evaluate_adherence"] + [f"{step}_segmentation_{d}" for d in downstream.downstream_data(cfg)
                                      for step in ("prepare", "train")]
    targets = [str(stages.table_path(cfg, k)) for k in ("generation", "fidelity", "segmentation", "privacy",
                                                         "adherence")]
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([str(bin_dir / "snakemake"), "-s", str(snakefile), "-d", str(state), "-n", "--configfile",
                          cfg.source, "--allowed-rules", *rules, "--forceall", *targets],
                         cwd=state, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    for rule in rules:
        assert rule in out
