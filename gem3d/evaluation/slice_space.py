"""Any NIfTI volume -> Table 1's slice space, without a dataset's nnU-Net plans (`gem3d score`).

Table 1 scores volumes in the slice store's space (gem3d.data.slice_store): nnU-Net's 3d_fullres
preprocessing (transpose, crop to the non-zero region, normalisation, resampling to the target
spacing), then min-max over the non-zero region to [-1, 1] with -1 outside, axial slices
letterboxed to a square and resized to s x s, kept as float16. Here the same steps run on a folder
of NIfTI files, with nnU-Net's own functions where nnU-Net does the work and the slice store's for
the rest; what nnU-Net's planner would decide from the dataset is decided from the REAL folder by
the planner's rules (`SliceSpace.from_real`):

1. read (x, y, z) as nibabel does; arrays in nnU-Net's (z, y, x) order, spacing from the affine;
2. transpose: the axis of the coarsest target spacing first (nnU-Net's ``determine_transpose``);
3. non-zero region: voxels != 0, holes filled (nnU-Net's ``create_nonzero_mask``); crop to its
   bounding box;
4. intensities: nnU-Net z-scores MRI (an affine map, which the min-max of step 6 undoes) over the
   region when cropping shrank the median volume below 3/4 (its ``use_mask_for_norm``), leaving
   the voxels outside the region at the region's mean; over the whole crop otherwise. With
   ``clip`` (CT), values are clipped to [lo, hi] first, as nnU-Net's CTNormalization clips to the
   dataset's 0.5 / 99.5 foreground percentiles (which need masks, so they are given here);
5. resample to the target spacing with nnU-Net's 3d_fullres functions (image: 3rd-order spline,
   nearest along a separate anisotropic axis; region: linear on the -1/0 mask);
6. min-max over the region to [-1, 1], -1 outside (slice_store.scale_intensities); axial slices
   letterboxed to a square with -1 and resized to s x s (slice_store.to_slices); float16 and back.
   ``intensity`` "volume" and ``fit`` "stretch" do what the slice store does under
   preprocess.intensity: volume (min-max over the whole crop) and preprocess.slice_fit: stretch.

Target spacing: nnU-Net's 3d_fullres rule over the real volumes (`target_spacing`: the median
spacing; an axis much coarser than the others, with much fewer voxels, gets its 10th percentile).
``spacing=None`` ("native") skips resampling and transposition: the voxel grids as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gem3d.io import InputError, read_volume

ANISOTROPY = 3.0  # nnU-Net's ANISO_THRESHOLD
MASK_FOR_NORM_BELOW = 0.75  # nnU-Net z-scores over the region when cropping leaves less of the median volume


@dataclass(frozen=True)
class Scan:
    """A NIfTI volume's header facts and its non-zero region's bounding box (nothing kept in memory)."""

    path: Path
    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    crop_shape: tuple[int, int, int]  # (z, y, x) of the non-zero region's bounding box
    affine: tuple[tuple[float, ...], ...] | None = None  # the NIfTI's voxel-to-world matrix (pairs must share it)


def read_zyx(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D NIfTI as a float32 (z, y, x) array and its (z, y, x) spacing; InputError naming the file otherwise."""
    return zyx(read_volume(path))


