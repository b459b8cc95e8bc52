"""The slice store: what the models read, and the way back to the original image geometry.

Per case, from nnU-Net's `3d_fullres` preprocessed arrays (axis order (z, y, x) after nnU-Net's
`transpose_forward`; axis 0 is the slice axis):
Files per case: `<case>_image.npy`, `<case>_label.npy`, `<case>_label_native.npy` (plain .npy so
training can memory-map them at the paper's 512 x 512 size).
- `image`: (d, s, s) float16 on disk (float32 when loaded) in [-1, 1]: min-max of nnU-Net's normalised intensities over the
  non-zero region, with -1 outside it (the authors min-max the whole volume; outside values then
  sit at an arbitrary grey, which the model must learn for nothing);
- `label`: (d, s, s) int8: the mask, with nnU-Net's outside-of-non-zero-region label -1 kept as
  its own level;
- `label_native`: (d, y, x) int8: the same mask before resizing (mask augmentation works here);
- `body` (CT only): (d, y, x) bool at nnU-Net's resolution, the body outline (`ct_body`): nnU-Net's
  non-zero region is the whole field of view on CT (air is -1000 HU, not 0), so it outlines no body; on
  other modalities the body outline IS that region (label != -1) and nothing more is stored
  (`SliceStore.body`). The informed-slice fit guard compares these outlines.
Slices are letterboxed to a square (padding with -1) and then resized to s x s (bilinear with
antialiasing for images, nearest for masks), so no slice is stretched; `preprocess.slice_fit: stretch`
resizes them to the square instead, as the authors' data loader does (their released networks saw
stretched slices), and `preprocess.intensity: volume` min-maxes the whole volume as theirs does.
`index.json` records per case the geometry needed to map a generated volume back to the original
NIfTI: letterbox padding, nnU-Net's crop box and shapes, transpose, and the original affine.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from gem3d.io import InputError, Volume, atomic_dir, read_json, read_volume, write_json

log = logging.getLogger("gem3d.slices")

OUTSIDE = -1  # nnU-Net's label for voxels outside the non-zero region
FITS = ("letterbox", "stretch")  # how a slice becomes square (preprocess.slice_fit)
INTENSITIES = ("region", "volume")  # what the min-max to [-1, 1] runs over (preprocess.intensity)
CT_AIR_HU = -500.0  # a CT body outline holds the voxels above this (air -1000 HU, lung about -850, fat -100)


@dataclass(frozen=True)
class StoreCase:
    case_id: str
    image: np.ndarray  # (d, s, s) float32 in [-1, 1] (float16 when memory-mapped)
    label: np.ndarray  # (d, s, s) int8, -1 outside the non-zero region
    label_native: np.ndarray  # (d, y, x) int8 at nnU-Net's resolution
    geometry: dict


def mask_to_grey(label: np.ndarray | torch.Tensor, max_label: int):
    """Mask -> grey image for the VAE: label / max_label * 2 - 1; label -1 -> -1 - 2 / max_label."""
    return label * (2.0 / max_label) - 1.0


def intensity_range(data: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    inside = data[region]
    return (0.0, 1.0) if inside.size == 0 else (float(inside.min()), float(inside.max()))


def scale_intensities(data: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Min-max over `region` to [-1, 1]; -1 outside it."""
    lo, hi = intensity_range(data, region)
    scaled = (data - lo) / max(hi - lo, 1e-8) * 2.0 - 1.0
    return np.where(region, scaled, -1.0).astype(np.float32)


def output_intensities(image: np.ndarray, region: np.ndarray, geometry: dict, normalization: dict) -> tuple[np.ndarray, float]:
    """Generated (d, y, x) values in [-1, 1] -> intensities for the output NIfTI, and the fill value outside.

    CT (nnU-Net's CTNormalization, global statistics): back to Hounsfield units through the case's
    min-max range and the dataset's mean/std, so a network trained on generated images sees the same
    intensities as on real ones. Other modalities (nnU-Net z-scores each case, so any positive
    affine scale is equivalent): (x + 1) / 2 mapped into (0, 1] inside the non-zero region and
    exactly 0 outside it, matching the zero background that nnU-Net crops away.
    """
    lo, hi = geometry["intensity_range"]
    if normalization.get("scheme") == "CTNormalization":
        props = normalization["properties"]
        hu = ((image + 1) / 2 * (hi - lo) + lo) * props["std"] + props["mean"]
        floor = float(props["percentile_00_5"])
        return np.where(region, hu, floor).astype(np.float32), floor
    inside = (image + 1) / 2 * (1 - 1e-3) + 1e-3
    return np.where(region, inside, 0.0).astype(np.float32), 0.0


