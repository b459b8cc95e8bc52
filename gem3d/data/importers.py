"""Import a dataset (BraTS, MSD, AbdomenCT-1K or a generic folder) into an nnU-Net v2 raw dataset.

Every case is validated before anything is written (readable, 3D, image and mask of the same shape
and matching affine, finite intensities, mask labels in the declared set, non-empty mask). The
dataset is written into a temporary folder and renamed into place, so a failed import leaves
nothing behind. A seeded train/test split is written next to it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gem3d.config import Config, DataConfig
from gem3d.io import InputError, Volume, atomic_dir, read_volume, write_json, write_volume

log = logging.getLogger("gem3d.import")

# BraTS label schemes. 2013-2015: 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing.
# 2017-2021: 1 necrotic and non-enhancing core, 2 oedema, 4 enhancing. Both map onto
# 1 = necrotic/non-enhancing core, 2 = oedema, 3 = enhancing, so that WT = {1,2,3}, TC = {1,3}, ET = {3}.
BRATS_RAW_LABELS = (0, 1, 2, 3, 4)
BRATS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}
BRATS_LABELS = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 3}


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    image: Path
    mask: Path
    region: Path | None = None  # optional brain mask: voxels outside are set to 0 (nnU-Net's non-zero region)


def _first(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        hits = sorted(p for p in folder.iterdir() if re.fullmatch(pattern, p.name, flags=re.IGNORECASE))
        if hits:
            return hits[0]
    return None


def find_brats(root: Path) -> list[CaseFiles]:
    """One folder per case: FLAIR (`*_flair.nii.gz` or `Flair*.nii.gz`) and seg (`*_seg` or `OTMultiClass`)."""
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image = _first(folder, (r".*_flair\.nii(\.gz)?", r"flair.*\.nii(\.gz)?"))
        mask = _first(folder, (r".*_seg\.nii(\.gz)?", r"OTMultiClass.*\.nii(\.gz)?", r".*seg.*\.nii(\.gz)?"))
        region = _first(folder, (r"brainmask.*\.nii(\.gz)?",))
        if image is None and mask is None:
            continue
        if image is None or mask is None:
            missing = "FLAIR image" if image is None else "segmentation"
            raise InputError(f"{folder}: no {missing} found (expected *_flair/*_seg or Flair*/OTMultiClass*)")
        cases.append(CaseFiles(folder.name, image, mask, region))
    return cases


def find_msd(root: Path) -> list[CaseFiles]:
    """MSD task folder: imagesTr/<case>.nii.gz and labelsTr/<case>.nii.gz (macOS '._' files ignored)."""
    images, labels = root / "imagesTr", root / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(f"{folder}: MSD folder missing (expected imagesTr/ and labelsTr/)")
    cases = []
    for image in sorted(images.glob("*.nii*")):
        if image.name.startswith("."):
            continue
        case_id = image.name.split(".nii")[0]
        mask = labels / image.name
        if not mask.exists():
            raise InputError(f"{mask}: label file missing for image {image}")
        cases.append(CaseFiles(case_id, image, mask))
    return cases


def find_abdomenct1k(root: Path) -> list[CaseFiles]:
    """AbdomenCT-1K release: images `Case_XXXXX_0000.nii.gz` (any subfolder), masks `Case_XXXXX.nii.gz`."""
    images = {p.name[: -len("_0000.nii.gz")]: p for p in root.rglob("Case_*_0000.nii.gz")}
    masks = {p.name[: -len(".nii.gz")]: p for p in root.rglob("Case_*.nii.gz") if not p.name.endswith("_0000.nii.gz")}
    cases = []
    for case_id in sorted(images):
        if case_id not in masks:
            raise InputError(f"{images[case_id]}: no mask {case_id}.nii.gz found under {root}")
        cases.append(CaseFiles(case_id, images[case_id], masks[case_id]))
    return cases


def find_folder(root: Path, data: DataConfig) -> list[CaseFiles]:
    """Generic folder: images matching `image_glob`, masks with the same file name in `mask_dir`."""
    cases = []
    for image in sorted(root.glob(data.image_glob)):
        mask = root / data.mask_dir / image.name
        if not mask.exists():
            raise InputError(f"{mask}: mask missing for image {image}")
        cases.append(CaseFiles(image.name.split(".nii")[0], image, mask))
    return cases


def find_cases(data: DataConfig) -> list[CaseFiles]:
    root = Path(data.path)
    if not root.is_dir():
        raise InputError(f"{root}: data folder does not exist")
    finders = {
        "brats": find_brats,
        "msd": find_msd,
        "abdomenct1k": find_abdomenct1k,
        "folder": lambda r: find_folder(r, data),
    }
    cases = finders[data.format](root)
    if not cases:
        raise InputError(f"{root}: no cases found for format '{data.format}'")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError(f"{root}: duplicate case ids")
    return cases[: data.max_cases] if data.max_cases else cases


def raw_label_map(data: DataConfig) -> dict[int, int]:
    """Raw label id -> imported label id."""
    if data.format == "brats":
        return dict(BRATS_LABEL_MAP)
    return {v: v for v in data.labels.values()}


def load_case(case: CaseFiles, data: DataConfig) -> tuple[Volume, Volume]:
    """Read and validate one case; return (image, mask) with mask labels already mapped."""
    image = read_volume(case.image)
    mask = read_volume(case.mask)
    if image.shape != mask.shape:
        raise InputError(f"{case.mask}: mask shape {mask.shape} != image shape {image.shape} ({case.image.name})")
    diff = float(np.abs(image.affine - mask.affine).max())
    if diff > data.affine_tolerance:
        raise InputError(f"{case.mask}: affine differs from the image's by {diff:.4g} (tolerance {data.affine_tolerance})")
    if not np.isfinite(image.array).all():
        raise InputError(f"{case.image}: image contains NaN or infinite values")
    labels = mask.array
    if not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{case.mask}: mask has non-integer values")
    mapping = raw_label_map(data)
    found = set(np.unique(labels).astype(int).tolist())
    unexpected = sorted(found - set(mapping))
    if unexpected:
        raise InputError(f"{case.mask}: unexpected label(s) {unexpected}; allowed {sorted(mapping)}")
    if found <= {0}:
        raise InputError(f"{case.mask}: mask is empty (no foreground label)")
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for raw, new in mapping.items():
        lut[raw] = new
    mapped = Volume(lut[labels.astype(np.int64)], image.affine)
    arr = image.array
    if case.region is not None:
        region = read_volume(case.region)
        if region.shape != image.shape:
            raise InputError(f"{case.region}: brain mask shape {region.shape} != image shape {image.shape}")
        arr = np.where(region.array > 0.5, arr, 0).astype(np.float32)
    return Volume(arr, image.affine), mapped


def make_split(case_ids: list[str], test_fraction: float, seed: int) -> dict:
    """Seeded train/test split (at least one case on each side)."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise InputError(f"need at least 2 cases for a train/test split, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(max(1, int(round(test_fraction * len(ids)))), len(ids) - 1)
    test = sorted(ids[i] for i in order[:n_test])
    train = sorted(ids[i] for i in order[n_test:])
    return {"seed": seed, "test_fraction": test_fraction, "train": train, "test": test}