def zyx(volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A gem3d.io.Volume's array in nnU-Net's (z, y, x) order and its (z, y, x) spacing."""
    return np.ascontiguousarray(volume.array.transpose(2, 1, 0)), tuple(reversed(volume.spacing))


def nonzero_region(array: np.ndarray) -> np.ndarray:
    """nnU-Net's non-zero region: voxels != 0 with holes filled."""
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    return create_nonzero_mask(array[None])


def region_box(region: np.ndarray, path: Path) -> list[list[int]]:
    """The region's bounding box ``[[lo, hi], ...]``; InputError when the volume has no non-zero voxel."""
    if not region.any():
        raise InputError(f"{path}: no non-zero voxel (an empty volume has no region to score)")
    from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask

    return [[int(lo), int(hi)] for lo, hi in get_bbox_from_mask(region)]


def survey(path: str | Path) -> Scan:
    """Read one file once: checks it (readable, 3D, finite, not empty) and notes what the protocol needs."""
    path = Path(path)
    volume = read_volume(path)
    array, spacing = zyx(volume)
    if not np.isfinite(array).all():
        raise InputError(f"{path}: NaN or infinite voxel values")
    box = region_box(nonzero_region(array), path)
    return Scan(path, tuple(int(n) for n in array.shape), spacing, tuple(hi - lo for lo, hi in box),
                tuple(tuple(float(v) for v in row) for row in volume.affine))


def target_spacing(spacings: Sequence[Sequence[float]], crop_shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """nnU-Net's 3d_fullres target spacing (ExperimentPlanner.determine_fullres_target_spacing), (z, y, x)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(np.asarray(crop_shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY * max(target[i] for i in others)
    aniso_voxels = target_size[worst] * ANISOTROPY < min(target_size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        coarse = np.percentile(spacings[:, worst], 10)
        if coarse < max(target[i] for i in others):
            coarse = max(max(target[i] for i in others), coarse) + 1e-5
        target[worst] = coarse
    return target


def transpose_forward(target: Sequence[float]) -> tuple[int, int, int]:
    """nnU-Net's transpose: the axis of the coarsest target spacing first, the others in order."""
    worst = int(np.argmax(target))
    return (worst, *[i for i in range(3) if i != worst])


@dataclass(frozen=True)
class SliceSpace:
    """How every volume of one scoring goes into slice space (see the module doc)."""

    spacing: tuple[float, float, float] | None  # target (z, y, x) mm AFTER the transpose; None: native grids
    transpose: tuple[int, int, int]  # of the (z, y, x) axes
    slice_size: int
    clip: tuple[float, float] | None = None  # clip intensities to [lo, hi] before anything else (CT)
    mask_for_norm: bool = False  # outside the region = the region's mean before resampling (nnU-Net's z-score)
    fit: str = "letterbox"  # how a slice becomes square: as preprocess.slice_fit (letterbox | stretch)
    intensity: str = "region"  # min-max over the non-zero region | the whole crop: as preprocess.intensity

    @classmethod
    def from_real(cls, real: Sequence[Scan], spacing: str | Sequence[float] = "median", slice_size: int | None = None,
                  clip: Sequence[float] | None = None, fit: str = "letterbox", intensity: str = "region") -> SliceSpace:
        """The protocol for scoring against the ``real`` volumes: ``spacing`` "median" (nnU-Net's rule over them),
        "native" (no resampling) or (x, y, z) mm in NIfTI axis order; ``slice_size`` None: the median over the
        real volumes of the longer in-plane side of their non-zero region at the target spacing; ``fit`` and
        ``intensity`` as the slice store's preprocess.slice_fit and preprocess.intensity."""
        from gem3d.data.slice_store import FITS, INTENSITIES

        if not real:
            raise InputError("no real volumes to derive the slice space from")
        if fit not in FITS:
            raise InputError(f"slice fit {fit!r} is not one of {', '.join(FITS)}")
        if intensity not in INTENSITIES:
            raise InputError(f"intensity {intensity!r} is not one of {', '.join(INTENSITIES)}")
        if spacing == "native":
            target, transpose = None, (0, 1, 2)
        else:
            if spacing == "median":
                zyx = target_spacing([s.spacing for s in real], [s.crop_shape for s in real])
            else:
                zyx = np.asarray(list(spacing), dtype=np.float64)[::-1]
                if zyx.shape != (3,) or not (np.isfinite(zyx).all() and (zyx > 0).all()):
                    raise InputError(f"spacing {list(spacing)} must be three positive numbers (x, y, z in mm)")
            transpose = transpose_forward(zyx)
            target = tuple(float(zyx[i]) for i in transpose)
        if slice_size is None:
            sides = [max(resampled_shape(s, transpose, target)[1:]) for s in real]
            slice_size = int(np.median(sides))
        if slice_size < 2:
            raise InputError(f"slice size {slice_size} is too small (at least 2 px)")
        if clip is not None:
            lo, hi = (float(v) for v in clip)
            if not (np.isfinite([lo, hi]).all() and lo < hi):
                raise InputError(f"clip [{lo}, {hi}] must be two finite numbers, low < high")
            clip = (lo, hi)
        relative = [np.prod(s.crop_shape) / np.prod(s.shape) for s in real]
        mask_for_norm = clip is None and float(np.median(relative)) < MASK_FOR_NORM_BELOW
        return cls(target, transpose, int(slice_size), clip, mask_for_norm, fit, intensity)

    def describe(self) -> dict:
        """The protocol's settings, for score.json (spacing back in NIfTI (x, y, z) order)."""
        axes = "zyx"
        return {
            "axis_order": "nnU-Net's (z, y, x) = the NIfTI's (x, y, z) reversed, then transposed: "
                          + "".join(axes[i] for i in self.transpose) + " (axis 0 = the axial slices)",
            "target_spacing_xyz_mm": None if self.spacing is None else [
                self.spacing[self.transpose.index(i)] for i in (2, 1, 0)],
            "resampling": "none (native voxel grids)" if self.spacing is None else
                          "nnU-Net 3d_fullres: image 3rd-order spline (nearest along a separate anisotropic axis), "
                          "region linear",
            "slice_size": self.slice_size,
            "clip": None if self.clip is None else list(self.clip),
            "normalisation_region": "non-zero region (outside = region mean before resampling)" if self.mask_for_norm
                                    else "whole crop",
            "intensity": ("min-max over the non-zero region to [-1, 1], -1 outside" if self.intensity == "region" else
                          "min-max over the whole crop to [-1, 1]") + "; float16",
            "slice_fit": "letterboxed to a square with -1 (aspect ratio kept)" if self.fit == "letterbox" else
                         "stretched to a square",
        }


def resampled_shape(scan: Scan, transpose: Sequence[int], target: Sequence[float] | None) -> tuple[int, ...]:
    """The (transposed) shape of a scan's cropped region at the target spacing (nnU-Net's compute_new_shape)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    shape = [scan.crop_shape[i] for i in transpose]
    if target is None:
        return tuple(shape)
    return tuple(int(n) for n in compute_new_shape(shape, [scan.spacing[i] for i in transpose], target))


def to_slice_space(array: np.ndarray, spacing: Sequence[float], space: SliceSpace, path: Path,
                   box: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """A (z, y, x) volume -> (image (d, s, s) float32 in [-1, 1], label (d, s, s) int8: 0 in the region, -1
    outside, the crop box used). ``box``: crop to this box (of the transposed axes) instead of the volume's own
    region's (a synthetic volume on its real partner's grid)."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    from gem3d.data.slice_store import OUTSIDE, scale_intensities, to_slices

    data = np.ascontiguousarray(array.transpose(space.transpose), dtype=np.float32)  # (d h w)
    spacing = [float(spacing[i]) for i in space.transpose]
    region = nonzero_region(data)
    if box is None:
        box = region_box(region, path)
    crop = tuple(slice(lo, hi) for lo, hi in box)
    data, region = data[crop].copy(), region[crop]
    if space.clip is not None:
        np.clip(data, *space.clip, out=data)
    elif space.mask_for_norm and region.any():
        data[~region] = data[region].mean()
    seg = np.where(region, np.int8(0), np.int8(OUTSIDE))
    if space.spacing is not None:
        new_shape = resampled_shape(Scan(path, data.shape, tuple(spacing), data.shape), (0, 1, 2), space.spacing)
        kwargs = dict(current_spacing=spacing, new_spacing=space.spacing, order_z=0, force_separate_z=None)
        data = resample_data_or_seg_to_shape(data[None], new_shape, is_seg=False, order=3, **kwargs)[0]
        seg = resample_data_or_seg_to_shape(seg[None], new_shape, is_seg=True, order=1, **kwargs)[0]
    region = seg != OUTSIDE
    scaled = scale_intensities(data, region if space.intensity == "region" else np.ones_like(region))
    image = to_slices(scaled, space.slice_size, False, space.fit)
    label = to_slices(np.where(region, 0, OUTSIDE), space.slice_size, True, space.fit)
    return image.astype(np.float16).astype(np.float32), label, box
