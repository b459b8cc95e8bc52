"""Import a dataset (BraTS challenge folders, MSD Task01_BrainTumour or another MSD task,
AbdomenCT-1K or a generic folder) into an nnU-Net v2 raw dataset.

Every case is validated before it is written (readable, its header's size within the file's, 3D or
one chosen channel of a 4D file, one grey value per voxel, a finite non-singular affine; image,
mask and brain mask on the same grid; finite intensities that are not one value everywhere; mask
labels in the format's label scheme, non-empty mask). Every mask needs its image and every image
its mask, and a case folder must not hold two candidate files for one role. A bad case stops the
import, or with `on_bad_case: skip` is skipped and listed in the report. The dataset is written
into a temporary folder and swapped in whole with its train/test split (gem3d/data/split.py) and
the report, so a failed import changes nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gem3d.config import Config, DataConfig
from gem3d.data.split import chosen_cases, final_split
from gem3d.evaluation.segmentation_metrics import BRATS_REGIONS
from gem3d.io import (InputError, Volume, atomic_dir, atomic_path, nifti_shape, read_json, read_volume, write_json,
                      write_volume)

log = logging.getLogger("gem3d.import")

# BraTS label schemes. Challenge 2013-2015: 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing.
# Challenge 2017-2021: 1 necrotic and non-enhancing core, 2 oedema, 4 enhancing. MSD Task01_BrainTumour:
# 1 oedema, 2 non-enhancing tumour (necrosis included), 3 enhancing. All map onto 1 = necrotic/non-enhancing
# core, 2 = oedema, 3 = enhancing, so that WT = {1,2,3}, TC = {1,3}, ET = {3} (BRATS_REGIONS) for every release.
BRATS_RAW_LABELS = (0, 1, 2, 3, 4)
BRATS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}
MSD_BRATS_LABEL_MAP = {0: 0, 1: 2, 2: 1, 3: 3}
BRATS_LABELS = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 3}


@dataclass(frozen=True)
class LabelScheme:
    """How a format's raw label ids become the imported ones, and the evaluation regions over those."""

    raw_to_imported: dict[int, int] | None  # None: data.labels' ids as they are
    imported: dict[str, int] | None  # the imported labels (data.labels must use these ids); None: data.labels
    regions: dict[str, list[int]] | None  # segmentation regions over imported ids; None: one per label


LABEL_SCHEMES = {
    "brats": LabelScheme(BRATS_LABEL_MAP, BRATS_LABELS, BRATS_REGIONS),
    "msd_brats": LabelScheme(MSD_BRATS_LABEL_MAP, BRATS_LABELS, BRATS_REGIONS),
}
PLAIN_SCHEME = LabelScheme(None, None, None)


def label_scheme(data: DataConfig) -> LabelScheme:
    return LABEL_SCHEMES.get(data.format, PLAIN_SCHEME)


def segmentation_regions(data: DataConfig) -> dict[str, list[int]]:
    """The evaluation regions of a dataset: its scheme's (BraTS releases: WT/TC/ET), else one region per
    foreground label of ``data.labels``, named by it."""
    regions = label_scheme(data).regions
    if regions is not None:
        return {name: list(values) for name, values in regions.items()}
    return {name: [int(v)] for name, v in sorted(data.labels.items(), key=lambda kv: kv[1]) if v != 0}


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