def import_dataset(cfg: Config, raw_root: Path, split_path: Path, report_path: Path) -> dict:
    """Validate every case and write `raw_root/<Dataset...>` (nnU-Net raw), the split and a report."""
    data = cfg.data
    cases = find_cases(data)
    dataset_dir = Path(raw_root) / cfg.nnunet_dataset_name
    imported, skipped = [], []
    with atomic_dir(dataset_dir) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for i, case in enumerate(cases):
            try:
                image, mask = load_case(case, data)
            except InputError as exc:
                if data.on_bad_case == "stop":
                    raise
                log.warning("skipping case %s: %s", case.case_id, exc)
                skipped.append({"case": case.case_id, "reason": str(exc)})
                continue
            write_volume(tmp / "imagesTr" / f"{case.case_id}_0000.nii.gz", image, np.float32)
            write_volume(tmp / "labelsTr" / f"{case.case_id}.nii.gz", mask, np.uint8)
            imported.append({"case": case.case_id, "image": str(case.image), "mask": str(case.mask),
                             "shape": list(image.shape), "spacing": list(image.spacing)})
            log.info("imported %d/%d %s shape %s", i + 1, len(cases), case.case_id, image.shape)
        if len(imported) < 2:
            raise InputError(f"{data.path}: fewer than 2 valid cases ({len(skipped)} skipped)")
        write_json(tmp / "dataset.json", {
            "channel_names": {"0": data.modality},
            "labels": dict(sorted(data.labels.items(), key=lambda kv: kv[1])),
            "numTraining": len(imported),
            "file_ending": ".nii.gz",
            "name": cfg.name,
            "description": f"imported by gem3d from {data.format} folder {data.path}",
        })
    split = make_split([c["case"] for c in imported], data.test_fraction, cfg.seed)
    write_json(split_path, split)
    report = {"dataset": str(dataset_dir), "format": data.format, "source": data.path,
              "cases": imported, "skipped": skipped}
    write_json(report_path, report)
    return report
