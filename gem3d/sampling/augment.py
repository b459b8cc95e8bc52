"""Mask augmentation (MA) for sampling: paper appendix A.

brain:   random left-right flip -> small rotation (nearest neighbour) -> tumour moved toward the volume
         centre by 20-60 voxels -> clipped to the brain region.
abdomen: rotation only (``flip_axes`` and the tumour move are ignored).

Axis order: every step works per array axis, and the translation is computed and applied in
that same axis order, so no axes are swapped (the authors' code mixed (z, h, w) and (x, y, z)
orders here, a defect of the authors' code). The pipeline passes nnU-Net's preprocessed mask
(``StoreCase.label_native``, axes (slice, y, x) after nnU-Net's transpose) with its spacing.
The only flip is left-right (array axis 2, ``LEFT_RIGHT_AXIS``): a brain is roughly mirror-symmetric
about its mid-sagittal plane, but flipping the slice axis (upside down) or front-back gives a mask that
contradicts its informed slice at the same relative depth, a pairing the model never saw in training.
In nnU-Net's preprocessed arrays, the (z, y, x) order read by SimpleITK (transposed by
``transpose_forward``, the identity for BraTS' 1 mm isotropic grid), axis 2 is the NIfTI's first
axis, left-right on BraTS (LPS); `left_right_axis` finds it from a slice-store case's geometry.
Labels use nnU-Net's convention: -1 outside the region (the non-zero crop), 0 healthy tissue /
background inside, > 0 structures. Without -1 the region is the whole volume (or `region_mask`).
Rotation angles are physical: with ``spacing`` (mm per array axis) the rotation is done in mm, so
a 2.5 degree rotation stays 2.5 degrees on an anisotropic grid (CT at 2.5 x 0.8 x 0.8 mm);
without it, in voxel units. The tumour translation is in voxels, as in the paper.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

MODES = ("brain", "abdomen")
LEFT_RIGHT_AXIS = 2  # the array axis the brain mode may flip (module docstring)


def left_right_axis(geometry: dict) -> int:
    """The array axis of a slice-store case's preprocessed arrays that runs left-right in the world.

    Preprocessed axis a is SimpleITK axis ``transpose_forward[a]``, i.e. NIfTI axis
    ``2 - transpose_forward[a]``; the NIfTI axis whose affine column points most along world x
    (left-right) is the left-right one. ``geometry``: a slice-store index entry.
    """
    columns = np.asarray(geometry["affine"], dtype=np.float64)[:3, :3]
    along_x = np.abs(columns[0]) / np.maximum(np.linalg.norm(columns, axis=0), 1e-12)
    nifti_axis = int(np.argmax(along_x))
    forward = np.argsort(np.asarray(geometry["transpose_backward"]))  # the inverse permutation
    return next(a for a in range(3) if 2 - int(forward[a]) == nifti_axis)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """R = R2 @ R1 @ R0, where Ri rotates about array axis i by angles_deg[i] (right-handed)."""
    mats = []
    for axis, angle in enumerate(angles_deg):
        a = np.deg2rad(angle)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        mats.append(m)
    return mats[2] @ mats[1] @ mats[0]


def rotate_nearest(arr: np.ndarray, angles_deg: Sequence[float], cval: float = 0,
                   spacing: Sequence[float] | None = None) -> np.ndarray:
    """Rotate a 3D array about its centre, nearest neighbour (no new values), outside = cval.

    With ``spacing`` (voxel size per array axis) the rotation is in physical space:
    input index = S^-1 R^T S (output index - centre) + centre, S = diag(spacing).
    """
    if not any(angles_deg):
        return arr.copy()
    rot = rotation_matrix(angles_deg)
    centre = (np.asarray(arr.shape, dtype=np.float64) - 1) / 2
    scale = np.diag(np.asarray(spacing, dtype=np.float64)) if spacing is not None else np.eye(3)
    inv = np.linalg.inv(scale) @ rot.T @ scale  # affine_transform maps output coordinates to input coordinates
    offset = centre - inv @ centre
    src = arr.astype(np.int32) if arr.dtype == bool else arr
    out = ndimage.affine_transform(src, inv, offset=offset, order=0, mode="constant", cval=cval)
    return out.astype(arr.dtype)


def _shift(arr: np.ndarray, shift: Sequence[int], fill: Any) -> np.ndarray:
    """Integer translation: out[p + shift] = arr[p]; voxels that leave the array are dropped."""
    out = np.full_like(arr, fill)
    src, dst = [], []
    for n, s in zip(arr.shape, shift):
        s = int(s)
        if abs(s) >= n:
            return out
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def transform_region(region: np.ndarray, params: dict, spacing: Sequence[float] | None = None) -> np.ndarray:
    """A bool region (a body outline) moved as `augment_mask` moved the mask it returned `params` for: the same
    flips, then the same rotation (nearest neighbour, outside False). The tumour move stays inside the region, so
    the region of the augmented mask is this; pass the `spacing` the mask was augmented with."""
    out = np.asarray(region, dtype=bool)
    for axis, flipped in enumerate(params["flipped"]):
        if flipped:
            out = np.flip(out, axis=axis)
    return rotate_nearest(np.ascontiguousarray(out), params["rotation_deg"], cval=0, spacing=spacing)


def tumour_shift(
    tumour: np.ndarray, distance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Integer shift moving the tumour centroid `distance` voxels toward the volume centre.

    Never overshoots: the distance is capped at the centroid's distance to the centre, and each
    axis component is rounded without passing the centre on that axis (sign kept or zero).
    Returns (shift, centroid, centre, applied_distance), all in array-axis order.
    """
    centre = (np.asarray(tumour.shape, dtype=np.float64) - 1) / 2
    centroid = np.argwhere(tumour).mean(axis=0)  # same axis order as the array: no swap
    delta = centre - centroid
    dist = float(np.linalg.norm(delta))
    if dist < 1e-9:
        return np.zeros(3, dtype=int), centroid, centre, 0.0
    step = delta / dist * min(float(distance), dist)
    shift = np.rint(step)
    limit = np.floor(np.abs(delta) + 1e-9)  # never past the centre on any axis
    shift = np.sign(delta) * np.minimum(np.abs(shift), limit)
    shift = shift.astype(int)
    return shift, centroid, centre, float(np.linalg.norm(shift))