def entry_problem(path: Path, want: str = "file") -> str | None:
    """Why the data folder's entry `path` is not the `want` ("file" or "folder") it should be: a symbolic link
    loop (a link to itself included), a link to nothing, the other kind, or missing; None when it is one."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop so
            return "is a symbolic link loop (it leads back to itself)"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "is a symbolic link loop (it leads back to itself)"
            return f"is a link to {os.readlink(path)}, which does not exist"
    if want == "file" and path.is_dir():
        return "is a folder, not a file"
    if want == "folder" and path.exists() and not path.is_dir():
        return "is a file, not a folder"
    return None if path.exists() else "does not exist"


def _one(folder: Path, patterns: tuple[str, ...], what: str) -> Path | None:
    """The one file of `folder` matching any of `patterns`; two different candidates are an error
    (importing the alphabetically first would silently pick one), and so is a candidate that is no file."""
    hits = sorted({p for p in folder.iterdir()
                   if any(re.fullmatch(pattern, p.name, flags=re.IGNORECASE) for pattern in patterns)})
    if len(hits) > 1:
        raise InputError(f"{folder}: {len(hits)} files could be the {what} ({', '.join(p.name for p in hits)}); "
                         "keep one")
    problem = entry_problem(hits[0]) if hits else None
    if problem:
        raise InputError(f"{hits[0]}: the {what} {problem}")
    return hits[0] if hits else None


def find_brats(root: Path) -> list[CaseFiles | BadCase]:
    """One folder per case: FLAIR (`*_flair.nii.gz` or `Flair*.nii.gz`) and seg (`*_seg` or `OTMultiClass`),
    optionally a `brainmask*`. A folder with neither image nor segmentation is not a case."""
    cases: list[CaseFiles | BadCase] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() or p.is_symlink()):
        problem = entry_problem(folder, "folder")
        if problem == "is a file, not a folder":  # a link to a file (a README): not a case
            continue
        if problem:
            cases.append(BadCase(folder.name, f"{folder}: the case folder {problem}"))
            continue
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
        bad = [(role, path, why) for role, path in (("image", images.get(case_id)), ("mask", masks.get(case_id)))
               if path is not None and (why := entry_problem(path))]
        if bad:
            role, path, why = bad[0]
            cases.append(BadCase(case_id, f"{path}: the {role} of case {case_id} {why}"))
        elif case_id not in masks:
            cases.append(BadCase(case_id, f"{images[case_id]}: no mask for this image in {where}"))
        elif case_id not in images:
            cases.append(BadCase(case_id, f"{masks[case_id]}: no image for this mask in {where}"))
        else:
            cases.append(CaseFiles(case_id, images[case_id], masks[case_id]))
    return cases


def _by_id(files, suffix: str = "", keep_extension: bool = False) -> dict[str, Path]:
    """case id -> file, the id being the file name without the NIfTI extension (kept with
    `keep_extension`) and without `suffix`; macOS '._' files ignored; two files for one id are an error.
    An entry that is no file (a folder, a link loop or a link to nothing) is kept: `_pair` names it."""
    ids: dict[str, Path] = {}
    for p in sorted(files):
        if not p.name.startswith(".") and (p.is_file() or p.is_symlink() or p.is_dir()):
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
        problem = entry_problem(folder, "folder")
        if problem == "does not exist":
            raise InputError(f"{folder}: MSD folder missing (expected imagesTr/ and labelsTr/)")
        if problem:
            raise InputError(f"{folder}: {problem} (expected the MSD folders imagesTr/ and labelsTr/)")
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


def find_cases(data: DataConfig, root: Path | None = None) -> list[CaseFiles | BadCase]:
    """Every case of the data folder (`root`, default data.path), in order (at most `max_cases` of
    data.path), with the ones that could not be paired."""
    main = root is None
    root = Path(data.path if root is None else root)
    if not root.is_dir():
        raise InputError(f"{root}: data folder does not exist")
    finders = {
        "brats": find_brats,
        "msd_brats": find_msd,
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
    return cases[: data.max_cases] if data.max_cases and main else cases


def raw_label_map(data: DataConfig) -> dict[int, int]:
    """Raw label id -> imported label id (the format's label scheme)."""
    mapping = label_scheme(data).raw_to_imported
    return dict(mapping) if mapping is not None else {v: v for v in data.labels.values()}


def check_labels_config(data: DataConfig, source: str) -> None:
    """data.labels uses the ids the format's label scheme imports (BraTS releases: 0..3)."""
    imported = label_scheme(data).imported
    if imported is not None and sorted(data.labels.values()) != sorted(imported.values()):
        raise InputError(f"{source}: config key data.labels: format {data.format} imports the labels "
                         f"{imported}; got ids {sorted(data.labels.values())}")


def channel_names(root: Path) -> tuple[Path, list[str]] | None:
    """The channel names of a Decathlon / nnU-Net folder's dataset.json (`channel_names`, or v1's
    `modality`), in index order; None without a dataset.json or either key."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    meta = read_json(path)
    names = meta.get("channel_names", meta.get("modality")) if isinstance(meta, dict) else None
    if not isinstance(names, dict) or not all(str(k).isdigit() for k in names):
        return None
    return path, [str(names[k]) for k in sorted(names, key=int)]


def _listing(names: list[str]) -> str:
    return ", ".join(f"{i} {n}" for i, n in enumerate(names))


def channel_index(data: DataConfig, root: Path) -> int | None:
    """The index of `data.channel` among `root`'s channels (None: no channel chosen). A name is looked up
    (case-insensitively) in root/dataset.json; a folder whose dataset.json names several channels needs one."""
    named = channel_names(root)
    if data.channel is None:
        if named is not None and len(named[1]) > 1:
            raise InputError(f"{named[0]}: the images have {len(named[1])} channels ({_listing(named[1])}); set "
                             "data.channel to one of them (name or index)")
        return None
    if isinstance(data.channel, int):
        if named is not None and data.channel >= len(named[1]):
            raise InputError(f"{named[0]}: data.channel {data.channel} does not exist; channels: "
                             f"{_listing(named[1])}")
        return data.channel
    if named is None:
        raise InputError(f"{root}: data.channel {data.channel!r} is a name, but there is no dataset.json naming "
                         "the channels; give the channel's index")
    lowered = [n.lower() for n in named[1]]
    if data.channel.lower() not in lowered:
        raise InputError(f"{named[0]}: no channel named {data.channel!r} (data.channel); channels: "
                         f"{_listing(named[1])}")
    return lowered.index(data.channel.lower())


def read_image(path: Path, channel: int | None) -> Volume:
    """A case's image: the 3D file, or the chosen channel of a 4D one (a 4D file needs one)."""
    if channel is None:
        shape = nifti_shape(path)
        if len(shape) == 4:
            raise InputError(f"{path}: expected a 3D volume, got 4D with {shape[3]} channels (shape {shape}); set "
                             "data.channel to the channel to import (its index, or its name in the folder's "
                             "dataset.json)")
    return read_volume(path, channel=channel)


def check_same_grid(path: Path, other: Volume, reference: Volume, reference_path: Path, tolerance: float,
                    what: str) -> None:
    """`other` (read from `path`) lies on the reference image's voxel grid: same shape, affine within `tolerance`."""
    if other.shape != reference.shape:
        raise InputError(f"{path}: {what} shape {other.shape} != image shape {reference.shape} ({reference_path.name})")
    diff = float(np.abs(reference.affine - other.affine).max())
    if not diff <= tolerance:  # `not <=`: a NaN difference is a mismatch too
        raise InputError(f"{path}: {what} affine differs from the image's by {diff:.4g} (tolerance {tolerance})")


def load_case(case: CaseFiles, data: DataConfig, channel: int | None = None) -> tuple[Volume, Volume]:
    """Read and validate one case; return (image, mask) with mask labels already mapped.

    The image is the 3D file or its channel `channel`; the mask and the optional brain mask must lie
    on the image's grid; the image must be finite and not one value everywhere (inside the brain
    mask, when there is one)."""
    image = read_image(case.image, channel)
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
    found = [float(v) for v in np.unique(labels)]  # compared as floats: a huge value must not wrap around as an int
    unexpected = [v for v in found if v not in mapping]
    if unexpected:
        shown = ", ".join(str(int(v)) if abs(v) < 2 ** 31 else f"{v:g}" for v in unexpected[:10])
        raise InputError(f"{case.mask}: unexpected label(s) [{shown}]; allowed {sorted(mapping)}")
    if set(found) <= {0}:
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


def gather_cases(cfg: Config) -> tuple[list[tuple[CaseFiles | BadCase, int | None]], list[str], dict | None, list[str]]:
    """Every case to import with the channel to read, the ids of data.test_path's cases, the user split
    (None: seeded or test_path) and the found cases that split leaves out; all checked before any
    case is read."""
    data = cfg.data
    check_labels_config(data, cfg.source)
    main = [(case, channel_index(data, Path(data.path))) for case in find_cases(data)]
    test: list[tuple[CaseFiles | BadCase, int | None]] = []
    if data.test_path is not None:
        root = Path(data.test_path)
        if not root.is_dir():
            raise InputError(f"{cfg.source}: config key data.test_path: {root} is not a folder")
        channel = channel_index(data, root)
        test = [(case, channel) for case in find_cases(data, root)]
        first = {c.case_id: c for c, _ in main}
        for case, _ in test:
            if case.case_id in first:
                other = first[case.case_id]
                raise InputError(f"{getattr(case, 'image', root)}: case {case.case_id} of data.test_path is also in "
                                 f"data.path ({getattr(other, 'image', data.path)}); case ids must differ")
    sides, left_out = None, []
    if data.split is not None:
        sides, left_out = chosen_cases(data, [c.case_id for c, _ in main])
        main = [(c, ch) for c, ch in main if c.case_id not in set(left_out)]
    return main + test, [c.case_id for c, _ in test], sides, left_out


def import_dataset(cfg: Config, raw_root: Path, split_path: Path, report_path: Path) -> dict:
    """Validate every case and write `raw_root/<Dataset...>` (nnU-Net raw), the split and a report.

    All or nothing: the dataset is built in a temporary sibling folder and swapped in whole, and the
    split and the report are renamed into place right after it, so a failed import (a bad case,
    a full disk) leaves the previous dataset, split and report exactly as they were.
    """
    data = cfg.data
    cases, test_ids, sides, left_out = gather_cases(cfg)
    dataset_dir = Path(raw_root) / cfg.nnunet_dataset_name
    imported, skipped = [], []
    with atomic_path(report_path) as report_tmp, atomic_path(split_path) as split_tmp, \
            atomic_dir(dataset_dir) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for i, (case, channel) in enumerate(cases):
            try:
                if isinstance(case, BadCase):
                    raise InputError(case.reason)
                image, mask = load_case(case, data, channel)
            except InputError as exc:
                if data.on_bad_case == "stop":
                    raise
                log.warning("skipping case %s: %s", case.case_id, exc)
                skipped.append({"case": case.case_id, "reason": str(exc)})
                continue
            write_volume(tmp / "imagesTr" / f"{case.case_id}_0000.nii.gz", image, np.float32)
            write_volume(tmp / "labelsTr" / f"{case.case_id}.nii.gz", mask, np.uint8)
            imported.append({"case": case.case_id, "image": str(case.image), "mask": str(case.mask),
                             "channel": channel, "shape": list(image.shape), "spacing": list(image.spacing)})
            log.info("imported %d/%d %s shape %s", i + 1, len(cases), case.case_id, image.shape)
        if len(imported) < 2:
            raise InputError(f"{data.path}: fewer than 2 valid cases ({len(skipped)} skipped)")
        ids = [c["case"] for c in imported]
        split = final_split(data, sides, ids, test_ids, cfg.seed, len(skipped))
        write_json(tmp / "dataset.json", {
            "channel_names": {"0": data.modality},
            "labels": dict(sorted(data.labels.items(), key=lambda kv: kv[1])),
            "numTraining": len(imported),
            "file_ending": ".nii.gz",
            "name": cfg.name,
            "description": f"imported by gem3d from {data.format} folder {data.path}",
        })
        write_json(split_tmp, split)
        report = {"dataset": str(dataset_dir), "format": data.format, "source": data.path,
                  "test_source": data.test_path, "split": split["source"], "cases": imported, "skipped": skipped,
                  "not_in_split": left_out}
        write_json(report_tmp, report)
    return report
