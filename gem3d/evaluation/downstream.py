"""Downstream segmentation (the paper's Table 4): nnU-Net v2 trained on real or generated data,
evaluated on the REAL test split.

For each training data NAME (`downstream_data`): "real" (the real training cases), "enhanced_<k>x"
(the enhancement set and its copies 1..k-1, generated images only) and "baseline" (Make-A-Volume
reconstructions), under ``Paths.evaluation/nnunet/{raw,preprocessed,results}``:

1. an nnU-Net raw dataset ``Dataset<base id + offset>_<name>_<NAME>`` of relative symlinks to the
   NIfTIs (generated cases are named ``<set>_<sample_id>``), written atomically;
2. nnU-Net planning + preprocessing (`gem3d.data.nnunet.plan_and_preprocess`, atomic);
3. `nnUNetv2_train <id> 3d_fullres all -tr nnUNetTrainerGem3d` (nnunet_trainer.py: epochs and
   iterations from ``evaluation.segmentation``; ``nnUNet_n_proc_DA`` set for training only; CUDA
   when available, else CPU); a rerun with unchanged inputs resumes (``--c``) or skips a finished
   training; changed inputs start over;
4. `nnUNetv2_predict` of the real test images (sequential: no worker processes), written
   atomically to ``Paths.evaluation/segmentation/<NAME>/predictions``;
5. Dice and HD95 per region (BraTS: WT/TC/ET; otherwise one region per label) against the real
   test labels, HD95 in mm with the real test image's voxel spacing ->
   ``Paths.evaluation/segmentation/<NAME>/metrics.json``.

nnU-Net runs in subprocesses with an explicit environment (its paths are environment variables and
it starts workers with spawn), so nothing here imports nnunetv2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gem3d.config import Config
from gem3d.data.nnunet import nnunet_env, nnunet_tool, plan_and_preprocess, run_logged
from gem3d.sampling.sets import TRAIN_MASKS, SampleSet, downstream_sets
from gem3d.evaluation.segmentation_metrics import EMPTY_HD95_MM, region_metrics
from gem3d.io import InputError, atomic_dir, atomic_path, read_json, read_volume, write_json
from gem3d.paths import Paths

log = logging.getLogger("gem3d.evaluation.downstream")

TRAINER = "nnUNetTrainerGem3d"
PLANS = "nnUNetPlans"
FOLD = "all"
CONVENTIONS = ("Dice: both masks empty -> 1.0, one empty -> 0.0. HD95 (MONAI's definition, as in the paper): the "
               "larger of the two directed 95th-percentile surface distances, in mm with the real test image's voxel "
               f"spacing; both masks empty -> 0, one empty -> {EMPTY_HD95_MM} mm (the BraTS evaluation tooling's "
               "value, the diagonal of the 240 x 240 x 155 mm BraTS volume), counted in the means.")


def downstream_data(cfg: Config) -> list[str]:
    """Training data of the downstream nnU-Net (Table 4 rows; their sets: `downstream_sets`)."""
    return list(downstream_sets(cfg))


def segmentation_regions(cfg: Config) -> dict[str, list[int]]:
    """The dataset's evaluation regions (gem3d.data.importers.segmentation_regions: BraTS releases, challenge
    folders or MSD Task01, WT/TC/ET; otherwise one region per foreground label of ``data.labels``)."""
    from gem3d.data.importers import segmentation_regions as regions_of

    return regions_of(cfg.data)


def dataset_offset(cfg: Config, data: str) -> int:
    if data == "real":
        return 1
    if data == "baseline":
        return 2
    match = re.fullmatch(r"enhanced_(\d+)x", data)
    if match:
        return 10 + int(match.group(1))
    raise InputError(f"unknown segmentation training data {data!r}; allowed: {', '.join(downstream_data(cfg))}")


def dataset_name(cfg: Config, data: str) -> tuple[int, str]:
    dataset_id = cfg.preprocess.dataset_id + dataset_offset(cfg, data)
    return dataset_id, f"Dataset{dataset_id:03d}_{cfg.name}_{data}"


def nnunet_root(cfg: Config) -> Path:
    return Paths(cfg).evaluation / "nnunet"


def segmentation_dir(cfg: Config, data: str) -> Path:
    return Paths(cfg).evaluation / "segmentation" / data


def metrics_path(cfg: Config, data: str) -> Path:
    return segmentation_dir(cfg, data) / "metrics.json"


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _raw_case(raw: Path, case_id: str) -> Case:
    return Case(case_id, raw / "imagesTr" / f"{case_id}_0000.nii.gz", raw / "labelsTr" / f"{case_id}.nii.gz")


def training_cases(cfg: Config, data: str) -> tuple[list[Case], list[str]]:
    """The (image, label) files nnU-Net trains on for ``data``, and the sets they come from."""
    if data not in downstream_data(cfg):
        raise InputError(f"unknown segmentation training data {data!r} for {cfg.source}; "
                         f"allowed: {', '.join(downstream_data(cfg))}")
    paths = Paths(cfg)
    if data == "real":
        ids = read_json(paths.split)["train"]
        cases, sources = [_raw_case(paths.raw_dataset, c) for c in ids], [str(paths.raw_dataset)]
    else:
        sources = downstream_sets(cfg)[data]
        cases = []
        for name in sources:
            sample_set = SampleSet.open(cfg, name, TRAIN_MASKS)
            cases += [Case(_safe_id(f"{name}_{e['sample_id']}"), sample_set.image_path(e), sample_set.label_path(e))
                      for e in sample_set.volumes]
    if not cases:
        raise InputError(f"segmentation training data {data}: no training cases")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"segmentation training data {data}: duplicate case ids {twice[:3]}")
    for case in cases:
        for path in (case.image, case.label):
            if not path.is_file():
                raise InputError(f"{path}: file of training case {case.case_id} ({data}) not found")
    return cases, sources


def _link(target: Path, link: Path) -> None:
    os.symlink(os.path.relpath(target.resolve(), link.parent.resolve()), link)


def build_raw_dataset(cfg: Config, data: str, cases: list[Case]) -> Path:
    """``<root>/raw/Dataset..._<data>``: imagesTr/labelsTr symlinks and dataset.json (atomic)."""
    dataset_id, name = dataset_name(cfg, data)
    main = read_json(Paths(cfg).raw_dataset / "dataset.json")
    final = nnunet_root(cfg) / "raw" / name
    with atomic_dir(final) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case in cases:
            _link(case.image, tmp / "imagesTr" / f"{case.case_id}_0000.nii.gz")
            _link(case.label, tmp / "labelsTr" / f"{case.case_id}.nii.gz")
        write_json(tmp / "dataset.json", {
            "channel_names": main["channel_names"],
            "labels": dict(sorted(cfg.data.labels.items(), key=lambda kv: kv[1])),
            "numTraining": len(cases), "file_ending": ".nii.gz", "name": f"{cfg.name}_{data}",
            "description": f"gem3d downstream segmentation: nnU-Net trained on {data}"})
    log.info("nnU-Net raw dataset %s: %d training cases", final, len(cases))
    return final


def _stamp(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def signature(cfg: Config, data: str, cases: list[Case]) -> dict:
    """What the trained model depends on: input files (path, size, mtime) and the training length."""
    seg = cfg.evaluation.segmentation
    content = {"cases": [[c.case_id, _stamp(c.image), _stamp(c.label)] for c in cases],
               "labels": cfg.data.labels, "trainer": TRAINER, "configuration": seg.configuration,
               "epochs": seg.epochs, "iterations_per_epoch": seg.iterations_per_epoch,
               "val_iterations": seg.val_iterations}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return {"data": data, "n_cases": len(cases), "sha256": digest}


def device_name() -> str:
    from gem3d.device import compute_device

    return compute_device().type


def nnunet_run_env(cfg: Config, training: bool) -> dict[str, str]:
    """nnU-Net environment with our trainer findable by name (and the training length for it)."""
    root = nnunet_root(cfg)
    seg = cfg.evaluation.segmentation
    env = nnunet_env(root, seg.num_processes)
    shim = root / "trainers" / "gem3d_nnunet_trainers.py"
    if not shim.is_file():
        with atomic_path(shim) as tmp:
            tmp.write_text("# written by gem3d: lets nnU-Net find gem3d's trainer via nnUNet_extTrainer\n"
                           "from gem3d.evaluation.nnunet_trainer import nnUNetTrainerGem3d  # noqa: F401\n")
    env["nnUNet_extTrainer"] = str(shim.parent.resolve())
    env.update({"GEM3D_NNUNET_EPOCHS": str(seg.epochs), "GEM3D_NNUNET_ITERATIONS": str(seg.iterations_per_epoch),
                "GEM3D_NNUNET_VAL_ITERATIONS": str(seg.val_iterations), "GEM3D_NNUNET_SKIP_VALIDATION": "1"})
    if training:
        env["nnUNet_n_proc_DA"] = str(seg.num_processes)  # only here: 0 or low values break planning
    else:
        env.pop("nnUNet_n_proc_DA", None)
    return env


def model_folder(cfg: Config, data: str) -> Path:
    _, name = dataset_name(cfg, data)
    conf = cfg.evaluation.segmentation.configuration
    return nnunet_root(cfg) / "results" / name / f"{TRAINER}__{PLANS}__{conf}" / f"fold_{FOLD}"


def train_model(cfg: Config, data: str) -> dict:
    """Raw dataset + preprocessing + nnU-Net training for ``data`` (resumes/skips when inputs are unchanged)."""
    seg = cfg.evaluation.segmentation
    root = nnunet_root(cfg)
    dataset_id, name = dataset_name(cfg, data)
    cases, sources = training_cases(cfg, data)
    sig = signature(cfg, data, cases)
    sig_file = root / "results" / name / "gem3d_signature.json"
    plans = root / "preprocessed" / name / f"{PLANS}.json"
    unchanged = sig_file.is_file() and read_json(sig_file) == sig and plans.is_file()
    if not unchanged:
        shutil.rmtree(root / "results" / name, ignore_errors=True)
        build_raw_dataset(cfg, data, cases)
        start = time.time()
        plan_and_preprocess(root, dataset_id, name, seg.configuration, seg.num_processes)
        log.info("nnU-Net planning + preprocessing of %s: %.0f s", name, time.time() - start)
        write_json(sig_file, sig)
    folder = model_folder(cfg, data)
    device = device_name()
    if unchanged and (folder / "checkpoint_final.pth").is_file():
        log.info("%s: nnU-Net already trained on unchanged inputs (%s)", data, folder)
    else:
        resume = unchanged and (folder / "checkpoint_latest.pth").is_file()
        cmd = [nnunet_tool("nnUNetv2_train"), str(dataset_id), seg.configuration, FOLD, "-tr", TRAINER,
               "-device", device] + (["--c"] if resume else [])
        start = time.time()
        run_logged(cmd, nnunet_run_env(cfg, training=True), f"nnU-Net training on {data}")
        log.info("nnU-Net training on %s (%d cases, %d epochs x %d iterations, %s%s): %.0f s", data, len(cases),
                 seg.epochs, seg.iterations_per_epoch, device, ", resumed" if resume else "", time.time() - start)
    if not (folder / "checkpoint_final.pth").is_file():
        raise InputError(f"{folder}: nnU-Net training on {data} finished without checkpoint_final.pth")
    return {"dataset": name, "dataset_id": dataset_id, "n_training_cases": len(cases), "training_sources": sources,
            "model": str(folder), "device": device}


def real_test_cases(cfg: Config) -> list[Case]:
    paths = Paths(cfg)
    ids = read_json(paths.split)["test"]
    cases = [_raw_case(paths.raw_dataset, c) for c in ids]
    for case in cases:
        for path in (case.image, case.label):
            if not path.is_file():
                raise InputError(f"{path}: real test case {case.case_id} not found")
    return cases


def predict_test(cfg: Config, data: str, cases: list[Case]) -> Path:
    """nnU-Net predictions of the real test images -> ``segmentation/<data>/predictions`` (atomic)."""
    dataset_id, _ = dataset_name(cfg, data)
    out_dir = segmentation_dir(cfg, data)
    inputs = out_dir / ".test_images"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    for case in cases:
        _link(case.image, inputs / f"{case.case_id}_0000.nii.gz")
    try:
        with atomic_dir(out_dir / "predictions") as tmp:
            cmd = [nnunet_tool("nnUNetv2_predict"), "-i", str(inputs), "-o", str(tmp), "-d", str(dataset_id),
                   "-c", cfg.evaluation.segmentation.configuration, "-f", FOLD, "-tr", TRAINER, "-p", PLANS,
                   "-device", device_name(), "-npp", "0", "-nps", "0", "--disable_progress_bar"]
            start = time.time()
            run_logged(cmd, nnunet_run_env(cfg, training=False), f"nnU-Net prediction ({data})")
            log.info("nnU-Net prediction of %d test cases (%s): %.0f s", len(cases), data, time.time() - start)
            missing = [c.case_id for c in cases if not (tmp / f"{c.case_id}.nii.gz").is_file()]
            if missing:
                raise InputError(f"nnU-Net prediction ({data}) wrote no output for {missing[:3]}")
    finally:
        shutil.rmtree(inputs, ignore_errors=True)
    return out_dir / "predictions"


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def evaluate_predictions(cfg: Config, predictions: Path, cases: list[Case]) -> tuple[dict, dict]:
    """Per-case metrics and their means per region. ``hd95_one_empty`` counts the cases scored
    ``EMPTY_HD95_MM`` (exactly one mask empty; they are in the mean)."""
    regions = segmentation_regions(cfg)
    per_case = {}
    for case in cases:
        image = read_volume(case.image)
        ref = read_volume(case.label).array.round().astype(np.int16)
        pred = read_volume(predictions / f"{case.case_id}.nii.gz").array.round().astype(np.int16)
        if pred.shape != ref.shape:
            raise InputError(f"{predictions / case.case_id}.nii.gz: prediction shape {pred.shape} differs from the "
                             f"real label {ref.shape}")
        metrics = region_metrics(pred, ref, regions, image.spacing)
        per_case[case.case_id] = {"spacing_mm": list(image.spacing),
                                  "regions": {r: {k: _clean(v) for k, v in m.items()} for r, m in metrics.items()}}
    mean = {}
    for region in regions:
        dice = [c["regions"][region]["dice"] for c in per_case.values()]
        hd = [c["regions"][region]["hd95"] for c in per_case.values()]
        one_empty = sum((c["regions"][region]["n_pred"] == 0) != (c["regions"][region]["n_ref"] == 0)
                        for c in per_case.values())
        mean[region] = {"dice": float(np.mean(dice)), "hd95": float(np.mean(hd)), "hd95_one_empty": int(one_empty)}
    return per_case, mean


def run_downstream(cfg: Config, data: str) -> dict:
    """Train, predict the real test split, score; write ``segmentation/<data>/metrics.json``."""
    seg = cfg.evaluation.segmentation
    cases = real_test_cases(cfg)
    info = train_model(cfg, data)
    predictions = predict_test(cfg, data, cases)
    per_case, mean = evaluate_predictions(cfg, predictions, cases)
    record = {"data": data, **info, "trainer": TRAINER, "configuration": seg.configuration, "fold": FOLD,
              "epochs": seg.epochs, "iterations_per_epoch": seg.iterations_per_epoch,
              "val_iterations": seg.val_iterations, "regions": segmentation_regions(cfg), "conventions": CONVENTIONS,
              "test_cases": [c.case_id for c in cases], "cases": per_case, "mean": mean}
    write_json(metrics_path(cfg, data), record)
    log.info("%s: %s", data, ", ".join(f"{r} Dice {m['dice']:.3f}" for r, m in mean.items()))
    return record
