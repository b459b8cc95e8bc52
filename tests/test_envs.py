"""envs/gem3d.yaml (a conda environment for running the workflow) agrees with pyproject.toml; no rule asks
Snakemake to build it; the workflow is lint-clean apart from that."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO
from test_workflow import NO_SOFTWARE_LINT, lint_findings, snakemake


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()


def test_conda_env_pins_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "gem3d.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_reqs = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    project_reqs = {_name(r): r.replace(" ", "") for r in project}
    # every package the rules import is pinned the same way in both files
    for name, requirement in env_reqs.items():
        assert name in project_reqs, f"envs/gem3d.yaml has {name}, pyproject.toml does not"
        assert requirement == project_reqs[name], f"{name}: envs {requirement} != pyproject {project_reqs[name]}"
    for name in ("torch", "torchvision", "nnunetv2"):
        assert "==" in env_reqs[name], f"{name} must be pinned exactly"
    assert any(r.startswith("-e") for r in pip), "the env must install gem3d itself"


def test_no_rule_builds_a_conda_env():
    """Snakemake would build envs/gem3d.yaml from its copy under .snakemake/conda/, where the file's
    `-e ../` no longer points at the checkout: the rules run in the environment Snakemake runs in."""
    for smk in [REPO / "workflow" / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]:
        assert not re.search(r"^\s*conda:", smk.read_text(), flags=re.MULTILINE), smk.name
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert "software-deployment-method" not in profile and "use-conda" not in profile
    env = yaml.safe_load((REPO / "envs" / "gem3d.yaml").read_text())
    assert env["name"] == "gem3d"  # `conda env create -f envs/gem3d.yaml` (docs/cluster.md)


def test_lint_clean_apart_from_the_software_definition():
    res = snakemake(["--lint"], REPO)
    assert lint_findings(res.stdout + res.stderr) == {NO_SOFTWARE_LINT}, res.stdout[-3000:] + res.stderr[-3000:]
