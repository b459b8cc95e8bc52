"""Smoke run of the whole Snakemake DAG on tiny synthetic data, then a rerun of single stages."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess

from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CONFIG
from test_comparisons import COMPARISONS
from test_workflow import BIN
from test_workflow import job_counts
from test_workflow import snakemake as run_snakemake

pytestmark = pytest.mark.slow

TABLES = ("generation_quality", "test_fidelity", "segmentation", "privacy")
# the toy method of tests/nearest_method.py, added the documented way (docs/architecture.md): its module in
# method_modules (importable: tests/ on PYTHONPATH), its name in comparisons; no network, so it costs the run little
TOY = {"method_modules": ["nearest_method"], "comparisons": [*COMPARISONS["comparisons"], "nearest"]}
SMOKE_CONFIG = {**TINY_CONFIG, **COMPARISONS, **TOY}  # the tiny run with the paper's other methods and the toy
TOY_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}


def snakemake(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """test_workflow's snakemake with tests/ on PYTHONPATH (the Snakefile and every job import the toy method)."""
    return run_snakemake(args, cwd, timeout, env=TOY_ENV)


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dag")
    cfg = workdir / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(SMOKE_CONFIG))
    res = snakemake(["--cores", "2", "--configfile", str(cfg)], workdir, timeout=1800)
    return workdir, cfg, res


def test_whole_dag_runs(dag_run):
    workdir, _, res = dag_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    root = workdir / "results" / "tiny"
    for table in TABLES:
        assert (root / "tables" / f"{table}.csv").stat().st_size > 0
        assert (root / "tables" / f"{table}.md").exists()
    for model in ("vae", "slice_model", "volume_stage1", "volume_stage2", "baseline_stage1", "baseline_stage2",
                  "controlnet_stage2", "crossattn_stage2", "pix2pix", "ldm3d", "nearest"):
        assert (root / "models" / f"{model}.pt").exists()
    assert (root / "tables" / "injection.csv").stat().st_size > 0  # Table 3
    assert (root / "report" / "tables" / "injection.html").exists()
    from gem3d.config import config_from_dict
    from gem3d.sampling.sets import enhancement_copies

    copies = enhancement_copies(config_from_dict(SMOKE_CONFIG, check_paths=False))
    assert copies
    for sample_set in ("baseline", "IC", "IC_MA", "IG", *copies, "deenhanced", "test_gem3d", "pix2pix", "ldm3d",
                       "test_pix2pix", "test_ldm3d", "test_controlnet", "test_crossattn", "nearest", "test_nearest"):
        assert (root / "samples" / sample_set / "manifest.json").exists()
    # the toy method's rows, each table note with its budget (issue #23)
    fidelity = (root / "tables" / "test_fidelity.md").read_text()
    assert "test_nearest" in fidelity and "Budget of nearest training volume (toy) (test_nearest)" in fidelity
    assert "nearest" in (root / "tables" / "generation_quality.csv").read_text()
    assert (workdir / "results" / "tiny" / "logs" / "train_nearest.log").exists()
    assert list((root / "figures").glob("*.png")), "figures missing"
    # every rule logged and benchmarked
    assert (workdir / "results" / "tiny" / "logs" / "train_vae.log").exists()
    assert (workdir / "results" / "tiny" / "benchmarks" / "train_vae.tsv").exists()


