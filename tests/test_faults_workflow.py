"""Fault corpus, the Snakemake workflow (issue #25): a killed Snakemake and its jobs, input data that changed
after a finished run. Each test runs the real `snakemake` on the real Snakefile in a subprocess and checks
what it plans or leaves on disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY_CONFIG, make_case, tiny_raw, write_folder_dataset
from gem3d.io import read_volume, write_volume
from gem3d.paths import Paths
from gem3d.training.checkpoint import load_checkpoint
from test_dag_smoke import planned
from test_workflow import BIN, snakemake


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



def kill_owner(owner: subprocess.Popen, grace: float, expected) -> None:
    """SIGKILL `owner` (a Snakemake or a job's owner) once its descendants are what `expected` says, then wait up to
    `grace` seconds for the orphans to end by themselves (the check); any still alive are killed afterwards."""
    jobs = {}
    try:
        jobs = descendants(owner.pid)
        assert expected(jobs), jobs
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        wait_for(lambda: not any(alive(pid) for pid in jobs), grace, f"the orphaned processes {jobs} to end")
    finally:
        for pid in jobs:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


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
    wait_for(lambda: log.exists() and "step 10/200" in log.read_text(), 180, "the training to run")
    kill_owner(first, 30, lambda jobs: any("train-vae" in cmd and "bash" not in cmd for cmd in jobs.values()))
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
    wait_for(lambda: log.exists() and "step 30/2000" in log.read_text(), 240, "the data-parallel training to run")
    # the launcher, torchrun, two workers
    kill_owner(owner, 90, lambda jobs: sum("gem3d" in cmd for cmd in jobs.values()) >= 3
               and any("torch.distributed.run" in cmd for cmd in jobs.values()))
    stopped_at = load_checkpoint(paths.train_state("slice_model"))["step"]
    assert 30 <= stopped_at < 2000
    assert paths.model("slice_model").read_bytes() == model_before
    assert f"received SIGTERM at step {stopped_at}/2000" in log.read_text(), log.read_text()[-3000:]


# ---- input data changed after a finished run -------------------------------------------------------------

FOLDER_LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}
SLICES = "results/t/slices/index.json"
AFTER_IMPORT = {"import_data", "preprocess_nnunet", "build_slices"}


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """Real-data layout (a generic folder of 4 cases) imported, preprocessed and sliced by snakemake."""
    workdir = tmp_path_factory.mktemp("data_run")
    write_folder_dataset(workdir / "data")
    raw = tiny_raw(name="t", **{"preprocess.dataset_id": 903})
    del raw["phantoms"]
    raw["data"] = {"format": "folder", "path": "data", "labels": FOLDER_LABELS, "test_fraction": 0.34}
    (workdir / "t.yaml").write_text(yaml.safe_dump(raw))
    res = snakemake([SLICES, "--cores", "1", "--configfile", "t.yaml"], workdir, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return workdir


def copied(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run (metadata and times kept; new inodes, as after a backup and restore)."""
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def plan(workdir: Path, target: str = SLICES, config: str = "t.yaml") -> set[str]:
    return planned(snakemake([target, "-n", "--configfile", config], workdir))


def rewritten_in_place(path: Path, change) -> None:
    """The NIfTI at `path` with `change(array)` applied, written into the same file (same inode)."""
    volume = read_volume(path)
    change(volume.array)
    other = path.with_name("edited_" + path.name)
    write_volume(other, volume)
    path.write_bytes(other.read_bytes())
    other.unlink()


def test_touched_scans_rerun_nothing_and_an_edited_scan_reruns_the_import_and_after(data_run, tmp_path):
    workdir = copied(data_run, tmp_path)
    assert plan(workdir) == set()
    for path in (workdir / "data").rglob("*.nii.gz"):  # every scan touched, bytes unchanged
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert plan(workdir) == set()
    rewritten_in_place(workdir / "data" / "images" / "case01.nii.gz", lambda a: a.__setitem__((10, 9, 8), 5.0))
    assert AFTER_IMPORT <= plan(workdir)


def test_scan_replaced_by_another_with_the_same_time_reruns_the_import(data_run, tmp_path):
    workdir = copied(data_run, tmp_path)
    scan, other = workdir / "data" / "images" / "case01.nii.gz", workdir / "data" / "images" / "case02.nii.gz"
    times = scan.stat()
    shutil.copyfile(other, scan)
    os.utime(scan, ns=(times.st_atime_ns, times.st_mtime_ns))  # even the modification time as it was
    assert AFTER_IMPORT <= plan(workdir)


def test_added_case_reruns_the_import(data_run, tmp_path):
    workdir = copied(data_run, tmp_path)
    image, mask = make_case(seed=9)
    write_volume(workdir / "data" / "images" / "case09.nii.gz", image)
    write_volume(workdir / "data" / "masks" / "case09.nii.gz", mask, np.uint8)
    assert AFTER_IMPORT <= plan(workdir)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """The demo's layout: make_phantoms writes the data inside the DAG, after the Snakefile was read."""
    workdir = tmp_path_factory.mktemp("phantom_run")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    res = snakemake(["results/tiny/split.json", "--cores", "1", "--configfile", "tiny.yaml"], workdir)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return workdir


def test_phantom_demo_plans_nothing_after_its_run_and_sees_an_edited_phantom(phantom_run, tmp_path):
    workdir = copied(phantom_run, tmp_path)
    assert plan(workdir, "results/tiny/split.json", "tiny.yaml") == set()
    scan = workdir / "results" / "tiny" / "phantoms" / "synthetic_000" / "synthetic_000_flair.nii.gz"
    rewritten_in_place(scan, lambda a: a.__setitem__((16, 16, 12), a[16, 16, 12] + 1.0))
    assert plan(workdir, "results/tiny/split.json", "tiny.yaml") == {"import_data"}
