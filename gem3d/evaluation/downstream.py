"""Downstream segmentation (the paper's Table 4): nnU-Net v2 trained on real or generated data, scored on the
REAL test split, once per seed.

Rows (`downstream_rows`, gem3d/sampling/sets.py): "real" (the real training cases), "enhanced_<k>x" (the
enhancement set and its copies 1..k-1, generated images only), "baseline" (Make-A-Volume), "real_enhanced_<k>x"
(real cases plus the k copies; `evaluation.segmentation.real_plus`) and, with `min_adherence`,
"enhanced_<k>x_adherent" (the largest multiple without the volumes the real-data nnU-Net finds far from their
masks; gem3d/evaluation/adherence.py). Under ``Paths.evaluation/nnunet/{raw,preprocessed,results/seed<s>}``:

1. `prepare_row`: an nnU-Net raw dataset ``Dataset<base id + offset>_<name>_<row>`` of relative symlinks to the
   NIfTIs (generated cases are named ``<set>_<sample_id>``), written atomically; the real row is planned and
   preprocessed by nnU-Net (`nnUNetv2_plan_and_preprocess`), every other row is preprocessed with the REAL row's
   plans (`nnUNetv2_move_plans_between_datasets` + `nnUNetv2_preprocess`): every row trains the same network on
   the same patch size, spacing and normalisation, and no row pays for planning. A rerun with unchanged inputs
   skips it.
2. `train_row`: `nnUNetv2_train <id> <configuration> all -tr nnUNetTrainerGem3d` for one seed (nnunet_trainer.py:
   length and seed from ``evaluation.segmentation``; CUDA when available, else CPU); a rerun with unchanged
   inputs resumes (``--c``) or skips a finished training.
3. `nnUNetv2_predict` of the real test images, written atomically to ``segmentation/<row>/seed<s>/predictions``.
4. Dice and HD95 per region (BraTS: WT/TC/ET; otherwise one region per label) against the real test labels,
   HD95 in mm with the real test image's voxel spacing, and the validation pseudo-Dice per epoch read from
   nnU-Net's training log -> ``segmentation/<row>/seed<s>/metrics.json``.

nnU-Net runs in subprocesses with an explicit environment (its paths are environment variables and it starts
workers with spawn), so nothing here imports nnunetv2.
"""

from __future__ import annotations

import copy
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
from gem3d.evaluation.segmentation_metrics import EMPTY_HD95_MM, region_metrics
from gem3d.io import InputError, atomic_dir, atomic_path, exclusive_lock, read_json, read_volume, write_json
from gem3d.paths import Paths
from gem3d.sampling.sets import TRAIN_MASKS, DownstreamRow, SampleSet, downstream_offsets, downstream_rows

log = logging.getLogger("gem3d.evaluation.downstream")

TRAINER = "nnUNetTrainerGem3d"
PLANS = "nnUNetPlans"
FOLD = "all"
REAL = "real"
CONVENTIONS = ("Dice: both masks empty -> 1.0, one empty -> 0.0. HD95 (MONAI's definition, as in the paper): the "
               "larger of the two directed 95th-percentile surface distances, in mm with the real test image's voxel "
               f"spacing; both masks empty -> 0, one empty -> {EMPTY_HD95_MM} mm (the BraTS evaluation tooling's "
               "value, the diagonal of the 240 x 240 x 155 mm BraTS volume), counted in the means.")


def downstream_data(cfg: Config) -> list[str]:
    """Training data of the downstream nnU-Net (Table 4 rows; what each is: `downstream_rows`)."""
    return list(downstream_rows(cfg))


def seeds(cfg: Config) -> list[int]:
    """The seeds every row is trained with (`evaluation.segmentation.seeds` of them: 0, 1, ...)."""
    return list(range(cfg.evaluation.segmentation.seeds))


def segmentation_regions(cfg: Config) -> dict[str, list[int]]:
    """The dataset's evaluation regions (gem3d.data.importers.segmentation_regions: BraTS releases, challenge
    folders or MSD Task01, WT/TC/ET; otherwise one region per foreground label of ``data.labels``)."""
    from gem3d.data.importers import segmentation_regions as regions_of

    return regions_of(cfg.data)


