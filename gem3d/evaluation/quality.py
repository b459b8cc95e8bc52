"""Image-quality evaluation of sample sets: FID per plane (Table 1), paired test fidelity (Table 2),
and the privacy check, streaming volume by volume (a BraTS-size set does not fit in memory).

All in the slice store's slice space: volumes ``(d, s, s)`` in [-1, 1], axis 0 axial.
"Empty" slices (FID) are those without any voxel of nnU-Net's non-zero region (label >= 0) or
constant ones; paired metrics use the axial slices holding part of the real case's non-zero region.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from gem3d.config import EvaluationConfig
from gem3d.device import compute_device
from gem3d.data.slice_store import SliceStore
from gem3d.evaluation.fid import PLANES, frechet_distance, volume_plane_features
from gem3d.evaluation.paired import paired_metrics
from gem3d.evaluation.privacy import flag_near_copies, nearest_training, resample_volumes, training_nn_baseline
from gem3d.sampling.sets import SampleSet
from gem3d.io import InputError

log = logging.getLogger("gem3d.evaluation.quality")

PRIVACY_GRID = (32, 64, 64)  # every volume is resampled to this grid before comparing (privacy.py)


# ----------------------------------------------------------------------------- FID, streamed
class RunningMoments:
    """Mean and covariance of feature rows added batch by batch (Chan et al.'s parallel update, float64)."""

    def __init__(self):
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if len(f) == 0:
            return
        mean_b = f.mean(axis=0)
        centred = f - mean_b
        self._add(len(f), mean_b, centred.T @ centred)

    def _add(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        n_new = self.n + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n_new)
        self.mean = self.mean + delta * (n_b / n_new)
        self.n = n_new

    def add(self, other: RunningMoments) -> None:
        """Add the rows behind ``other`` (its moments; ``other`` is not changed)."""
        if other.n:
            self._add(other.n, other.mean, other.m2)

    def covariance(self) -> np.ndarray:
        return self.m2 / (self.n - 1)


def volume_moments(image: np.ndarray, label: np.ndarray, extractor, batch_size: int) -> dict[str, RunningMoments]:
    """Feature moments per plane of one slice-space volume's slices that hold part of nnU-Net's non-zero region
    (``label >= 0``) and are not constant."""
    region = label >= 0  # nnU-Net's non-zero region (brain / body)
    moments = {plane: RunningMoments() for plane in PLANES}
    for plane, m in moments.items():
        m.update(volume_plane_features([image], extractor, plane, batch_size, masks=[region]))
    return moments


def check_moments(moments: dict[str, RunningMoments], what: str) -> None:
    """InputError naming ``what`` when a plane has fewer than 2 slices (no covariance)."""
    for plane, m in moments.items():
        if m.n < 2:
            raise InputError(f"{what}: FID needs >= 2 non-empty {plane} slices, got {m.n}")


def plane_moments(volumes: Iterable[tuple[np.ndarray, np.ndarray]], extractor, batch_size: int,
                  what: str) -> tuple[dict[str, RunningMoments], int]:
    """Feature moments per plane over the non-empty slices of ``(image, label)`` volumes; also the volume count."""
    moments = {plane: RunningMoments() for plane in PLANES}
    n = 0
    for image, label in volumes:
        for plane, m in volume_moments(image, label, extractor, batch_size).items():
            moments[plane].add(m)
        n += 1
        if n % 20 == 0:
            log.info("FID features of %s: %d volumes", what, n)
    check_moments(moments, what)
    return moments, n


def fid_between(real: dict[str, RunningMoments], generated: dict[str, RunningMoments]) -> dict[str, float]:
    return {plane: frechet_distance(real[plane].mean, real[plane].covariance(),
                                    generated[plane].mean, generated[plane].covariance()) for plane in PLANES}


def real_training_volumes(store: SliceStore) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    ids = store.case_ids("train")
    if not ids:
        raise InputError(f"{store.root}: the slice store has no training cases")
    for case_id in ids:
        case = store.load(case_id)
        yield case.image, case.label


def real_moments(store: SliceStore, extractor, batch_size: int) -> tuple[dict[str, RunningMoments], int]:
    """The feature moments per plane of the real training volumes, and their count."""
    return plane_moments(real_training_volumes(store), extractor, batch_size, "real training volumes")


def set_volumes(sample_set: SampleSet, slice_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for entry in sample_set.volumes:
        yield sample_set.load(entry, slice_size)


def generation_quality(store: SliceStore, sets: list[SampleSet], extractor, description: str,
                       batch_size: int) -> pd.DataFrame:
    """Table 1: FID-A/C/S of every set against the real training volumes."""
    real, n_real = real_moments(store, extractor, batch_size)
    rows = []
    for sample_set in sets:
        gen, n_gen = plane_moments(set_volumes(sample_set, store.slice_size), extractor, batch_size,
                                   f"set {sample_set.name}")
        fid = fid_between(real, gen)
        log.info("set %s: FID-A %.4f FID-C %.4f FID-S %.4f (%d volumes)", sample_set.name, fid["axial"],
                 fid["coronal"], fid["sagittal"], n_gen)
        rows.append({"set": sample_set.name, "FID-A": fid["axial"], "FID-C": fid["coronal"],
                     "FID-S": fid["sagittal"], "n_volumes": n_gen, "n_real_volumes": n_real,
                     "n_slices_axial": gen["axial"].n, "n_slices_coronal": gen["coronal"].n,
                     "n_slices_sagittal": gen["sagittal"].n, "extractor": description})
    return pd.DataFrame(rows)


def pooled_fid(store: SliceStore, sets: list[SampleSet], extractor, batch_size: int,
               real: dict[str, RunningMoments] | None = None) -> tuple[dict[str, float], int]:
    """FID-A/C/S of the volumes of several sets pooled (a set and its copies) against the real training
    volumes (``real``: their moments from `real_moments`, computed here when None), and the number of
    generated volumes: one figure from more volumes than one set holds."""
    from itertools import chain

    if real is None:
        real, _ = real_moments(store, extractor, batch_size)
    volumes = chain.from_iterable(set_volumes(s, store.slice_size) for s in sets)
    gen, n = plane_moments(volumes, extractor, batch_size, "sets " + "+".join(s.name for s in sets))
    return fid_between(real, gen), n


# ----------------------------------------------------------------------------- paired fidelity
def lpips_or_reason(ev: EvaluationConfig):
    """``(LPIPS model, description)``, or ``(None, "not computed: ...")`` when no backbone is configured.

    A configured weights file that is missing is an error (InputError naming the key), never a
    silent "not computed"; gem3d.config refuses it when the config loads already.
    """
    return lpips_model_or_reason(ev.lpips_net, ev.lpips_backbone_weights, ev.lpips_lin_weights)


def lpips_model_or_reason(net: str, backbone_weights: str | Path | None, lin_weights: str | Path | None = None,
                          keys: tuple[str, str] = ("config key evaluation.lpips_backbone_weights",
                                                   "config key evaluation.lpips_lin_weights"),
                          unset: str = "no backbone weights configured"):
    """`lpips_or_reason` from the settings themselves; ``keys`` name the backbone and linear-head settings in the
    one-line InputError (config keys, or `gem3d score`'s options), ``unset`` is the reason without a backbone."""
    from gem3d.evaluation.paired import default_lpips_lin_path, load_lpips

    if backbone_weights is None:
        return None, f"not computed: {unset}"
    backbone = Path(backbone_weights)
    lin = Path(lin_weights) if lin_weights is not None else default_lpips_lin_path(net)
    for key, path in zip(keys, (backbone, lin)):
        if not path.is_file():
            raise InputError(f"{key}: weights missing at {path}")
    model = load_lpips(net, backbone, lin, compute_device())
    return model, model.description


def fidelity_summary(per_volume: list[dict], lpips_text: str) -> dict:
    """Table 2's columns from `paired_metrics` of each volume: the means over volumes, counts, scales used."""
    df = pd.DataFrame(per_volume)
    with_lpips = df["lpips"].notna().all()
    scales = sorted(set(df["ms_ssim_scales"]))
    return {"MS-SSIM": df["ms_ssim"].mean(), "LPIPS": df["lpips"].mean() if with_lpips else lpips_text,
            "PSNR": df["psnr"].mean(), "SSIM": df["ssim"].mean(), "n": len(df),
            "n_slices": int(df["n_slices"].sum()), "MS-SSIM scales": ",".join(map(str, scales)),
            "LPIPS model": lpips_text}


def fidelity_table(store: SliceStore, sets: list[SampleSet], lpips, lpips_text: str) -> pd.DataFrame:
    """Table 2: per set, the mean over volumes of MS-SSIM, SSIM, PSNR (and LPIPS) vs the real test case."""
    test_ids = set(store.case_ids("test"))
    rows = []
    for sample_set in sets:
        per_volume = []
        for entry in sample_set.volumes:
            case_id = entry["source_case"]
            if case_id not in test_ids:
                raise InputError(f"{sample_set.root / 'manifest.json'}: sample {entry['sample_id']} of set "
                                 f"{sample_set.name} comes from {case_id}, which is not a test case of the slice store")
            fake, _ = sample_set.load(entry, store.slice_size)
            real = store.load(case_id)
            if fake.shape != real.image.shape:
                raise InputError(f"{sample_set.slices_path(entry)}: generated volume {fake.shape} is not aligned "
                                 f"with real test case {case_id} {real.image.shape} (slice by slice)")
            try:
                per_volume.append(paired_metrics(real.image, fake, mask=real.label >= 0, lpips=lpips))
            except InputError as exc:
                raise InputError(f"set {sample_set.name}, sample {entry['sample_id']}: {exc}") from None
        rows.append({"method": sample_set.name, **fidelity_summary(per_volume, lpips_text)})
        log.info("set %s: MS-SSIM %.4f PSNR %.3f SSIM %.4f (%d volumes)", sample_set.name, rows[-1]["MS-SSIM"],
                 rows[-1]["PSNR"], rows[-1]["SSIM"], len(per_volume))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- privacy
def _small(image: np.ndarray) -> np.ndarray:
    return resample_volumes([image], PRIVACY_GRID)[0].reshape(PRIVACY_GRID).astype(np.float32)


def privacy_tables(store: SliceStore, sets: list[SampleSet], quantile: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per generated volume, one row per training volume: its nearest other training volume).

    Volumes are resampled once to ``PRIVACY_GRID`` (streamed); privacy.py then compares them on that
    same grid (an identity resampling).
    """
    train_ids = store.case_ids("train")
    train = [_small(store.load(c).image) for c in train_ids]
    baseline = training_nn_baseline(train, PRIVACY_GRID)
    baseline.insert(0, "training_case", train_ids)
    baseline["nearest_training"] = [train_ids[i] for i in baseline["nearest_training"]]
    baseline["nearest_training_mse"] = [train_ids[i] for i in baseline["nearest_training_mse"]]
    rows = []
    for sample_set in sets:
        generated = [_small(sample_set.load(entry, store.slice_size)[0]) for entry in sample_set.volumes]
        df = flag_near_copies(nearest_training(generated, train, PRIVACY_GRID), baseline, quantile)
        for entry, row in zip(sample_set.volumes, df.itertuples(index=False)):
            nearest = train_ids[row.nearest_training]
            rows.append({"set": sample_set.name, "sample_id": entry["sample_id"],
                         "source_case": entry["source_case"], "copy": entry.get("copy", 0),
                         "nearest_training": nearest, "pearson": row.pearson, "mse": row.mse,
                         "nearest_is_source": nearest == entry["source_case"],
                         "nearest_training_mse": train_ids[row.nearest_training_mse], "min_mse": row.min_mse,
                         "threshold_pearson": row.threshold_pearson, "threshold_rule": row.threshold_rule,
                         "near_copy": bool(row.near_copy)})
        log.info("privacy %s: %d volumes, %d near copies", sample_set.name, len(df), int(df["near_copy"].sum()))
    return pd.DataFrame(rows), baseline


def privacy_summary(generated: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Per set (and the training baseline): Pearson distribution to the nearest training volume, flag counts."""
    def stats(values: pd.Series) -> dict:
        v = values.to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        return {"pearson_min": v.min(), "pearson_median": np.median(v), "pearson_q95": np.quantile(v, 0.95),
                "pearson_max": v.max()} if len(v) else {}

    rows = [{"set": "training (nearest OTHER training volume)", "n_volumes": len(baseline),
             **stats(baseline["pearson"]), "n_near_copies": np.nan, "fraction_near_copies": np.nan,
             "fraction_nearest_is_source": np.nan}]
    for name, group in generated.groupby("set", sort=False):
        rows.append({"set": name, "n_volumes": len(group), **stats(group["pearson"]),
                     "n_near_copies": int(group["near_copy"].sum()),
                     "fraction_near_copies": float(group["near_copy"].mean()),
                     "fraction_nearest_is_source": float(group["nearest_is_source"].mean())})
    return pd.DataFrame(rows)
