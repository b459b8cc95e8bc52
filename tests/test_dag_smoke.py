"""Smoke run of the whole Snakemake DAG on tiny synthetic data, then a rerun of single stages."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import TINY_CONFIG
from test_workflow import snakemake

pytestmark = pytest.mark.slow

TABLES = ("generation_quality", "test_fidelity", "segmentation", "privacy")


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dag")
    cfg = workdir / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_CONFIG))
    res = snakemake(["--cores", "2", "--configfile", str(cfg)], workdir, timeout=1800)
    return workdir, cfg, res


def test_whole_dag_runs(dag_run):
    workdir, _, res = dag_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    root = workdir / "results" / "tiny"
    for table in TABLES:
        assert (root / "tables" / f"{table}.csv").stat().st_size > 0
        assert (root / "tables" / f"{table}.md").exists()
    for model in ("vae", "slice_model", "volume_stage1", "volume_stage2", "baseline_stage1", "baseline_stage2"):
        assert (root / "models" / f"{model}.pt").exists()
    for sample_set in ("baseline", "IC", "IC_MA", "IG", "IC_MA_copy1", "deenhanced", "test_gem3d"):
        assert (root / "samples" / sample_set / "manifest.json").exists()
    assert list((root / "figures").glob("*.png")), "figures missing"
    # every rule logged and benchmarked
    assert (workdir / "results" / "tiny" / "logs" / "train_vae.log").exists()
    assert (workdir / "results" / "tiny" / "benchmarks" / "train_vae.tsv").exists()


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