def row(cfg: Config, data: str) -> DownstreamRow:
    rows = downstream_rows(cfg)
    if data not in rows:
        raise InputError(f"unknown segmentation training data {data!r} for {cfg.source}; "
                         f"allowed: {', '.join(rows)}")
    return rows[data]


def dataset_offset(cfg: Config, data: str) -> int:
    offsets = downstream_offsets(cfg)
    if data not in offsets:
        raise InputError(f"unknown segmentation training data {data!r}; allowed: {', '.join(downstream_data(cfg))}")
    return offsets[data]


def dataset_name(cfg: Config, data: str) -> tuple[int, str]:
    dataset_id = cfg.preprocess.dataset_id + dataset_offset(cfg, data)
    return dataset_id, f"Dataset{dataset_id:03d}_{cfg.name}_{data}"


def nnunet_root(cfg: Config) -> Path:
    return Paths(cfg).evaluation / "nnunet"


def segmentation_dir(cfg: Config, data: str, seed: int = 0) -> Path:
    return Paths(cfg).evaluation / "segmentation" / data / f"seed{seed}"


def metrics_path(cfg: Config, data: str, seed: int = 0) -> Path:
    return segmentation_dir(cfg, data, seed) / "metrics.json"


def prepared_path(cfg: Config, data: str) -> Path:
    """The record of a row's finished preparation (raw dataset + preprocessing with the real row's plans)."""
    return nnunet_root(cfg) / "preprocessed" / dataset_name(cfg, data)[1] / "gem3d_signature.json"


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def case_id(set_name: str, entry: dict) -> str:
    """The nnU-Net case id of a generated volume: <set>_<sample id>."""
    return _safe_id(f"{set_name}_{entry['sample_id']}")


def adherence_dir(cfg: Config) -> Path:
    """Where the mask adherence of the generated sets is kept (gem3d/evaluation/adherence.py)."""
    return Paths(cfg).evaluation / "adherence"


def adherence_path(cfg: Config, name: str) -> Path:
    return adherence_dir(cfg) / f"{name}.json"


def below_threshold(cfg: Config, sets) -> set[tuple[str, str]]:
    """(set, sample id) of the generated volumes whose adherence (mean Dice over regions) is below
    `evaluation.segmentation.min_adherence`, read from the adherence files."""
    threshold = cfg.evaluation.segmentation.min_adherence
    out = set()
    for name in sets:
        path = adherence_path(cfg, name)
        if not path.is_file():
            raise InputError(f"{path}: mask adherence of set {name} not measured (run `gem3d evaluate-adherence`)")
        out |= {(name, v["sample_id"]) for v in read_json(path)["volumes"] if v["mean_dice"] < threshold}
    return out


def set_cases(cfg: Config, name: str) -> list[tuple[dict, Case]]:
    """Every volume of generated set `name` (its training masks) as (manifest entry, nnU-Net case)."""
    sample_set = SampleSet.open(cfg, name, TRAIN_MASKS)
    return [(e, Case(case_id(name, e), sample_set.image_path(e), sample_set.label_path(e))) for e in sample_set.volumes]


def _raw_case(raw: Path, case_id: str) -> Case:
    return Case(case_id, raw / "imagesTr" / f"{case_id}_0000.nii.gz", raw / "labelsTr" / f"{case_id}.nii.gz")


def training_cases(cfg: Config, data: str) -> tuple[list[Case], list[str]]:
    """The (image, label) files nnU-Net trains on for ``data``, and the sets they come from ("real": the real
    training cases). An adherent row leaves out the volumes below `min_adherence` (adherence.py lists them)."""
    spec = row(cfg, data)
    paths = Paths(cfg)
    cases, sources = [], []
    if spec.real:
        cases += [_raw_case(paths.raw_dataset, c) for c in read_json(paths.split)["train"]]
        sources.append(REAL)
    dropped = below_threshold(cfg, spec.sets) if spec.adherent else set()
    if dropped:
        log.info("%s leaves out %d volumes below min_adherence: %s", data, len(dropped),
                 ", ".join(f"{name}/{sample}" for name, sample in sorted(dropped)))
    for name in spec.sets:
        cases += [case for e, case in set_cases(cfg, name) if (name, e["sample_id"]) not in dropped]
        sources.append(name)
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
    _, name = dataset_name(cfg, data)
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