def augment_mask(
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    mode: str = "brain",
    region_mask: np.ndarray | None = None,
    flip: bool = True,
    flip_axes: Sequence[int] = (LEFT_RIGHT_AXIS,),
    max_rotation_deg: float = 2.5,
    translate_range: tuple[float, float] = (20, 60),
    tumour_labels: Sequence[int] = (1, 2, 3),
    body_labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    seed: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Augment one 3D integer label volume; return (new_label, JSON-able params).

    - flip (brain only): each axis in `flip_axes` is flipped with probability 0.5; the only axis
      allowed is `LEFT_RIGHT_AXIS` (() = no flip), the one anatomically plausible flip.
    - rotation: uniform in +-max_rotation_deg about each axis, nearest neighbour, about the volume
      centre, in mm when `spacing` (per array axis) is given; the region (-1 outside, or
      `region_mask`) is rotated with the mask.
    - brain only: all `tumour_labels` together move as one rigid object toward the volume centre
      by a distance drawn uniformly from `translate_range` voxels (capped so it never passes the
      centre), then are clipped to the region; the old location becomes 0 (healthy tissue).
    - region: `region_mask` if given, else `label` in `body_labels` if given, else `label >= 0`.
    `seed` is only recorded in params (pass the seed `rng` was made from).
    """
    label = np.asarray(label)
    if label.ndim != 3 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label: need a 3D integer array, got {label.ndim}D {label.dtype}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    if max_rotation_deg < 0:
        raise ValueError(f"max_rotation_deg={max_rotation_deg}; must be >= 0")
    lo, hi = (float(v) for v in translate_range)
    if not 0 <= lo <= hi:
        raise ValueError(f"translate_range={tuple(translate_range)}; need 0 <= low <= high")
    flip_axes = [int(a) for a in flip_axes] if mode == "brain" else []
    if any(a != LEFT_RIGHT_AXIS for a in flip_axes):
        raise ValueError(f"flip_axes={flip_axes}; only the left-right axis {LEFT_RIGHT_AXIS} may flip (a slice-axis "
                         f"or front-back flip contradicts the informed slice)")
    if spacing is not None and (len(spacing) != 3 or min(float(v) for v in spacing) <= 0):
        raise ValueError(f"spacing={list(spacing)}; need 3 positive voxel sizes")
    if region_mask is not None:
        region_mask = np.asarray(region_mask, dtype=bool)
        if region_mask.shape != label.shape:
            raise ValueError(f"region_mask shape {region_mask.shape} != label shape {label.shape}")
    tumour_labels = [int(v) for v in tumour_labels]
    if mode == "brain":
        known = set(tumour_labels) | {0} | {int(v) for v in (body_labels or ())}
        extra = [v for v in np.unique(label).tolist() if v >= 0 and v not in known]
        if extra:
            raise ValueError(f"labels {extra} are not in tumour_labels={tumour_labels}; they would not move")

    out = label.copy()
    region = region_mask.copy() if region_mask is not None else None

    # 1. flip
    flipped = [False, False, False]
    if flip:
        for axis in flip_axes:
            if rng.random() < 0.5:
                flipped[axis] = True
                out = np.flip(out, axis=axis)
                if region is not None:
                    region = np.flip(region, axis=axis)
    out = np.ascontiguousarray(out)

    # 2. rotation (the -1 outside region rotates with the mask; new corners are outside)
    angles = [float(a) for a in rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)]
    cval = -1 if (label < 0).any() else 0
    out = rotate_nearest(out, angles, cval=cval, spacing=spacing)
    if region is not None:
        region = rotate_nearest(region, angles, cval=0, spacing=spacing)

    params: dict[str, Any] = {
        "mode": mode, "seed": seed, "flip_axes": flip_axes, "flipped": flipped,
        "rotation_deg": angles,
        "rotation_order": "R = R2 @ R1 @ R0 about array axes, " + (
            f"in mm (spacing {[float(v) for v in spacing]})" if spacing is not None else "voxel units"),
        "translation_vox": [0, 0, 0],
    }
    if mode == "abdomen":
        return out, params

    # 3. tumour translation toward the centre, clipped to the region
    if region is None:
        region = np.isin(out, list(body_labels)) if body_labels is not None else out >= 0
    tumour = np.isin(out, tumour_labels)
    drawn = float(rng.uniform(lo, hi))
    params.update({"translate_drawn_vox": drawn, "translate_applied_vox": 0.0, "tumour_voxels_clipped": 0})
    if not tumour.any():
        return out, params
    shift, centroid, centre, applied = tumour_shift(tumour, drawn)
    moved = _shift(np.where(tumour, out, 0), shift, 0)
    moved_mask = _shift(tumour, shift, False)
    out[tumour] = 0  # old location -> healthy tissue
    keep = moved_mask & region
    out[keep] = moved[keep]
    params.update({
        "translation_vox": shift.tolist(), "translate_applied_vox": applied,
        "tumour_centroid_before": centroid.tolist(), "volume_centre": centre.tolist(),
        "tumour_voxels_clipped": int(tumour.sum() - keep.sum()),
    })
    return out, params
