"""Counterfactual synthesis: an edited mask + a chosen informed slice -> a new volume (paper Fig. 3).

The edited mask must lie on the grid of one of the dataset's cases (same shape and affine as
that case's image; e.g. a mask edited in ITK-SNAP on top of the case). It is brought into the
slice store's space with that case's geometry (the inverse of the mapping back), generated, and
the image is written in the mask's own geometry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gem3d.config import Config
from gem3d.data.slice_store import OUTSIDE, SliceStore, from_slices, output_intensities, to_original, to_slices
from gem3d.io import InputError, Volume, atomic_path, read_volume, write_json, write_volume
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeJob, VolumeSampler, stable_seed
from gem3d.sampling.informed import InformedSpec, check_slice, parse_case_slice, parse_slice_index, user_slice

log = logging.getLogger("gem3d.sampling")


def from_original(array: np.ndarray, geometry: dict) -> np.ndarray:
    """(x, y, z) labels in a case's original grid -> (d, y, x) at nnU-Net's resolution (nearest)."""
    zyx = array.transpose(2, 1, 0)
    forward = np.argsort(geometry["transpose_backward"])  # transpose_forward
    moved = zyx.transpose(forward)
    box = tuple(slice(lo, hi) for lo, hi in geometry["bbox"])
    cropped = moved[box]
    shape = tuple(geometry["preprocessed_shape"])
    if cropped.shape != shape:
        x = torch.from_numpy(np.ascontiguousarray(cropped, dtype=np.float32))[None, None]
        cropped = F.interpolate(x, size=shape, mode="nearest-exact")[0, 0].numpy()
    return cropped.astype(np.int16)


def matching_case(store: SliceStore, mask: Volume, tol: float = 1e-3) -> str:
    for case_id, geometry in store.index["cases"].items():
        if list(mask.shape) == geometry["original_shape"] and np.abs(mask.affine - np.asarray(geometry["affine"])).max() < tol:
            return case_id
    raise InputError("edited mask: its shape and affine match no case of the dataset "
                     f"(shape {mask.shape}); draw it on a case's grid (e.g. edit that case's label file)")


def check_out(out: Path) -> Path:
    """The output NIfTI's path is usable (checked before any work); returns its JSON sidecar's path."""
    name = out.name
    stem = next((name[: -len(ext)] for ext in (".nii.gz", ".nii") if name.endswith(ext)), "")
    if out.is_dir():
        raise InputError(f"{out}: --out is an existing folder; give a file name ending in .nii.gz")
    if not stem:
        raise InputError(f"{out}: --out must be a NIfTI file name ending in .nii.gz or .nii")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{out}: --out lies under {parent}, which is a file, not a folder")
            break
    return out.with_name(stem + ".json")


def training_spacing(geometry: dict) -> tuple[float, float]:
    """The training grid's voxel size along a NIfTI slice's (y, x) axes: nnU-Net's preprocessed
    spacing, taken from the preprocessed axes the file's y and x axes were transposed to."""
    # preprocessed axis k is the (z, y, x) axis forward[k]; a NIfTI's (x, y, z) are (z, y, x) axes 2, 1, 0
    forward = [int(a) for a in np.argsort(geometry["transpose_backward"])]
    spacing = geometry["spacing_preprocessed"]
    return float(spacing[forward.index(1)]), float(spacing[forward.index(2)])


def counterfactual(cfg: Config, mask_path: Path, informed: str, out: Path, seed: int = 0,
                   start: int | None = None, informed_image: Path | None = None) -> Path:
    """Generate one volume for an edited mask; `informed` is CASE:SLICE (or a slice index with informed_image).

    Every input is checked before the networks load: the output path, the informed slice (a user
    image is read, checked and resampled to the training grid's in-plane spacing, see
    informed.user_slice), the mask's labels and grid. The volume and its JSON record are renamed
    into place together."""
    out = Path(out)
    record_path = check_out(out)
    paths = Paths(cfg)
    store = SliceStore(paths.slices)
    mask = read_volume(mask_path)
    if not np.array_equal(mask.array, np.round(mask.array)):
        raise InputError(f"{mask_path}: mask has non-integer values")
    labels = set(np.unique(mask.array).astype(int).tolist())
    allowed = set(cfg.data.labels.values())
    if labels - allowed:
        raise InputError(f"{mask_path}: labels {sorted(labels - allowed)} outside the trained set {sorted(allowed)}")
    case_id = matching_case(store, mask)
    geometry = store.index["cases"][case_id]
    if informed_image is not None:
        index = parse_slice_index(informed, informed_image)
        spec = InformedSpec("user", slice=index, path=str(informed_image))
        user_image = user_slice(informed_image, index, store.slice_size, store.index["normalization"],
                                training_spacing(geometry))
    else:
        inf_case, index = parse_case_slice(informed)
        if inf_case not in store.index["cases"]:
            raise InputError(f"informed slice {informed!r}: case {inf_case} is not in the dataset "
                             f"({store.root}/index.json)")
        check_slice(inf_case, index, store.index["cases"][inf_case]["preprocessed_shape"][0])
        spec = InformedSpec("fixed", inf_case, index)
    native = from_original(mask.array.astype(np.int16), geometry)
    native = np.where(store.load(case_id).label_native == OUTSIDE, OUTSIDE, native)  # keep the non-zero region
    label = to_slices(native, store.slice_size, is_label=True)
    sampler = VolumeSampler(cfg, "gem3d", 2)
    extra = {} if informed_image is None else {"user_latent": sampler.vae.encode(user_image)[0]}
    d = label.shape[0]
    start = d // 2 if start is None else start
    job = VolumeJob(f"counterfactual_{case_id}", case_id, label, start, spec, stable_seed(seed, mask_path.name),
                    extra=extra)
    image = sampler.generate([job])[0]
    values, fill = output_intensities(from_slices(image, geometry, is_label=False), native != OUTSIDE, geometry,
                                      store.index["normalization"])
    volume = to_original(values, geometry, False, fill)
    with atomic_path(record_path) as record_tmp, atomic_path(out) as out_tmp:  # out first, then its record
        write_volume(out_tmp, Volume(volume.array, mask.affine))
        write_json(record_tmp, {
            "mask": str(mask_path), "grid_of_case": case_id, "informed": spec.record(), "start": start,
            "seed": job.seed, "checkpoints": sampler.checkpoints})
    log.info("counterfactual for %s (grid of %s) with informed %s -> %s", mask_path, case_id, spec.record(), out)
    return out
