"""Memorisation check: is a generated volume (nearly) a copy of a training volume?

Every volume ``(d, h, w)`` is resampled (trilinear, ``align_corners=False``) to the common grid
``resize_to`` (default 32 x 64 x 64), so volumes of any geometry compare. Two measures:

* ``pearson``: Pearson correlation of the resampled voxel values (insensitive to global
  intensity shift/scale); the nearest training volume is the one with the HIGHEST correlation.
* ``mse``: mean squared difference of the resampled volumes (intensity units of the inputs, [-1, 1]
  expected) to that same Pearson-nearest training volume; ``nearest_training_mse`` / ``min_mse``
  give the MSE-nearest training volume separately.

A constant volume has undefined correlation: its Pearson values are NaN.

``training_nn_baseline`` gives, for every training volume, the same measures to its nearest OTHER
training volume: how similar distinct real subjects are to each other. ``flag_near_copies`` flags a
generated volume when its Pearson correlation to its nearest training volume is ABOVE the
``quantile`` of the training nearest-neighbour correlations (default 0.95; ``quantile=1.0`` uses
the maximum, the strictest "more similar than any two real subjects" rule). With the 0.95 rule,
about 5% of new real subjects would be flagged too: read flags as candidates to inspect.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gem3d.io import InputError


def resample_volumes(volumes: Sequence[np.ndarray], resize_to: Sequence[int] = (32, 64, 64)) -> np.ndarray:
    """``(n, prod(resize_to))`` float64 rows: each volume resampled trilinearly to ``resize_to``."""
    size = tuple(int(s) for s in resize_to)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"resize_to must be 3 positive sizes, got {resize_to}")
    rows = []
    for i, vol in enumerate(volumes):
        vol = np.asarray(vol, dtype=np.float32)
        if vol.ndim != 3:
            raise InputError(f"volume {i} must be 3D (d, h, w), got shape {vol.shape}")
        x = torch.from_numpy(np.ascontiguousarray(vol))[None, None]  # (1 1 d h w)
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)  # (1 1 D H W)
        rows.append(x.reshape(-1).double().numpy())
    if not rows:
        return np.zeros((0, int(np.prod(size))))
    return np.stack(rows)


def _standardise(rows: np.ndarray) -> np.ndarray:
    centred = rows - rows.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, centred / np.where(norm > 0, norm, 1.0), np.nan)


def similarity_matrices(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson ``(len(a), len(b))`` and MSE ``(len(a), len(b))`` between resampled rows."""
    pearson = _standardise(a) @ _standardise(b).T
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    mse = np.clip(sq, 0, None) / a.shape[1]
    return pearson, mse


def _nearest_table(pearson: np.ndarray, mse: np.ndarray, index_column: str) -> pd.DataFrame:
    """Per row: the column with the highest Pearson (its Pearson and MSE), and the column of lowest MSE."""
    filled = np.where(np.isnan(pearson), -np.inf, pearson)
    idx = filled.argmax(axis=1)
    rows = np.arange(len(pearson))
    idx_mse = mse.argmin(axis=1)
    return pd.DataFrame({index_column: rows, "nearest_training": idx, "pearson": pearson[rows, idx],
                         "mse": mse[rows, idx], "nearest_training_mse": idx_mse, "min_mse": mse[rows, idx_mse]})


def nearest_training(
    generated: Sequence[np.ndarray], training: Sequence[np.ndarray], resize_to: Sequence[int] = (32, 64, 64)
) -> pd.DataFrame:
    """For each generated volume: its nearest training volume and the similarity (see module doc).

    Columns: generated_index, nearest_training, pearson, mse, nearest_training_mse, min_mse.
    """
    if len(training) == 0:
        raise InputError("no training volumes to compare against")
    if len(generated) == 0:
        raise InputError("no generated volumes to check")
    g, t = resample_volumes(generated, resize_to), resample_volumes(training, resize_to)
    pearson, mse = similarity_matrices(g, t)
    return _nearest_table(pearson, mse, "generated_index")


def training_nn_baseline(training: Sequence[np.ndarray], resize_to: Sequence[int] = (32, 64, 64)) -> pd.DataFrame:
    """For each training volume: its nearest OTHER training volume (columns as ``nearest_training``)."""
    if len(training) < 2:
        raise InputError(f"training baseline needs >= 2 training volumes, got {len(training)}")
    t = resample_volumes(training, resize_to)
    pearson, mse = similarity_matrices(t, t)
    np.fill_diagonal(pearson, np.nan)  # exclude self-matches
    np.fill_diagonal(mse, np.inf)
    return _nearest_table(pearson, mse, "training_index")


def flag_near_copies(df: pd.DataFrame, baseline: pd.DataFrame, quantile: float = 0.95) -> pd.DataFrame:
    """Copy of ``df`` with ``threshold_pearson`` and ``near_copy`` (pearson > baseline quantile)."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    values = baseline["pearson"].to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        raise InputError("training baseline has no finite Pearson values (constant training volumes?)")
    threshold = float(np.quantile(values, quantile))
    out = df.copy()
    out["threshold_pearson"] = threshold
    out["threshold_rule"] = "max" if quantile == 1.0 else f"q{quantile:g} of training NN pearson"
    out["near_copy"] = out["pearson"].to_numpy(dtype=np.float64) > threshold
    return out
