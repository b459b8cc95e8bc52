"""The `gem3d` command line: --version, help on every option, how a failing stage ends (exit code,
last stderr line, traceback or not) and what its --log file holds."""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import logging
import shutil
import sys

import pytest
import yaml

from conftest import TINY_CONFIG
from gem3d import pipeline
from gem3d.cli import build_parser, main, version
from gem3d.config import config_from_dict
from gem3d.io import InputError
from gem3d.paths import Paths


def test_version(capsys):
    from importlib.metadata import version as dist_version

    import gem3d

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gem3d {version()}"
    assert version() in (dist_version("gem3d"), gem3d.__version__)
    from conftest import REPO

    assert f'version = "{gem3d.__version__}"' in (REPO / "pyproject.toml").read_text()  # one version, two places


def test_license_is_the_apache_2_text_readme_and_package_metadata_name():
    from conftest import REPO

    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
    assert "Apache-2.0" in (REPO / "README.md").read_text()
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()


def test_every_option_has_help():
    parser = build_parser()
    missing = [f"gem3d {'/'.join(a.option_strings)}" for a in parser._actions if a.option_strings and not a.help]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += [f"gem3d {name} {'/'.join(a.option_strings)}" for a in sub._actions
                            if a.option_strings and not (a.help or "").strip()]
    assert missing == []