def signature(cfg: Config, data: str, cases: list[Case], plans_from: str | None) -> dict:
    """What a prepared row depends on: its input files (path, size, mtime), its configuration and, for every row
    but the real one, the real row's plans it was preprocessed with."""
    content = {"cases": [[c.case_id, _stamp(c.image), _stamp(c.label)] for c in cases], "labels": cfg.data.labels,
               "configuration": cfg.evaluation.segmentation.configuration,
               "batch_size": cfg.evaluation.segmentation.batch_size,
               "base_features": cfg.evaluation.segmentation.base_features, "plans_from": plans_from}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return {"data": data, "n_cases": len(cases), "sha256": digest}


def device_name() -> str:
    from gem3d.device import compute_device

    return compute_device().type


def nnunet_seed(cfg: Config, seed: int) -> int:
    """The seed nnU-Net's trainer gets for seed index `seed` (the config's `seed` makes another study)."""
    return cfg.seed * 1000 + seed


def nnunet_run_env(cfg: Config, training: bool, seed: int = 0) -> dict[str, str]:
    """nnU-Net environment with our trainer findable by name (and the training length and seed for it); each seed
    has its own results folder."""
    root = nnunet_root(cfg)
    seg = cfg.evaluation.segmentation
    env = nnunet_env(root, seg.num_processes)
    env["nnUNet_results"] = str((root / "results" / f"seed{seed}").resolve())
    shim = root / "trainers" / "gem3d_nnunet_trainers.py"
    if not shim.is_file():
        try:
            with atomic_path(shim) as tmp:
                tmp.write_text("# written by gem3d: lets nnU-Net find gem3d's trainer via nnUNet_extTrainer\n"
                               "from gem3d.evaluation.nnunet_trainer import nnUNetTrainerGem3d  # noqa: F401\n")
        except FileNotFoundError:  # another seed's job wrote it at the same moment (and removed our temporary)
            if not shim.is_file():
                raise
    env["nnUNet_extTrainer"] = str(shim.parent.resolve())
    env.update({"GEM3D_NNUNET_EPOCHS": str(seg.epochs), "GEM3D_NNUNET_ITERATIONS": str(seg.iterations_per_epoch),
                "GEM3D_NNUNET_VAL_ITERATIONS": str(seg.val_iterations), "GEM3D_NNUNET_SKIP_VALIDATION": "1",
                "GEM3D_NNUNET_SEED": str(nnunet_seed(cfg, seed))})
    if training:  # only here: 0 or low values break planning
        env["nnUNet_n_proc_DA"] = str(augmentation_processes(cfg))
        if os.environ.get("OMP_NUM_THREADS"):  # Snakemake's share of cores for this job (nnU-Net would take all)
            env["GEM3D_NNUNET_THREADS"] = os.environ["OMP_NUM_THREADS"]
    else:
        env.pop("nnUNet_n_proc_DA", None)
    return env


def augmentation_processes(cfg: Config) -> int:
    seg = cfg.evaluation.segmentation
    return seg.num_processes if seg.augmentation_processes is None else seg.augmentation_processes


def model_folder(cfg: Config, data: str, seed: int = 0) -> Path:
    _, name = dataset_name(cfg, data)
    conf = cfg.evaluation.segmentation.configuration
    return nnunet_root(cfg) / "results" / f"seed{seed}" / name / f"{TRAINER}__{PLANS}__{conf}" / f"fold_{FOLD}"


