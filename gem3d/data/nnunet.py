"""Thin wrapper around nnU-Net v2: folder layout, environment, and the preprocessing run.

nnU-Net reads its data locations from environment variables at import time, so gem3d runs its
command-line tools in subprocesses with an explicit environment; our package passes paths.
Layout under results/<name>/nnunet/: raw/, preprocessed/, results/.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gem3d.io import InputError, atomic_dir, read_json, write_json
from gem3d.job_owner import die_with_parent

log = logging.getLogger("gem3d.nnunet")


def nnunet_env(root: Path, num_processes: int = 2) -> dict[str, str]:
    """Environment for nnU-Net commands with data folders under `root`."""
    root = Path(root).resolve()
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_def_n_proc": str(num_processes),
        "nnUNet_compile": "false",
    })
    return env


def nnunet_tool(name: str) -> str:
    """Path of an nnU-Net console script installed beside this Python (falls back to PATH)."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise InputError(f"{name}: nnU-Net command not found (is nnunetv2 installed?)")
    return found


def progress_final_state(raw: bytes) -> str:
    """One output line of a subprocess, decoded; of a progress bar's \r-separated redraws, only the last."""
    return raw.rstrip(b"\r\n").split(b"\r")[-1].decode(errors="replace").rstrip()


def run_logged(cmd: list[str], env: dict[str, str], what: str) -> None:
    """Run a command, streaming its output to our log; raise InputError with its last line on failure."""
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent())  # nnU-Net ends with this job
    last = ""
    assert proc.stdout is not None
    for raw in proc.stdout:  # bytes: a progress bar redraws itself with \r; log only its final state
        line = progress_final_state(raw)
        if line:
            last = line
            log.info("[nnU-Net] %s", line)
    if proc.wait() != 0:
        raise InputError(f"{what} failed (exit {proc.returncode}): {last}")


def plan_and_preprocess(root: Path, dataset_id: int, dataset_name: str, configuration: str = "3d_fullres",
                        num_processes: int = 2, plan_cases: list[str] | None = None) -> Path:
    """nnU-Net fingerprint + planning + preprocessing; returns the preprocessed dataset folder.

    ``plan_cases``: the fingerprint and plans (target spacing, CT clipping percentiles and mean / std) come from
    these cases only (the training split), every case of the raw dataset is then preprocessed with those plans, so
    no statistic of a test case reaches the networks trained on the preprocessed data. None: all cases.
    nnU-Net writes into a temporary `nnUNet_preprocessed`, which is renamed into place only when
    it finished, so an interrupted run leaves no half-preprocessed dataset.
    """
    root = Path(root).resolve()
    raw = root / "raw" / dataset_name
    if not (raw / "dataset.json").exists():
        raise InputError(f"{raw}: nnU-Net raw dataset not found (run `gem3d import` first)")
    final = root / "preprocessed" / dataset_name
    with atomic_dir(final) as tmp_dataset:
        staging = tmp_dataset.parent / f".staging-{dataset_name}"
        staging_raw = tmp_dataset / "planning-raw"  # inside the atomic folder: a kill leaves one hidden folder
        shutil.rmtree(staging, ignore_errors=True)
        env = nnunet_env(root, num_processes)
        env["nnUNet_preprocessed"] = str(staging)
        common = ["-d", str(dataset_id), "-c", configuration, "-np", str(num_processes)]
        try:
            if plan_cases is None:
                run_logged([nnunet_tool("nnUNetv2_plan_and_preprocess"), *common, "-npfp", str(num_processes),
                            "--verify_dataset_integrity"], env, "nnU-Net plan_and_preprocess")
            else:
                plan_env = {**env, "nnUNet_raw": str(staging_raw)}
                write_case_list(raw, staging_raw / dataset_name, plan_cases)
                run_logged([nnunet_tool("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-npfp",
                            str(num_processes), "--verify_dataset_integrity", "--no_pp"], plan_env,
                           "nnU-Net fingerprint and planning (training cases)")
                # nnU-Net's preprocessing lists the cases from the dataset.json planning copied: every case's
                shutil.copy(raw / "dataset.json", staging / dataset_name / "dataset.json")
                run_logged([nnunet_tool("nnUNetv2_preprocess"), *common], env, "nnU-Net preprocessing (all cases)")
            shutil.rmtree(tmp_dataset)
            os.replace(staging / dataset_name, tmp_dataset)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def write_case_list(raw: Path, out: Path, cases: list[str]) -> None:
    """A raw dataset folder `out` whose dataset.json lists only `cases` of `raw` (nnU-Net's `dataset` key, absolute
    paths: nothing is copied)."""
    meta = read_json(raw / "dataset.json")
    ending, channels = meta["file_ending"], sorted(meta["channel_names"], key=int)
    missing = [c for c in cases if not (raw / "labelsTr" / f"{c}{ending}").is_file()]
    if missing or not cases:
        raise InputError(f"{raw}: the training cases to plan from are not all in the raw dataset "
                         f"(missing: {', '.join(missing[:5]) or 'none given'})")
    entries = {c: {"images": [str(raw / "imagesTr" / f"{c}_{int(k):04d}{ending}") for k in channels],
                   "label": str(raw / "labelsTr" / f"{c}{ending}")} for c in cases}
    out.mkdir(parents=True)
    write_json(out / "dataset.json", {**meta, "numTraining": len(cases), "dataset": entries})


def load_preprocessed_case(folder: Path, case_id: str):
    """(data (c, z, y, x) float32, seg (1, z, y, x) int, properties dict) of one preprocessed case."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(folder)
    dataset = infer_dataset_class(str(folder))(str(folder))
    data, seg, _, properties = dataset.load_case(case_id)
    return data, seg, properties


def preprocessed_cases(folder: Path) -> list[str]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(folder)
    return sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))