def letterbox_pad(h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that makes an h x w slice square."""
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return top, side - h - top, left, side - w - left


def to_slices(volume: np.ndarray, size: int, is_label: bool, fit: str = "letterbox") -> np.ndarray:
    """(d, y, x) -> (d, size, size): letterbox to a square with -1 (or, `fit` "stretch", nothing), then resize
    each slice."""
    d, h, w = volume.shape
    top, bottom, left, right = letterbox_pad(h, w) if fit == "letterbox" else (0, 0, 0, 0)
    padded = np.pad(volume, ((0, 0), (top, bottom), (left, right)), constant_values=-1)
    x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[:, None]  # (d, 1, side, side)
    if is_label:
        out = F.interpolate(x, size=(size, size), mode="nearest-exact")
        return out[:, 0].numpy().astype(np.int8)
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0].numpy().clip(-1, 1).astype(np.float32)


def from_slices(slices: np.ndarray, geometry: dict, is_label: bool) -> np.ndarray:
    """(d, s, s) -> (d, y, x) at nnU-Net's preprocessed resolution (inverse of `to_slices`)."""
    d, h, w = geometry["preprocessed_shape"]
    top, bottom, left, right = geometry["letterbox"]  # all 0 with slice_fit "stretch"
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
    mode = dict(mode="nearest-exact") if is_label else dict(mode="bilinear", antialias=True, align_corners=False)
    x = F.interpolate(x, size=(h + top + bottom, w + left + right), **mode)[:, 0]
    return x[:, top: top + h, left: left + w].numpy()


def to_original(native: np.ndarray, geometry: dict, is_label: bool, fill: float) -> Volume:
    """(d, y, x) at nnU-Net's resolution -> a Volume in the original NIfTI's grid and affine.

    Undo nnU-Net's steps in reverse: resample to the cropped shape, paste into the crop box of the
    pre-crop shape, transpose back, and reverse the axis order (SimpleITK's (z, y, x) -> nibabel's (x, y, z)).
    """
    cropped_shape = tuple(geometry["shape_after_cropping"])
    x = torch.from_numpy(np.ascontiguousarray(native, dtype=np.float32))[None, None]
    if tuple(native.shape) != cropped_shape:
        mode = "nearest-exact" if is_label else "trilinear"
        kwargs = {} if is_label else {"align_corners": False}
        x = F.interpolate(x, size=cropped_shape, mode=mode, **kwargs)
    cropped = x[0, 0].numpy()
    full = np.full(geometry["shape_before_cropping"], fill, dtype=np.float32)
    box = tuple(slice(lo, hi) for lo, hi in geometry["bbox"])
    full[box] = cropped
    full = full.transpose(geometry["transpose_backward"])
    array = full.transpose(2, 1, 0)
    return Volume(array.astype(np.int16 if is_label else np.float32), np.asarray(geometry["affine"]))


def ct_body(hu: np.ndarray) -> np.ndarray:
    """The body outline of a CT volume (slices along axis 0, Hounsfield units): the voxels above CT_AIR_HU, the
    largest connected component of them (not the table or blankets), its holes filled slice by slice (lungs,
    bowel gas)."""
    above = hu > CT_AIR_HU
    components, n = ndimage.label(above)
    if n == 0:
        return above
    body = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def ct_body_native(raw_image: Path, geometry: dict) -> np.ndarray:
    """`ct_body` of a raw CT image (Hounsfield units) on the grid of nnU-Net's preprocessed arrays (d, y, x): the
    image read (x, y, z) -> SimpleITK's (z, y, x) -> nnU-Net's transpose -> its crop box -> its shape."""
    hu = read_volume(raw_image).array.astype(np.float32).transpose(2, 1, 0)
    hu = hu.transpose(np.argsort(geometry["transpose_backward"]))  # transpose_forward
    hu = hu[tuple(slice(lo, hi) for lo, hi in geometry["bbox"])]
    x = torch.from_numpy(np.ascontiguousarray(hu))[None, None]
    x = F.interpolate(x, size=tuple(geometry["preprocessed_shape"]), mode="trilinear", align_corners=False)
    return ct_body(x[0, 0].numpy())


def case_geometry(properties: dict, preprocessed_shape: tuple, transpose_backward: list, raw_image: Path,
                  spacing: list, fit: str = "letterbox") -> dict:
    """What maps a case's preprocessed arrays back to its NIfTI. `spacing`: the voxel size of the
    preprocessed arrays (the plans' target spacing, in the arrays' axis order); nnU-Net's
    properties["spacing"] is the original one, in the original axis order. `fit`: how its slices were made
    square (the letterbox padding is 0 when stretched)."""
    original = read_volume(raw_image)
    h, w = int(preprocessed_shape[1]), int(preprocessed_shape[2])
    return {
        "preprocessed_shape": [int(v) for v in preprocessed_shape],
        "fit": fit,
        "letterbox": list(letterbox_pad(h, w)) if fit == "letterbox" else [0, 0, 0, 0],
        "bbox": [[int(a), int(b)] for a, b in properties["bbox_used_for_cropping"]],
        "shape_before_cropping": [int(v) for v in properties["shape_before_cropping"]],
        "shape_after_cropping": [int(v) for v in properties["shape_after_cropping_and_before_resampling"]],
        "spacing_preprocessed": [float(v) for v in spacing],
        "transpose_backward": [int(v) for v in transpose_backward],
        "affine": original.affine.tolist(),
        "original_shape": list(original.shape),
        "original_spacing": list(original.spacing),
        "raw_image": str(raw_image),
    }


def build_slice_store(preprocessed_dataset: Path, raw_dataset: Path, out_dir: Path, slice_size: int,
                      labels: dict[str, int], split: dict, configuration: str = "3d_fullres", fit: str = "letterbox",
                      intensity: str = "region") -> dict:
    """Write `out_dir/<case>_{image,label,label_native}.npy` for every preprocessed case and `out_dir/index.json`.
    `fit` (letterbox | stretch) and `intensity` (region | volume): preprocess.slice_fit and preprocess.intensity."""
    from gem3d.data.nnunet import load_preprocessed_case, preprocessed_cases

    plans = read_json(Path(preprocessed_dataset) / "nnUNetPlans.json")
    folder = Path(preprocessed_dataset) / plans["configurations"][configuration]["data_identifier"]
    cases = preprocessed_cases(folder)
    if not cases:
        raise InputError(f"{folder}: no preprocessed cases")
    index = {"slice_size": slice_size, "slice_fit": fit, "intensity": intensity, "labels": labels,
             "max_label": max(labels.values()), "split": split, "configuration": configuration, "cases": {},
             "normalization": {"scheme": plans["configurations"][configuration]["normalization_schemes"][0],
                               "properties": plans["foreground_intensity_properties_per_channel"]["0"]}}
    with atomic_dir(out_dir) as tmp:
        for i, case_id in enumerate(cases):
            data, seg, props = load_preprocessed_case(folder, case_id)
            data = np.asarray(data[0][:], dtype=np.float32)  # (z, y, x)
            seg = np.asarray(seg[0][:]).astype(np.int8)
            region = seg != OUTSIDE if intensity == "region" else np.ones_like(seg, bool)
            image = scale_intensities(data, region)
            geometry = case_geometry(props, data.shape, plans["transpose_backward"],
                                     Path(raw_dataset) / "imagesTr" / f"{case_id}_0000.nii.gz",
                                     plans["configurations"][configuration]["spacing"], fit)
            geometry["intensity_range"] = list(intensity_range(data, region))
            arrays = {"image": to_slices(image, slice_size, False, fit).astype(np.float16),
                      "label": to_slices(seg, slice_size, True, fit), "label_native": seg}
            digest = hashlib.sha256()
            for key, arr in arrays.items():
                np.save(tmp / f"{case_id}_{key}.npy", arr)
                digest.update(np.ascontiguousarray(arr).tobytes())
            geometry["digest"] = digest.hexdigest()[:16]  # content of the case's arrays (training fingerprints)
            if index["normalization"]["scheme"] == "CTNormalization":  # read by sampling's fit guard only
                np.save(tmp / f"{case_id}_body.npy", ct_body_native(Path(geometry["raw_image"]), geometry))
            index["cases"][case_id] = geometry
            log.info("slice store %d/%d %s: %s -> %d x %d x %d", i + 1, len(cases), case_id, data.shape,
                     data.shape[0], slice_size, slice_size)
        write_json(tmp / "index.json", index)
    return index


class SliceStore:
    """Read access to a slice store folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index = read_json(self.root / "index.json")

    @property
    def slice_size(self) -> int:
        return int(self.index["slice_size"])

    @property
    def slice_fit(self) -> str:
        return str(self.index.get("slice_fit", "letterbox"))

    @property
    def intensity(self) -> str:
        return str(self.index.get("intensity", "region"))

    @property
    def max_label(self) -> int:
        return int(self.index["max_label"])

    @property
    def split(self) -> dict:
        return self.index["split"]

    def case_ids(self, part: str | None = None) -> list[str]:
        """All cases, or those of the split part "train" / "test"."""
        ids = sorted(self.index["cases"])
        return ids if part is None else [c for c in ids if c in set(self.split[part])]

    def load(self, case_id: str, mmap: bool = False) -> StoreCase:
        """One case; `mmap=True` maps the arrays from disk (training reads slices at random)."""
        if case_id not in self.index["cases"]:
            raise InputError(f"{self.root}: case {case_id} is not in the slice store")
        mode = "r" if mmap else None
        arrays = []
        for key in ("image", "label", "label_native"):
            file = self.root / f"{case_id}_{key}.npy"
            try:
                arrays.append(np.load(file, mmap_mode=mode))
            except FileNotFoundError:
                raise InputError(f"{file}: missing from the slice store (rebuild it: gem3d slices)") from None
            except (ValueError, OSError, EOFError) as exc:
                raise InputError(f"{file}: unreadable slice-store array ({str(exc).splitlines()[0][:120]}); "
                                 "rebuild the store: gem3d slices") from None
        image = arrays[0] if mmap else arrays[0].astype(np.float32)
        return StoreCase(case_id, image, arrays[1], arrays[2], self.index["cases"][case_id])

    @property
    def is_ct(self) -> bool:
        """CT (nnU-Net's CTNormalization): the body outline is stored, not nnU-Net's non-zero region."""
        return (self.index.get("normalization") or {}).get("scheme") == "CTNormalization"

    def body_native(self, case_id: str, mmap: bool = False) -> np.ndarray:
        """(d, y, x) bool body outline at nnU-Net's resolution: CT: the stored `ct_body` (`mmap`: mapped from disk,
        its values as stored); otherwise nnU-Net's non-zero region (label != OUTSIDE)."""
        if not self.is_ct:
            return self.load(case_id, mmap=True).label_native != OUTSIDE
        file = self.root / f"{case_id}_body.npy"
        try:
            return np.load(file, mmap_mode="r") if mmap else np.load(file).astype(bool)
        except FileNotFoundError:
            raise InputError(f"{file}: missing from the CT slice store (built before body outlines were stored; "
                             "rebuild it: gem3d slices)") from None
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{file}: unreadable slice-store array ({str(exc).splitlines()[0][:120]}); "
                             "rebuild the store: gem3d slices") from None

    def body(self, case_id: str) -> np.ndarray:
        """(d, s, s) bool body outline in slice space (`body_native` letterboxed and resized as the labels)."""
        if not self.is_ct:
            return np.asarray(self.load(case_id, mmap=True).label) != OUTSIDE
        return body_slices(self.body_native(case_id), self.slice_size, self.slice_fit)

    def body_slice(self, case_id: str, index: int) -> np.ndarray:
        """(s, s) bool: `body(case_id)[index]`, reading that slice only (each slice is squared on its own)."""
        if not self.is_ct:
            return np.asarray(self.load(case_id, mmap=True).label[index]) != OUTSIDE
        native = np.asarray(self.body_native(case_id, mmap=True)[index:index + 1], dtype=bool)
        return body_slices(native, self.slice_size, self.slice_fit)[0]


def body_slices(native: np.ndarray, size: int, fit: str) -> np.ndarray:
    """A (d, y, x) bool outline at nnU-Net's resolution in slice space (d, size, size), as `to_slices` takes a mask
    (`fit`: the store's slice_fit, as its labels were made)."""
    return to_slices(native.astype(np.int8), size, is_label=True, fit=fit) == 1