def check_configuration(cfg: Config, plans_file: Path) -> None:
    """`evaluation.segmentation.configuration` is one nnU-Net planned for this dataset (and trainable alone)."""
    conf = cfg.evaluation.segmentation.configuration
    planned = sorted(read_json(plans_file)["configurations"])
    if conf not in planned:
        raise InputError(f"{cfg.source}: config key evaluation.segmentation.configuration: {conf!r} is not one nnU-Net "
                         f"planned for this dataset ({plans_file}: {', '.join(planned)})")
    if "cascade" in conf:
        raise InputError(f"{cfg.source}: config key evaluation.segmentation.configuration: {conf!r} needs its "
                         "3d_lowres stage trained and predicted first, which gem3d does not run; use "
                         f"{', '.join(c for c in planned if 'cascade' not in c)}")


def lock_path(cfg: Config, job: str) -> Path:
    """The lock a preparation or training of one row holds (gem3d.io.exclusive_lock): two `gem3d` calls on one
    row at once (by hand, or two workflows on one results folder) would write the same nnU-Net folders."""
    return nnunet_root(cfg) / "locks" / job


def prepare_row(cfg: Config, data: str) -> dict:
    """Raw dataset + preprocessing of ``data`` (the real row: nnU-Net's own planning; the others: the real row's
    plans); skipped when its inputs are unchanged. One process at a time prepares a row."""
    with exclusive_lock(lock_path(cfg, f"prepare_{data}"), f"preparing the nnU-Net dataset of row {data}"):
        return _prepare_row(cfg, data)


def _prepare_row(cfg: Config, data: str) -> dict:
    seg = cfg.evaluation.segmentation
    root = nnunet_root(cfg)
    dataset_id, name = dataset_name(cfg, data)
    cases, sources = training_cases(cfg, data)
    real_plans = root / "preprocessed" / dataset_name(cfg, REAL)[1] / f"{PLANS}.json"
    plans_from = None if data == REAL else _file_digest(real_plans)
    sig = signature(cfg, data, cases, plans_from)
    record = prepared_path(cfg, data)
    if record.is_file() and read_json(record) == sig:
        log.info("%s: nnU-Net dataset already prepared from unchanged inputs (%s)", data, record.parent)
        return {"dataset": name, "dataset_id": dataset_id, "n_training_cases": len(cases), "training_sources": sources}
    build_raw_dataset(cfg, data, cases)
    start = time.time()
    if data == REAL:
        plan_and_preprocess(root, dataset_id, name, seg.configuration, seg.num_processes)
        if seg.batch_size is not None or seg.base_features is not None:  # every row trains with the real row's plans
            plans_file = root / "preprocessed" / name / f"{PLANS}.json"
            plans = read_json(plans_file)
            if seg.configuration in plans["configurations"]:
                write_json(plans_file, edit_plans(plans, seg.configuration, seg.batch_size, seg.base_features))
    else:
        _preprocess_with_plans(cfg, dataset_id, name, real_plans)
    check_configuration(cfg, root / "preprocessed" / name / f"{PLANS}.json")
    log.info("nnU-Net %s of %s: %.0f s", "planning + preprocessing" if data == REAL else "preprocessing (real plans)",
             name, time.time() - start)
    write_json(record, sig)
    return {"dataset": name, "dataset_id": dataset_id, "n_training_cases": len(cases), "training_sources": sources}


def edit_plans(plans: dict, configuration: str, batch_size: int | None, base_features: int | None) -> dict:
    """nnU-Net plans with `evaluation.segmentation`'s edits of one configuration (nnU-Net's documented way to change
    a network: edit its plans): the batch size, and the width: every stage's features scaled so that the first
    stage has `base_features` (nnU-Net plans 32, doubling per stage up to its cap; the cap scales alike)."""
    plans = copy.deepcopy(plans)
    conf = plans["configurations"][configuration]
    if batch_size is not None:
        conf["batch_size"] = batch_size
    if base_features is not None:
        if "architecture" not in conf:  # an inheriting configuration: the edit goes into its own copy
            parent = plans["configurations"][conf["inherits_from"]]
            conf["architecture"] = copy.deepcopy(parent["architecture"])
        arch = conf["architecture"]["arch_kwargs"]
        first = arch["features_per_stage"][0]
        arch["features_per_stage"] = [max(1, round(f * base_features / first)) for f in arch["features_per_stage"]]
    return plans


