"""Fault corpus, the Snakemake workflow (issue #25): a killed Snakemake and its jobs, input data that changed
after a finished run. Each test runs the real `snakemake` on the real Snakefile in a subprocess and checks
what it plans or leaves on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_raw
from gem3d.paths import Paths
from gem3d.training.checkpoint import load_checkpoint
from test_workflow import BIN


def snakemake_cmd(*args: str) -> list[str]:
    return [str(BIN / "snakemake"), "-s", str(REPO / "workflow" / "Snakefile"), *args]


def snakemake_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`: pid -> command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


WRAPPER = """#!/bin/bash
# a shell between Snakemake and gem3d (as a conda activation leaves one): bash cannot exec the command here
"{gem3d}" "$@"
status=$?
exit $status
"""


@pytest.mark.parametrize("shell", ["exec", "wrapped"])
def test_killed_snakemake_ends_its_training_job_which_writes_no_model(run_copy, tmp_path, shell):
    """SIGKILL of snakemake during a training: the gem3d job ends too (Snakemake its parent: the kernel's
    parent-death signal; a shell between them: gem3d's watch of its Snakemake), with a checkpoint and no
    model file; the next run resumes it, and the job's log, which Snakemake deletes before every attempt,
    keeps both attempts."""
    paths = Paths(run_copy)
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(**{"vae.train.steps": 200, "vae.train.log_every": 10,
                                                 "vae.train.checkpoint_every": 1000})))
    env = snakemake_env()
    if shell == "wrapped":
        wrapper = tmp_path / "bin" / "gem3d"
        wrapper.parent.mkdir()
        wrapper.write_text(WRAPPER.format(gem3d=BIN / "gem3d"))
        wrapper.chmod(0o755)
        env["PATH"] = f"{wrapper.parent}{os.pathsep}{env['PATH']}"
    log = paths.log("train_vae")
    command = snakemake_cmd("-d", str(tmp_path), str(paths.model("vae")), "--forcerun", "train_vae", "--cores", "1",
                            "--configfile", str(config))
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    jobs = {}
    try:
        wait_for(lambda: log.exists() and "step 10/200" in log.read_text(), 180, "the training to run")
        jobs = descendants(first.pid)  # gem3d train-vae (and the wrapping shell)
        assert any("train-vae" in cmd and "bash" not in cmd for cmd in jobs.values()), jobs
        first.send_signal(signal.SIGKILL)
        first.wait()
        wait_for(lambda: not any(alive(pid) for pid in jobs), 30, f"the orphaned jobs {jobs} to end")
    finally:
        for pid in jobs:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not paths.model("vae").exists()  # no model file from a job Snakemake no longer owned
    stopped_at = load_checkpoint(paths.train_state("vae"))["step"]
    assert 10 <= stopped_at < 200
    text = log.read_text()
    assert f"received SIGTERM at step {stopped_at}/200" in text, text[-2000:]
    if shell == "wrapped":
        assert f"the Snakemake process (pid {first.pid}) that started this job has ended" in text, text[-2000:]
        return
    unlock = subprocess.run([*command, "--unlock"], cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert unlock.returncode == 0  # the killed Snakemake's own lock on the folder, as after any SIGKILL
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert load_checkpoint(paths.model("vae"))["step"] == 200
    text = log.read_text()  # Snakemake deleted the log before the second attempt: both attempts are in it
    assert f"received SIGTERM at step {stopped_at}/200" in text and f"resuming {paths.train_state('vae')} at step " \
        f"{stopped_at}" in text, text[-3000:]


OWNER = """import os, subprocess, sys
os.environ["GEM3D_OWNER_PID"] = str(os.getpid())  # what the Snakefile does
sys.exit(subprocess.call(sys.argv[1:]))
"""


def test_killed_owner_ends_a_data_parallel_job_and_its_torchrun_workers(run_copy, tmp_path):
    """`gem3d train-slice --nproc 2` (launcher -> torchrun -> 2 workers) under a stand-in for Snakemake that is
    killed with SIGKILL: every process of the job ends, the workers checkpoint first, the model file stays."""
    import sys

    paths = Paths(run_copy)
    model_before = paths.model("slice_model").read_bytes()
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(**{"slice_model.train.steps": 2000, "slice_model.train.log_every": 10,
                                                 "slice_model.train.checkpoint_every": 100000})))
    (tmp_path / "owner.py").write_text(OWNER)
    log = tmp_path / "train.log"
    owner = subprocess.Popen([sys.executable, "owner.py", str(BIN / "gem3d"), "train-slice", "--nproc", "2", "--config",
                              str(config), "--log", str(log)], cwd=tmp_path, env=snakemake_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    jobs = {}
    try:
        wait_for(lambda: log.exists() and "step 30/2000" in log.read_text(), 240, "the data-parallel training to run")
        jobs = descendants(owner.pid)  # the launcher, torchrun, two workers
        assert sum("gem3d" in cmd for cmd in jobs.values()) >= 3 and any("torch.distributed.run" in cmd
                                                                         for cmd in jobs.values()), jobs
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        wait_for(lambda: not any(alive(pid) for pid in jobs), 90, f"the orphaned processes {jobs} to end")
    finally:
        for pid in jobs:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    stopped_at = load_checkpoint(paths.train_state("slice_model"))["step"]
    assert 30 <= stopped_at < 2000
    assert paths.model("slice_model").read_bytes() == model_before
    assert f"received SIGTERM at step {stopped_at}/2000" in log.read_text(), log.read_text()[-3000:]
