"""The Snakemake DAG: a dry run for every shipped config, and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_folder_dataset
from gem3d.cli import main

CONFIGS = sorted((REPO / "config").glob("*.yaml"))
BIN = Path(sys.executable).parent


def snakemake(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(cwd), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def stand_in_data(cfg_path: Path, workdir: Path) -> None:
    """A tiny folder where the config expects its data (the paper's data are not here)."""
    cfg = yaml.safe_load(cfg_path.read_text())
    if "phantoms" in cfg:
        return
    path = workdir / cfg["data"]["path"]
    path.mkdir(parents=True, exist_ok=True)
    if cfg["data"]["format"] == "folder":
        write_folder_dataset(path, n=2)


@pytest.mark.parametrize("cfg_path", CONFIGS, ids=lambda p: p.name)
def test_dry_run_every_config(tmp_path, cfg_path):
    stand_in_data(cfg_path, tmp_path)
    res = snakemake(["-n", "--configfile", str(cfg_path)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = res.stdout + res.stderr
    for rule in ("import_data", "preprocess_nnunet", "build_slices"):
        assert rule in out


def test_dry_run_rejects_bad_config(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["preprocess"]["bogus"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = snakemake(["-n", "--configfile", str(bad)], tmp_path)
    assert res.returncode != 0
    assert "unknown key at preprocess" in res.stderr + res.stdout and "bogus" in res.stderr + res.stdout


def test_cli_lists_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("phantoms", "import", "preprocess", "slices"):
        assert stage in out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "data": {"format": "folder", "path": str(tmp_path / "missing"),
                                                         "labels": {"background": 0, "a": 1}}}))
    assert main(["import", "--config", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "missing does not exist" in err[0]


def test_cli_stage_options_reach_the_function(monkeypatch, tmp_path):
    """`--stage` of train-volume must not clash with the subcommand name."""
    import gem3d.pipeline as pipeline
    from gem3d.commands import all_commands

    seen = {}
    command = all_commands()["train-volume"]
    monkeypatch.setitem(pipeline.COMMANDS, "train-volume",
                        type(command)(lambda cfg, **kw: seen.update(kw), command.help, command.args))
    assert main(["train-volume", "--stage", "2", "--model", "baseline", "--config",
                 str(REPO / "config" / "config.yaml")]) == 0
    assert seen == {"stage": 2, "model": "baseline"}


def test_readme_quick_start_has_two_blocks_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    assert len(blocks) == 2, "Quick start must hold exactly two fenced code blocks"
    run_demo, run_tests = (b.split("\n", 1)[1].strip() for b in blocks)
    assert "snakemake" in run_demo and "pip install" in run_demo
    assert run_tests in (REPO / ".ci" / "run").read_text(), "CI must run the README's test command"
