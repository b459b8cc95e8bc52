"""Import a dataset (BraTS, MSD, AbdomenCT-1K or a generic folder) into an nnU-Net v2 raw dataset.

Every case is validated before it is written (readable, its header's size within the file's, 3D,
one grey value per voxel, a finite non-singular affine; image, mask and brain mask on the same
grid; finite intensities that are not one value everywhere; mask labels in the declared set,
non-empty mask). Every mask needs its image and every image its mask, and a case folder must not
hold two candidate files for one role. A bad case stops the import, or with `on_bad_case: skip`
is skipped and listed in the report. The dataset is written into a temporary folder and swapped
in whole with its seeded train/test split and the report, so a failed import changes nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gem3d.config import Config, DataConfig
from gem3d.io import InputError, Volume, atomic_dir, atomic_path, read_volume, write_json, write_volume

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


@dataclass(frozen=True)
class BadCase:
    """A case the finder could not pair up (a mask without an image, two candidate files, ...)."""

    case_id: str
    reason: str  # one line naming the file(s)


def _one(folder: Path, patterns: tuple[str, ...], what: str) -> Path | None:
    """The one file of `folder` matching any of `patterns`; two different candidates are an error
    (importing the alphabetically first would silently pick one)."""
    hits = sorted({p for p in folder.iterdir()
                   if any(re.fullmatch(pattern, p.name, flags=re.IGNORECASE) for pattern in patterns)})
    if len(hits) > 1:
        raise InputError(f"{folder}: {len(hits)} files could be the {what} ({', '.join(p.name for p in hits)}); "
                         "keep one")
    return hits[0] if hits else None


def find_brats(root: Path) -> list[CaseFiles | BadCase]:
    """One folder per case: FLAIR (`*_flair.nii.gz` or `Flair*.nii.gz`) and seg (`*_seg` or `OTMultiClass`),
    optionally a `brainmask*`. A folder with neither image nor segmentation is not a case."""
    cases: list[CaseFiles | BadCase] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            image = _one(folder, (r".*_flair\.nii(\.gz)?", r"flair.*\.nii(\.gz)?"), "FLAIR image")
            mask = _one(folder, (r".*_seg\.nii(\.gz)?", r"OTMultiClass.*\.nii(\.gz)?", r".*seg.*\.nii(\.gz)?"),
                        "segmentation")
            region = _one(folder, (r"brainmask.*\.nii(\.gz)?",), "brain mask")
        except InputError as exc:
            cases.append(BadCase(folder.name, str(exc)))
            continue
        if image is None and mask is None:
            continue
        if image is None or mask is None:
            missing = "FLAIR image" if image is None else "segmentation"
            cases.append(BadCase(folder.name, f"{folder}: no {missing} found "
                                              "(expected *_flair/*_seg or Flair*/OTMultiClass*)"))
            continue
        cases.append(CaseFiles(folder.name, image, mask, region))
    return cases


def _pair(images: dict[str, Path], masks: dict[str, Path], where: str) -> list[CaseFiles | BadCase]:
    """Cases from image and mask files keyed by case id; an image or a mask without its partner is a bad case."""
    cases: list[CaseFiles | BadCase] = []
    for case_id in sorted(set(images) | set(masks)):
        if case_id not in masks:
            cases.append(BadCase(case_id, f"{images[case_id]}: no mask for this image in {where}"))
        elif case_id not in images:
            cases.append(BadCase(case_id, f"{masks[case_id]}: no image for this mask in {where}"))
        else:
            cases.append(CaseFiles(case_id, images[case_id], masks[case_id]))
    return cases


def _by_id(files, suffix: str = "", keep_extension: bool = False) -> dict[str, Path]:
    """case id -> file, the id being the file name without the NIfTI extension (kept with
    `keep_extension`) and without `suffix`; macOS '._' files ignored; two files for one id are an error."""
    ids: dict[str, Path] = {}
    for p in sorted(files):
        if p.is_file() and not p.name.startswith("."):
            name = p.name if keep_extension else p.name.split(".nii")[0]
            case_id = name[: len(name) - len(suffix)]
            if case_id in ids:
                raise InputError(f"{p}: a second file for case {case_id} (the first is {ids[case_id]}); keep one")
            ids[case_id] = p
    return ids


def find_msd(root: Path) -> list[CaseFiles | BadCase]:
    """MSD task folder: imagesTr/<case>.nii.gz and labelsTr/<case>.nii.gz."""
    images, labels = root / "imagesTr", root / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(f"{folder}: MSD folder missing (expected imagesTr/ and labelsTr/)")
    return _pair(_by_id(images.glob("*.nii*")), _by_id(labels.glob("*.nii*")), f"{root} (imagesTr/, labelsTr/)")


def find_abdomenct1k(root: Path) -> list[CaseFiles | BadCase]:
    """AbdomenCT-1K release: images `Case_XXXXX_0000.nii.gz` (any subfolder), masks `Case_XXXXX.nii.gz`."""
    images = _by_id(root.rglob("Case_*_0000.nii.gz"), "_0000")
    masks = _by_id(p for p in root.rglob("Case_*.nii.gz") if not p.name.endswith("_0000.nii.gz"))
    return _pair(images, masks, str(root))


def find_folder(root: Path, data: DataConfig) -> list[CaseFiles | BadCase]:
    """Generic folder: images matching `image_glob`, masks with the same file name in `mask_dir`."""
    mask_dir = root / data.mask_dir
    images = _by_id((p for p in root.glob(data.image_glob) if p.parent != mask_dir), keep_extension=True)
    masks = _by_id(mask_dir.glob("*.nii*"), keep_extension=True) if mask_dir.is_dir() else {}
    cases = _pair(images, masks, f"{root} (images '{data.image_glob}', masks '{data.mask_dir}/')")
    return [replace(c, case_id=c.case_id.split(".nii")[0]) for c in cases]


def find_cases(data: DataConfig) -> list[CaseFiles | BadCase]:
    """Every case of the data folder, in order (at most `max_cases`), with the ones that could not be paired."""
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


def check_same_grid(path: Path, other: Volume, reference: Volume, reference_path: Path, tolerance: float,
                    what: str) -> None:
    """`other` (read from `path`) lies on the reference image's voxel grid: same shape, affine within `tolerance`."""
    if other.shape != reference.shape:
        raise InputError(f"{path}: {what} shape {other.shape} != image shape {reference.shape} ({reference_path.name})")
    diff = float(np.abs(reference.affine - other.affine).max())
    if not diff <= tolerance:  # `not <=`: a NaN difference is a mismatch too
        raise InputError(f"{path}: {what} affine differs from the image's by {diff:.4g} (tolerance {tolerance})")