def _file_digest(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{path}: the real row's nnU-Net plans are missing (run `gem3d prepare-segmentation --data "
                         "real` first: every row is preprocessed with them)")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _preprocess_with_plans(cfg: Config, dataset_id: int, name: str, real_plans: Path) -> None:
    """nnU-Net preprocessing of a row with the real row's plans (copied under this dataset's name), written to a
    staging folder and renamed into place when complete."""
    root = nnunet_root(cfg).resolve()
    seg = cfg.evaluation.segmentation
    real_id, real_name = dataset_name(cfg, REAL)
    final = root / "preprocessed" / name
    with atomic_dir(final) as tmp:
        staging = tmp.parent / f".staging-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / real_name).mkdir(parents=True)
        (staging / name).mkdir()
        shutil.copy(real_plans, staging / real_name / f"{PLANS}.json")
        shutil.copy(root / "raw" / name / "dataset.json", staging / name / "dataset.json")
        # the plans' own source: nnU-Net's trainer keeps the fingerprint its plans were made from with the model
        shutil.copy(real_plans.parent / "dataset_fingerprint.json", staging / name / "dataset_fingerprint.json")
        env = nnunet_env(root, seg.num_processes)
        env["nnUNet_preprocessed"] = str(staging)
        try:
            run_logged([nnunet_tool("nnUNetv2_move_plans_between_datasets"), "-s", str(real_id), "-t",
                        str(dataset_id), "-sp", PLANS, "-tp", PLANS], env, "nnU-Net move_plans_between_datasets")
            run_logged([nnunet_tool("nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", seg.configuration,
                        "-np", str(seg.num_processes), "-plans_name", PLANS], env, "nnU-Net preprocess")
            shutil.rmtree(tmp)
            os.replace(staging / name, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def training_signature(cfg: Config, prepared: dict, seed: int) -> dict:
    """What defines a row's trained nnU-Net: its prepared data, the seed (index and the seed nnU-Net gets) and the
    length; an unchanged signature skips or resumes the training, another starts it over."""
    seg = cfg.evaluation.segmentation
    return {**prepared, "seed": seed, "nnunet_seed": nnunet_seed(cfg, seed), "trainer": TRAINER,
            "epochs": seg.epochs, "iterations_per_epoch": seg.iterations_per_epoch,
            "val_iterations": seg.val_iterations}


def train_row(cfg: Config, data: str, seed: int) -> dict:
    """nnU-Net training of a prepared row with one seed (resumes or skips when its inputs are unchanged)."""
    seg = cfg.evaluation.segmentation
    dataset_id, name = dataset_name(cfg, data)
    record = prepared_path(cfg, data)
    if not record.is_file():
        raise InputError(f"{record}: nnU-Net dataset of {data} not prepared (run `gem3d prepare-segmentation --data "
                         f"{data}` first)")
    folder = model_folder(cfg, data, seed)
    sig = training_signature(cfg, read_json(record), seed)
    sig_file = folder.parent / "gem3d_signature.json"
    unchanged = sig_file.is_file() and read_json(sig_file) == sig
    device = device_name()
    if unchanged and (folder / "checkpoint_final.pth").is_file():
        log.info("%s seed %d: nnU-Net already trained on unchanged inputs (%s)", data, seed, folder)
    else:
        resume = unchanged and (folder / "checkpoint_latest.pth").is_file()
        if not unchanged:
            shutil.rmtree(folder.parent, ignore_errors=True)
            write_json(sig_file, sig)
        cmd = [nnunet_tool("nnUNetv2_train"), str(dataset_id), seg.configuration, FOLD, "-tr", TRAINER,
               "-device", device] + (["--c"] if resume else [])
        start = time.time()
        run_logged(cmd, nnunet_run_env(cfg, training=True, seed=seed), f"nnU-Net training on {data} (seed {seed})")
        log.info("nnU-Net training on %s seed %d (%d cases, %s, %d epochs x %d iterations, %s%s): %.0f s", data, seed,
                 sig["n_cases"], seg.configuration, seg.epochs, seg.iterations_per_epoch, device,
                 ", resumed" if resume else "", time.time() - start)
    if not (folder / "checkpoint_final.pth").is_file():
        raise InputError(f"{folder}: nnU-Net training on {data} finished without checkpoint_final.pth")
    return {"dataset": name, "dataset_id": dataset_id, "model": str(folder), "device": device,
            "curve": training_curve(folder)}


_LOG_TIME = re.compile(r"training_log_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)")


def _log_time(path: Path) -> tuple:
    """When nnU-Net started the log (its name: year_month_day_hour_minute_second, not zero-padded, so the names
    do not sort in time order: 12_10 before 12_9)."""
    found = _LOG_TIME.search(path.name)
    return tuple(int(v) for v in found.groups()) if found else (0,) * 6 + (path.name,)


_EPOCH = re.compile(r":\s*Epoch (\d+)\s*$")
_PSEUDO = re.compile(r":\s*Pseudo dice \[(.*)\]\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan")


def training_curve(folder: Path) -> list[dict]:
    """Validation pseudo-Dice per epoch from nnU-Net's training logs in `folder` (every log of the training, in
    order, so a resumed run's epochs follow the first's): [{"epoch", "pseudo_dice": [per class], "mean"}]."""
    curve: dict[int, list[float]] = {}
    epoch = None
    for log_file in sorted(folder.glob("training_log_*.txt"), key=_log_time):
        for line in log_file.read_text(errors="replace").splitlines():
            found = _EPOCH.search(line)
            if found:
                epoch = int(found.group(1))
                continue
            found = _PSEUDO.search(line)
            if found and epoch is not None:
                values = re.sub(r"np\.float\d+\(([^)]*)\)", r"\1", found.group(1))  # numpy 2 prints np.float32(x)
                curve[epoch] = [float(v) for v in _NUMBER.findall(values)]
    return [{"epoch": e, "pseudo_dice": v, "mean": float(np.nanmean(v)) if v else float("nan")}
            for e, v in sorted(curve.items())]


def real_test_cases(cfg: Config) -> list[Case]:
    paths = Paths(cfg)
    ids = read_json(paths.split)["test"]
    cases = [_raw_case(paths.raw_dataset, c) for c in ids]
    for case in cases:
        for path in (case.image, case.label):
            if not path.is_file():
                raise InputError(f"{path}: real test case {case.case_id} not found")
    return cases


def predict(cfg: Config, data: str, seed: int, cases: list[Case], out_dir: Path) -> Path:
    """nnU-Net predictions of `cases`' images by the model of (data, seed) -> ``out_dir`` (atomic)."""
    dataset_id, _ = dataset_name(cfg, data)
    inputs = out_dir.parent / f".{out_dir.name}_images"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    for case in cases:
        _link(case.image, inputs / f"{case.case_id}_0000.nii.gz")
    try:
        with atomic_dir(out_dir) as tmp:
            cmd = [nnunet_tool("nnUNetv2_predict"), "-i", str(inputs), "-o", str(tmp), "-d", str(dataset_id),
                   "-c", cfg.evaluation.segmentation.configuration, "-f", FOLD, "-tr", TRAINER, "-p", PLANS,
                   "-device", device_name(), "-npp", "0", "-nps", "0", "--disable_progress_bar"]
            if not cfg.evaluation.segmentation.test_time_mirroring:
                cmd.append("--disable_tta")
            start = time.time()
            run_logged(cmd, nnunet_run_env(cfg, training=False, seed=seed), f"nnU-Net prediction ({data} seed {seed})")
            log.info("nnU-Net prediction of %d cases (%s seed %d): %.0f s", len(cases), data, seed, time.time() - start)
            missing = [c.case_id for c in cases if not (tmp / f"{c.case_id}.nii.gz").is_file()]
            if missing:
                raise InputError(f"nnU-Net prediction ({data}) wrote no output for {missing[:3]}")
    finally:
        shutil.rmtree(inputs, ignore_errors=True)
    return out_dir


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def score(cfg: Config, predictions: Path, cases: list[Case]) -> dict:
    """Per-case metrics per region of the predictions against the cases' labels (at their own spacing)."""
    regions = segmentation_regions(cfg)
    per_case = {}
    for case in cases:
        image = read_volume(case.image)
        ref = read_volume(case.label).array.round().astype(np.int16)
        pred = read_volume(predictions / f"{case.case_id}.nii.gz").array.round().astype(np.int16)
        if pred.shape != ref.shape:
            raise InputError(f"{predictions / case.case_id}.nii.gz: prediction shape {pred.shape} differs from the "
                             f"label {ref.shape}")
        metrics = region_metrics(pred, ref, regions, image.spacing)
        per_case[case.case_id] = {"spacing_mm": list(image.spacing),
                                  "regions": {r: {k: _clean(v) for k, v in m.items()} for r, m in metrics.items()}}
    return per_case


def region_means(per_case: dict, regions) -> dict:
    """Means over the cases per region; ``hd95_both`` is the mean over the cases where both masks are non-empty
    (how published tables that drop empty cases report HD95), ``hd95_one_empty`` counts the cases scored
    ``EMPTY_HD95_MM``."""
    mean = {}
    for region in regions:
        rows = [c["regions"][region] for c in per_case.values()]
        both = [r["hd95"] for r in rows if r["n_pred"] > 0 and r["n_ref"] > 0]
        mean[region] = {"dice": float(np.mean([r["dice"] for r in rows])),
                        "hd95": float(np.mean([r["hd95"] for r in rows])),
                        "hd95_both": float(np.mean(both)) if both else None,
                        "hd95_one_empty": int(sum((r["n_pred"] == 0) != (r["n_ref"] == 0) for r in rows))}
    return mean


def run_downstream(cfg: Config, data: str, seed: int = 0) -> dict:
    """Train (one seed), predict the real test split, score; write ``segmentation/<data>/seed<s>/metrics.json``.
    One process at a time trains a row with a seed."""
    seg = cfg.evaluation.segmentation
    if seed not in seeds(cfg):
        raise InputError(f"--seed {seed}: evaluation.segmentation.seeds is {seg.seeds} (seeds 0..{seg.seeds - 1})")
    with exclusive_lock(lock_path(cfg, f"train_{data}_seed{seed}"), f"training row {data} with seed {seed}"):
        return _run_downstream(cfg, data, seed)


def _run_downstream(cfg: Config, data: str, seed: int) -> dict:
    seg = cfg.evaluation.segmentation
    cases = real_test_cases(cfg)
    prepared = read_json(prepared_path(cfg, data)) if prepared_path(cfg, data).is_file() else None
    if prepared is None:
        raise InputError(f"{prepared_path(cfg, data)}: nnU-Net dataset of {data} not prepared (run `gem3d "
                         f"prepare-segmentation --data {data}` first)")
    info = train_row(cfg, data, seed)
    predictions = predict(cfg, data, seed, cases, segmentation_dir(cfg, data, seed) / "predictions")
    per_case = score(cfg, predictions, cases)
    regions = segmentation_regions(cfg)
    spec = row(cfg, data)
    record = {"data": data, "seed": seed, "label": spec.label, **info, "n_training_cases": prepared["n_cases"],
              "training_sources": (["real"] if spec.real else []) + list(spec.sets),
              "left_out": sorted(below_threshold(cfg, spec.sets)) if spec.adherent else [], "trainer": TRAINER,
              "configuration": seg.configuration, "fold": FOLD, "epochs": seg.epochs,
              "iterations_per_epoch": seg.iterations_per_epoch, "val_iterations": seg.val_iterations,
              "regions": regions, "conventions": CONVENTIONS, "test_cases": [c.case_id for c in cases],
              "cases": per_case, "mean": region_means(per_case, regions)}
    write_json(metrics_path(cfg, data, seed), record)
    log.info("%s seed %d: %s", data, seed, ", ".join(f"{r} Dice {m['dice']:.3f}" for r, m in record["mean"].items()))
    return record
