"""FID per plane (FID-A / FID-C / FID-S) from 2D slices of 3D volumes.

Volumes are ``(d, h, w)`` arrays in [-1, 1] in the slice store's orientation (nnU-Net's
``(z, y, x)`` after ``transpose_forward``): axis 0 is the axial slice axis, so

    axial    = volume[i, :, :]   (h x w)
    coronal  = volume[:, j, :]   (d x w)
    sagittal = volume[:, :, k]   (d x h)

Empty slices are dropped by default: a slice is empty when it is constant (max - min <= 1e-6, e.g.
pure background) or, when a mask of the volume's shape is given, when the mask has no non-zero
voxel in that slice. Slices of different shapes (coronal/sagittal of anisotropic volumes, or
volumes of different geometry) are letterboxed to a square with the background value -1 (aspect
ratio kept, nothing stretched) and then resized by the extractor to its input size; ``size`` /
``slice_size`` resize them to one explicit common size first.

The Fréchet distance is computed here in float64 from the features' mean and unbiased covariance:
``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`` (equal to the usual
``tr sqrtm(S1 S2)``), with symmetric eigendecompositions, negative round-off eigenvalues clipped to
0. The test suite checks it against scipy's sqrtm formula and torchmetrics'
``FrechetInceptionDistance(feature=extractor)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from gem3d.io import InputError

log = logging.getLogger("gem3d.evaluation.fid")

PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
EMPTY_RANGE = 1e-6


def _size_tuple(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


def letterbox(slices: torch.Tensor, size: int | Sequence[int] | None = None, pad_value: float = -1.0) -> torch.Tensor:
    """Pad ``(n c h w)`` slices to the aspect ratio of ``size`` (square when None), then resize to it."""
    target = _size_tuple(size)
    h, w = slices.shape[-2:]
    if target is None:
        th = tw = max(h, w)
    else:
        # smallest padded (ph, pw) >= (h, w) with ph / pw == target ratio
        scale = max(h / target[0], w / target[1])
        th, tw = max(h, round(target[0] * scale)), max(w, round(target[1] * scale))
    top, left = (th - h) // 2, (tw - w) // 2
    if (th, tw) != (h, w):
        slices = F.pad(slices, (left, tw - w - left, top, th - h - top), value=pad_value)  # (n c th tw)
    if target is not None and (th, tw) != target:
        shrink = th > target[0] or tw > target[1]
        slices = F.interpolate(slices, size=target, mode="bilinear", align_corners=False, antialias=shrink)
    return slices


def plane_slices(
    volume: np.ndarray,
    plane: str,
    drop_empty: bool = True,
    mask: np.ndarray | None = None,
    size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Slices ``(N, 1, H, W)`` float32 of a ``(d, h, w)`` volume along ``plane``.

    ``size=None`` keeps the native slice shape; otherwise slices are letterboxed (pad value -1)
    and resized to ``size``. Empty slices (see module doc) are dropped when ``drop_empty``.
    """
    if plane not in _PLANE_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"volume must be 3D (d, h, w), got shape {volume.shape}")
    if mask is not None and np.shape(mask) != volume.shape:
        raise InputError(f"mask shape {np.shape(mask)} differs from volume shape {volume.shape}")
    axis = _PLANE_AXIS[plane]
    slices = np.moveaxis(volume, axis, 0).astype(np.float32, copy=False)  # (n a b)
    if drop_empty:
        flat = slices.reshape(len(slices), -1)
        keep = (flat.max(axis=1) - flat.min(axis=1)) > EMPTY_RANGE
        if mask is not None:
            keep &= np.moveaxis(np.asarray(mask) != 0, axis, 0).reshape(len(slices), -1).any(axis=1)
        slices = slices[keep]
    out = np.ascontiguousarray(slices[:, None])  # (n 1 a b)
    if size is not None and len(out):
        out = letterbox(torch.from_numpy(out), size).numpy()
    return out


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(slices: np.ndarray | torch.Tensor, extractor: nn.Module, batch_size: int = 32) -> np.ndarray:
    """Run ``extractor`` on ``(N, 1, H, W)`` slices in batches; return ``(N, D)`` float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = torch.as_tensor(slices)
    device = _device_of(extractor)
    feats = [
        extractor(x[i : i + batch_size].to(device, torch.float32)).double().cpu() for i in range(0, len(x), batch_size)
    ]
    if not feats:
        return np.zeros((0, int(getattr(extractor, "num_features", 0))), dtype=np.float64)
    return torch.cat(feats).numpy()


def volume_plane_features(
    volumes: Iterable[np.ndarray],
    extractor: nn.Module,
    plane: str,
    batch_size: int = 32,
    masks: Iterable[np.ndarray | None] | None = None,
    drop_empty: bool = True,
    slice_size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Features of all (non-empty) ``plane`` slices of all volumes, streamed volume by volume."""
    volumes = list(volumes) if not isinstance(volumes, (list, tuple)) else volumes
    masks = [None] * len(volumes) if masks is None else list(masks)
    if len(masks) != len(volumes):
        raise InputError(f"{len(masks)} masks for {len(volumes)} volumes")
    extractor.eval()
    out = []
    for volume, mask in zip(volumes, masks):
        slices = plane_slices(volume, plane, drop_empty=drop_empty, mask=mask)
        if len(slices) == 0:
            continue
        out.append(extract_features(letterbox(torch.from_numpy(slices), slice_size), extractor, batch_size))
    if not out:
        return np.zeros((0, int(getattr(extractor, "num_features", 0))), dtype=np.float64)
    return np.concatenate(out)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of ``(N, D)`` features, N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    mu = f.mean(axis=0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    w1, v1 = scipy.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T  # S1^1/2
    inner = root1 @ sigma2 @ root1
    w = scipy.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    if len(real) < 2 or len(generated) < 2:
        raise InputError(f"FID needs >= 2 slices per set, got {len(real)} real and {len(generated)} generated")
    return frechet_distance(*feature_statistics(real), *feature_statistics(generated))


@dataclass(frozen=True)
class PlaneFID:
    plane: str
    fid: float
    n_real: int
    n_generated: int


def fid_per_plane_detailed(
    real_volumes: Sequence[np.ndarray],
    generated_volumes: Sequence[np.ndarray],
    extractor: nn.Module,
    batch_size: int = 32,
    planes: Sequence[str] = PLANES,
    real_masks: Sequence[np.ndarray | None] | None = None,
    generated_masks: Sequence[np.ndarray | None] | None = None,
    drop_empty: bool = True,
    slice_size: int | Sequence[int] | None = None,
) -> dict[str, PlaneFID]:
    """FID per plane with the slice counts behind each number."""
    for plane in planes:
        if plane not in _PLANE_AXIS:
            raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    result = {}
    for plane in planes:
        feats = {}
        for label, vols, masks in (("real", real_volumes, real_masks), ("generated", generated_volumes, generated_masks)):
            f = volume_plane_features(vols, extractor, plane, batch_size, masks, drop_empty, slice_size)
            if len(f) == 0:
                raise InputError(f"no slices in {label} set ({plane} plane: {len(vols)} volumes, all slices empty)")
            feats[label] = f
        fid = fid_from_features(feats["real"], feats["generated"])
        log.info("FID-%s = %.4f (%d real, %d generated slices)", plane, fid, len(feats["real"]), len(feats["generated"]))
        result[plane] = PlaneFID(plane, fid, len(feats["real"]), len(feats["generated"]))
    return result


def fid_per_plane(
    real_volumes: Sequence[np.ndarray],
    generated_volumes: Sequence[np.ndarray],
    extractor: nn.Module,
    batch_size: int = 32,
    planes: Sequence[str] = PLANES,
    **kwargs,
) -> dict[str, float]:
    """``{plane: FID}`` between the slices of real and generated volumes (see ``fid_per_plane_detailed``)."""
    detailed = fid_per_plane_detailed(real_volumes, generated_volumes, extractor, batch_size, planes, **kwargs)
    return {plane: item.fid for plane, item in detailed.items()}