def test_downstream_nnunet_as_the_dag_ran_it(dag_run, monkeypatch):
    """The downstream rows' real nnU-Net v2 trainings (our trainer, 1 epoch x 2 iterations, CPU) as the DAG ran
    them: each row's record and predictions, every row preprocessed with the real row's plans, the mask adherence
    of every generated volume from one prediction call; an unchanged row is not retrained."""
    from gem3d.config import load_config
    from gem3d.data.slice_store import SliceStore
    from gem3d.evaluation import downstream, stages
    from gem3d.io import read_json
    from gem3d.paths import Paths
    from gem3d.sampling.sets import SampleSet, adherence_sets, downstream_rows

    workdir, cfg_path, res = dag_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    monkeypatch.chdir(workdir)
    cfg = load_config(cfg_path)
    test_ids = SliceStore(Paths(cfg).slices).case_ids("test")
    n_real = len(read_json(Paths(cfg).split)["train"])
    record = read_json(downstream.metrics_path(cfg, "real", 0))
    assert record["test_cases"] == test_ids and record["n_training_cases"] == n_real and record["seed"] == 0
    for case_id in test_ids:
        assert (downstream.segmentation_dir(cfg, "real", 0) / "predictions" / f"{case_id}.nii.gz").is_file()
        for m in record["cases"][case_id]["regions"].values():
            assert 0.0 <= m["dice"] <= 1.0 and (m["hd95"] is None or m["hd95"] >= 0.0)
        assert record["cases"][case_id]["spacing_mm"] == pytest.approx([1.0, 1.0, 1.0], abs=0.5)
    assert [c["epoch"] for c in record["curve"]] == [0] and len(record["curve"][0]["pseudo_dice"]) == 3
    debug = read_json(downstream.model_folder(cfg, "real", 0) / "debug.json")  # nnU-Net's record of the trainer
    assert debug["num_epochs"] == "1" and debug["num_iterations_per_epoch"] == "2"
    folder = downstream.model_folder(cfg, "real", 0)  # progress drawn at the end; no checkpoint chosen on training cases
    assert (folder / "progress.png").is_file() and not (folder / "checkpoint_best.pth").exists()

    root = downstream.nnunet_root(cfg) / "preprocessed"
    real_plans = read_json(root / downstream.dataset_name(cfg, "real")[1] / "nnUNetPlans.json")
    rows = downstream_rows(cfg)
    assert set(rows) - {"real"}, "the tiny run has generated rows"
    for data, spec in rows.items():
        plans = read_json(root / downstream.dataset_name(cfg, data)[1] / "nnUNetPlans.json")
        assert plans["dataset_name"] == downstream.dataset_name(cfg, data)[1]
        assert {**plans, "dataset_name": None} == {**real_plans, "dataset_name": None}  # the real row's plans
        generated = sum(len(SampleSet.open(cfg, name).volumes) for name in spec.sets)
        n = read_json(downstream.metrics_path(cfg, data, 0))["n_training_cases"]
        assert n == generated + (n_real if spec.real else 0), data

    volumes = 0
    for name in adherence_sets(cfg):
        entries = read_json(downstream.adherence_path(cfg, name))["volumes"]
        assert len(entries) == len(SampleSet.open(cfg, name).volumes)
        assert all(0.0 <= v["mean_dice"] <= 1.0 for v in entries)
        volumes += len(entries)
    # one prediction call for every set (nnU-Net and the model load once): its folder holds all their volumes
    assert len(list((downstream.adherence_dir(cfg) / "predictions").glob("*.nii.gz"))) == volumes

    checkpoint = downstream.model_folder(cfg, "real", 0) / "checkpoint_final.pth"
    mtime = checkpoint.stat().st_mtime_ns
    stages.train_segmentation(cfg, "real", 0)  # unchanged inputs: no retraining
    assert checkpoint.stat().st_mtime_ns == mtime


# The stages upstream of sampling: editing sampling.* or evaluation.* must not plan any of them.
UPSTREAM = {"make_phantoms", "import_data", "preprocess_nnunet", "build_slices", "train_vae", "encode_latents",
            "train_slice_model", "train_volume_stage1", "train_volume_stage2", "train_pix2pix", "train_ldm3d",
            "train_nearest"}


def planned(res: subprocess.CompletedProcess) -> set[str]:
    """Rules a `snakemake -n` would run (its 'Job stats' table; `all` left out); empty for 'Nothing to be done'."""
    return set(job_counts(res)) - {"all"}


def edited_config(workdir, edit) -> str:
    raw = copy.deepcopy(SMOKE_CONFIG)
    edit(raw)
    path = workdir / "edited" / f"{len(list(workdir.glob('edited/*.yaml')))}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_same_config_elsewhere_reruns_nothing(dag_run):
    """The config's path is not what defines the results: a copy under another name plans nothing."""
    workdir, cfg, first = dag_run
    assert first.returncode == 0
    copied = edited_config(workdir, lambda raw: None)
    assert planned(snakemake(["-n", "--configfile", copied], workdir)) == set()


