"""Dice and HD95 for the downstream nnU-Net evaluation (per region, e.g. BraTS WT/TC/ET).

Conventions (chosen here, stated in every table that uses them):

* ``dice``: both masks empty -> 1.0 (the BraTS challenge convention; nnU-Net's own summary reports
  NaN there instead). One empty, the other not -> 0.0.
* ``hd95`` (MONAI's ``compute_hausdorff_distance(percentile=95)``, the paper's): surfaces are the
  mask voxels removed by one binary erosion with the face-connected (6-neighbour) structure, voxels
  on the array border counting as surface; of the directed distances pred-surface -> ref-surface
  and ref-surface -> pred-surface (Euclidean, in mm with ``spacing``) each direction's 95th
  percentile (numpy linear interpolation) is taken, and the larger one returned. (medpy pools both
  directions before one percentile, which gives a smaller value when one direction has the far
  outliers.) Both empty -> 0.0. Exactly one empty -> ``EMPTY_HD95_MM`` = 373.13 mm, the BraTS
  evaluation tooling's value (the diagonal of the 240 x 240 x 155 mm BraTS volume), for every
  dataset, so a missed or a spurious structure is penalised instead of left out of the mean.
* Arrays are ``(d, h, w)`` with ``spacing`` in mm per axis in the same order.

BraTS labels after import: 1 = necrosis / non-enhancing core, 2 = edema, 3 = enhancing tumour
-> ``BRATS_REGIONS`` WT = {1, 2, 3}, TC = {1, 3}, ET = {3}. Other datasets: ``label_regions``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from gem3d.io import InputError

BRATS_REGIONS: dict[str, list[int]] = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
EMPTY_HD95_MM = 373.13  # HD95 when exactly one mask is empty (BraTS tooling: sqrt(240^2 + 240^2 + 155^2))


def label_regions(labels: Iterable[int]) -> dict[str, list[int]]:
    """One region per foreground label: ``{"label_1": [1], ...}`` (0 is background and skipped)."""
    return {f"label_{int(v)}": [int(v)] for v in sorted(set(int(x) for x in labels)) if v != 0}


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; both empty -> 1.0 (see module doc)."""
    pred, ref = _check_pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): pred-surface -> ref-surface and ref-surface -> pred-surface.

    Both masks must be non-empty. Computed in the masks' joint bounding box grown by one voxel
    (exact: every surface voxel lies inside it, and the array border keeps counting as surface).
    """
    pred, ref = _check_pair(pred, ref)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise InputError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}D mask")
    union = pred | ref
    coords = np.nonzero(union)
    box = tuple(
        slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n)) for c, n in zip(coords, pred.shape)
    )
    pred, ref = pred[box], ref[box]
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_ref[pred_surface], to_pred[ref_surface]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """The larger of the two directed 95th-percentile surface distances (mm), MONAI's HD95; both
    empty -> 0.0, exactly one empty -> ``EMPTY_HD95_MM`` (module doc)."""
    pred, ref = _check_pair(pred, ref)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return EMPTY_HD95_MM
    a, b = surface_distances(pred, ref, spacing)
    return float(max(np.percentile(a, 95), np.percentile(b, 95)))


def region_mask(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    return np.isin(np.asarray(labels), np.asarray(list(values)))


def region_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    regions: Mapping[str, Sequence[int]] = BRATS_REGIONS,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, dict[str, float]]:
    """``{region: {"dice", "hd95", "n_pred", "n_ref"}}`` for label maps (n_* are voxel counts)."""
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise InputError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}")
    out = {}
    for name, values in regions.items():
        p, r = region_mask(pred_labels, values), region_mask(ref_labels, values)
        out[name] = {"dice": dice(p, r), "hd95": hd95(p, r, spacing), "n_pred": int(p.sum()), "n_ref": int(r.sum())}
    return out