# ----------------------------------------------------------------------------- how a stage ends
@pytest.fixture
def tiny_config(in_tmp):
    (in_tmp / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return in_tmp / "tiny.yaml"


def replace_stage(monkeypatch, name, func):
    """Run `func(cfg)` as `gem3d <name>` (the real CLI, parser and checks around it)."""
    monkeypatch.setitem(pipeline.COMMANDS, name, dataclasses.replace(pipeline.COMMANDS[name], func=func))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def run(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_uncaught_exception_full_traceback_in_log_and_stage_named_last(tiny_config, capsys, monkeypatch):
    def stage(cfg):
        logging.getLogger("gem3d.pipeline").info("building slices for %s", cfg.name)
        print("a library's message", file=sys.stderr)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(more detail)")

    replace_stage(monkeypatch, "slices", stage)
    handlers = list(logging.getLogger().handlers)
    log = tiny_config.parent / "results" / "tiny" / "logs" / "slices.log"
    rc, err = run(capsys, "slices", "--config", str(tiny_config), "--log", str(log))
    last = f"error: stage slices failed (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB); full log: {log}"
    assert rc == 1 and err.strip().splitlines()[-1] == last
    assert "Traceback (most recent call last)" in err  # a bug: the traceback on stderr too
    text = log.read_text()
    for part in ("building slices for tiny", "a library's message", "Traceback (most recent call last)",
                 "in stage", "RuntimeError: CUDA out of memory", "(more detail)"):
        assert part in text, part
    assert text.strip().splitlines()[-1] == last
    assert logging.getLogger().handlers == handlers  # main leaves logging as it found it

    rc, err = run(capsys, "slices", "--config", str(tiny_config))  # without --log: no log to point to
    assert rc == 1 and err.strip().splitlines()[-1] == "error: stage slices failed (RuntimeError: CUDA out of " \
                                                       "memory. Tried to allocate 2.00 GiB)"


def test_disk_full_anywhere_in_a_stage_is_one_line(tiny_config, capsys, monkeypatch):
    def stage(cfg):
        with open("/dev/full", "w") as fh:  # the kernel's full disk: writes fail with ENOSPC
            fh.write("x" * 100_000)

    replace_stage(monkeypatch, "encode", stage)
    log = tiny_config.parent / "encode.log"
    rc, err = run(capsys, "encode", "--config", str(tiny_config), "--log", str(log))
    assert rc == 1 and "Traceback" not in err, err
    assert error_lines(err) == [f"error: stage encode failed (OSError: [Errno 28] No space left on device); "
                                f"full log: {log}"] == err.strip().splitlines()[-1:]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in stage" in text  # the log keeps where it happened
    assert text.strip().splitlines()[-1] == error_lines(err)[-1]


def test_input_error_in_a_stage_stays_one_line_and_reaches_the_log(tiny_config, capsys, monkeypatch):
    def stage(cfg):
        raise InputError("results/tiny/slices/index.json: file not found")

    replace_stage(monkeypatch, "encode", stage)
    log = tiny_config.parent / "encode.log"
    log.write_text("an older run's log\n")
    rc, err = run(capsys, "encode", "--config", str(tiny_config), "--log", str(log))
    assert rc == 2 and "Traceback" not in err
    assert error_lines(err) == ["error: results/tiny/slices/index.json: file not found"] == err.strip().splitlines()[-1:]
    text = log.read_text()
    # appended below the earlier attempt's lines (#25: a killed or refused attempt's log must survive the next)
    assert text.startswith("an older run's log\n") and "gem3d encode: CUDA_VISIBLE_DEVICES" in text
    assert text.strip().splitlines()[-1] == error_lines(err)[-1]


def test_a_log_that_cannot_be_written_does_not_hide_the_error(tiny_config, capsys, monkeypatch):
    """The log on a full disk: stderr still gets every line, and the stage's own error is the one reported."""
    def stage(cfg):
        raise RuntimeError("boom")

    replace_stage(monkeypatch, "encode", stage)
    real_open = builtins.open

    def open_log_on_full_disk(file, mode="r", *args, **kwargs):
        return real_open("/dev/full", mode, *args, **kwargs) if str(file).endswith("encode.log") else \
            real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_log_on_full_disk)
    rc, err = run(capsys, "encode", "--config", str(tiny_config), "--log", "encode.log")
    assert rc == 1 and err.strip().splitlines()[-1] == "error: stage encode failed (RuntimeError: boom); " \
                                                       "full log: encode.log"


# ----------------------------------------------------------------------------- real training faults
@pytest.fixture
def slice_run(trained_run, in_tmp):
    """A fresh run folder holding only the slice store of the tiny run (train-vae's input)."""
    workdir, cfg = trained_run
    shutil.copytree(workdir / Paths(cfg).slices, in_tmp / Paths(cfg).slices)
    (in_tmp / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return in_tmp


def tiny_paths() -> Paths:
    return Paths(config_from_dict(TINY_CONFIG, source="tiny", check_paths=False))


def _left_in(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock") if folder.exists() else []


def test_non_finite_loss_is_one_line_naming_the_stage(slice_run, capsys):
    raw = yaml.safe_load((slice_run / "tiny.yaml").read_text())
    raw["vae"]["train"]["lr"] = 1.0e30  # finite, accepted, and diverges within the first steps
    (slice_run / "nan.yaml").write_text(yaml.safe_dump(raw))
    rc, err = run(capsys, "train-vae", "--config", "nan.yaml", "--log", "logs/vae.log")
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err, err
    assert lines[-1].startswith("error: stage train-vae failed (FloatingPointError: non-finite loss at or before step")
    assert lines[-1].endswith("; full log: logs/vae.log") and sum(x.startswith("error:") for x in lines) == 1
    assert "Traceback (most recent call last)" in (slice_run / "logs" / "vae.log").read_text()
    assert not tiny_paths().model("vae").exists()


def test_disk_full_on_checkpoint_save_is_one_line(slice_run, capsys, monkeypatch):
    real_open = builtins.open

    def checkpoint_on_full_disk(file, mode="r", *args, **kwargs):
        name = str(file)
        if "w" in mode and ".tmp" in name and name.endswith(".ckpt"):  # the checkpoint's temporary file
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", checkpoint_on_full_disk)
    rc, err = run(capsys, "train-vae", "--config", "tiny.yaml")
    lines = err.strip().splitlines()
    assert rc != 0 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1
    assert "no space left on device" in lines[-1].lower()
    paths = tiny_paths()
    assert _left_in(paths.train_state("vae").parent) == [] and not paths.model("vae").exists()


# ----------------------------------------------------------------------------- data-parallel jobs
def test_torchrun_workers_stderr_reaches_the_log(tiny_config, capsys, monkeypatch):
    """`--nproc 2`: the workers' errors pass through the launching process into its log file."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    log = tiny_config.parent / "train_slice.log"
    rc, err = run(capsys, "train-slice", "--nproc", "2", "--config", str(tiny_config), "--log", str(log))
    lines = err.strip().splitlines()
    assert rc != 0 and lines[-1].startswith("error: stage train-slice failed (torchrun exit code ")
    assert lines[-1].endswith(f"; full log: {log}")
    text = log.read_text()
    assert "error: results/tiny/" in text  # a worker's one-line input error (no latent cache yet)
    assert text.strip().splitlines()[-1] == lines[-1]
