"""The conda environment of the rules agrees with pyproject.toml; the workflow is lint-clean."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO
from test_workflow import snakemake


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


def test_every_rule_uses_the_conda_env():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = len(re.findall(r"^\s*rule\b", text, flags=re.MULTILINE))
        assert rules == text.count('"../../envs/gem3d.yaml"'), smk.name


def test_lint_clean(tmp_path):
    res = snakemake(["--lint"], REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