def load_case(case: CaseFiles, data: DataConfig) -> tuple[Volume, Volume]:
    """Read and validate one case; return (image, mask) with mask labels already mapped.

    The mask and the optional brain mask must lie on the image's grid; the image must be finite
    and not one value everywhere (inside the brain mask, when there is one)."""
    image = read_volume(case.image)
    mask = read_volume(case.mask)
    check_same_grid(case.mask, mask, image, case.image, data.affine_tolerance, "mask")
    if not np.isfinite(image.array).all():
        raise InputError(f"{case.image}: image contains NaN or infinite values")
    labels = mask.array
    if not np.isfinite(labels).all():
        raise InputError(f"{case.mask}: mask contains NaN or infinite values")
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
    if arr.min() == arr.max():
        raise InputError(f"{case.image}: image has the one value {arr.min():g} everywhere (no content)")
    if case.region is not None:
        region = read_volume(case.region)
        check_same_grid(case.region, region, image, case.image, data.affine_tolerance, "brain mask")
        inside = region.array > 0.5
        if not inside.any() or arr[inside].min() == arr[inside].max():
            raise InputError(f"{case.region}: the image has no content inside this brain mask "
                             f"({int(inside.sum())} voxels above 0.5)")
        arr = np.where(inside, arr, 0).astype(np.float32)
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
    """Validate every case and write `raw_root/<Dataset...>` (nnU-Net raw), the split and a report.

    All or nothing: the dataset is built in a temporary sibling folder and swapped in whole, and the
    split and the report are renamed into place right after it, so a failed import (a bad case,
    a full disk) leaves the previous dataset, split and report exactly as they were.
    """
    data = cfg.data
    cases = find_cases(data)
    dataset_dir = Path(raw_root) / cfg.nnunet_dataset_name
    imported, skipped = [], []
    with atomic_path(report_path) as report_tmp, atomic_path(split_path) as split_tmp, \
            atomic_dir(dataset_dir) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for i, case in enumerate(cases):
            try:
                if isinstance(case, BadCase):
                    raise InputError(case.reason)
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
        write_json(split_tmp, make_split([c["case"] for c in imported], data.test_fraction, cfg.seed))
        report = {"dataset": str(dataset_dir), "format": data.format, "source": data.path,
                  "cases": imported, "skipped": skipped}
        write_json(report_tmp, report)
    return report