def test_moved_checkout_reruns_nothing(dag_run, tmp_path):
    """The run folder and the workflow moved elsewhere together (a moved checkout) plan nothing."""
    workdir, cfg, first = dag_run
    assert first.returncode == 0
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved, symlinks=True)  # keeps modification times
    shutil.copytree(REPO / "workflow", moved / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, **TOY_ENV, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([str(BIN / "snakemake"), "-s", "workflow/Snakefile", "-n", "--configfile", "tiny.yaml"],
                         cwd=moved, env=env, capture_output=True, text=True, timeout=300)
    assert planned(res) == set()


def test_sampling_edit_reruns_sampling_and_after(dag_run):
    workdir, cfg, first = dag_run
    assert first.returncode == 0
    edited = edited_config(workdir, lambda raw: raw["sampling"].update(steps=3))
    rules = planned(snakemake(["-n", "--configfile", edited], workdir))
    assert {"sample_shard", "evaluate_generation", "evaluate_fidelity", "evaluate_privacy",
            "train_segmentation_enhanced_1x", "evaluate_segmentation", "figure_fig2_comparison",
            "figure_fig3_counterfactual", "render_tables"} <= rules, rules
    # nothing upstream, and nothing that reads no sample: real-data nnU-Net, the training curves
    assert not rules & (UPSTREAM | {"train_segmentation_real", "figure_training_curves"}), rules


def planned_sets(res: subprocess.CompletedProcess) -> set[str]:
    """The sample sets a `snakemake -n` would sample (the `set` wildcard of its sample_shard jobs)."""
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    return set(re.findall(r"rule sample_shard:\n(?:\s+\w+: .*\n)*?\s+wildcards: set=(\w+)", out))


def test_augmentation_edit_resamples_only_augmented_sets(dag_run):
    """Issue #24.6: editing an augmentation key resampled every set; now only the sets with augmented masks
    (here IC_MA; the enhancement copies are of IC), and no test set, no comparison method."""
    workdir, cfg, first = dag_run
    assert first.returncode == 0
    edited = edited_config(workdir, lambda raw: raw.setdefault("augmentation", {}).update(max_rotation_deg=2.0))
    res = snakemake(["-n", "--configfile", edited], workdir)
    assert planned_sets(res) == {"IC_MA"}, (res.stdout + res.stderr)[-3000:]
    assert not planned(res) & UPSTREAM


def test_evaluation_edit_reruns_only_evaluation(dag_run):
    from gem3d.sampling.sets import downstream_sets
    from gem3d.config import config_from_dict

    workdir, cfg, first = dag_run
    assert first.returncode == 0

    def edit(raw):
        raw["evaluation"]["privacy_quantile"] = 0.9
        raw["evaluation"]["segmentation"]["epochs"] = 2

    rules = planned(snakemake(["-n", "--configfile", edited_config(workdir, edit)], workdir))
    tiny = config_from_dict(SMOKE_CONFIG, check_paths=False)
    segmentation = {f"train_segmentation_{d}" for d in downstream_sets(tiny)}
    # the downstream figures draw the segmentation results; the adherence check segments the generated volumes
    # with the real row's network, which the new epochs retrain
    downstream = {"evaluate_adherence", "figure_adherence", "figure_downstream", "figure_segmentation_curves"}
    assert rules == {"evaluate_privacy", "evaluate_segmentation", "render_tables"} | downstream | segmentation


def test_rerun_one_stage_only(dag_run):
    workdir, cfg, first = dag_run
    assert first.returncode == 0
    tables = workdir / "results" / "tiny" / "tables"
    before = {p.name: p.stat().st_mtime_ns for p in tables.glob("*.csv")}
    # the target goes first: --forcerun takes several values and would swallow it
    res = snakemake(["results/tiny/tables/privacy.csv", "--cores", "2", "--configfile", str(cfg),
                     "--forcerun", "evaluate_privacy"], workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    # the job stats list exactly one job, and it is evaluate_privacy
    assert re.search(r"evaluate_privacy\s+1\n", out) and re.search(r"\ntotal\s+1\n", out), out[-3000:]
    assert "1 of 1 steps (100%) done" in out
    after = {p.name: p.stat().st_mtime_ns for p in tables.glob("*.csv")}
    assert after["privacy.csv"] > before["privacy.csv"]
    assert after["segmentation.csv"] == before["segmentation.csv"]


def test_nothing_left_to_do(dag_run):
    workdir, cfg, first = dag_run
    assert first.returncode == 0
    res = snakemake(["-n", "--configfile", str(cfg)], workdir)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr


def test_forcerun_retrains_a_stage(dag_run):
    """`--forcerun` on a finished training trains it again from step 0 (last: it changes a model file)."""
    workdir, cfg, first = dag_run
    assert first.returncode == 0
    res = snakemake(["results/tiny/models/volume_stage2.pt", "--cores", "2", "--configfile", str(cfg),
                     "--forcerun", "train_volume_stage2"], workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"train_volume_stage2\s+1\n", res.stdout + res.stderr)
    log = (workdir / "results" / "tiny" / "logs" / "train_volume_stage2.log").read_text()
    assert "steps 0->5" in log and "training starts over" in log, log[-2000:]


def test_failed_forced_reimport_keeps_the_dataset(dag_run, tmp_path):
    """A re-import that fails (a broken case) leaves the previous dataset whole: gem3d swaps a new one in
    only when complete, and the rule's update() outputs stop Snakemake from deleting dataset.json first."""
    workdir, cfg, _ = dag_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(workdir / "results" / "tiny", copy_dir / "results" / "tiny", symlinks=True)
    raw = copy_dir / "results" / "tiny" / "nnunet" / "raw"
    before = {p.relative_to(raw): p.read_bytes() for p in sorted(raw.rglob("*")) if p.is_file()}
    flair = sorted((copy_dir / "results" / "tiny" / "phantoms").rglob("*flair*.nii.gz"))[0]
    flair.write_bytes(b"not a nifti")
    res = snakemake(["results/tiny/split.json", "--cores", "1", "--configfile", str(cfg),
                     "--forcerun", "import_data"], copy_dir)
    assert res.returncode != 0
    log = (copy_dir / "results" / "tiny" / "logs" / "import_data.log").read_text().strip().splitlines()
    assert log[-1].startswith("error:") and flair.name in log[-1], log[-3:]
    after = {p.relative_to(raw): p.read_bytes() for p in sorted(raw.rglob("*")) if p.is_file()}
    assert after == before  # dataset.json and every case file as they were
