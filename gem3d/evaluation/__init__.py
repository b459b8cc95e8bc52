"""Evaluation: FID per plane (pluggable extractors), paired metrics, Dice/HD95, privacy.

Every pretrained network loads from a LOCAL file given as an argument (nothing is downloaded) and
carries a ``description`` naming the extractor, file and hash, to be written into every table.
"""

from gem3d.evaluation.extractors import EXTRACTOR_NAMES, build_extractor
from gem3d.evaluation.fid import (
    PLANES,
    PlaneFID,
    extract_features,
    fid_from_features,
    fid_per_plane,
    fid_per_plane_detailed,
    frechet_distance,
    plane_slices,
)
from gem3d.evaluation.paired import LPIPS, load_lpips, ms_ssim_scales, paired_metrics
from gem3d.evaluation.privacy import flag_near_copies, nearest_training, training_nn_baseline
from gem3d.evaluation.segmentation_metrics import BRATS_REGIONS, dice, hd95, label_regions, region_metrics

__all__ = [
    "BRATS_REGIONS",
    "EXTRACTOR_NAMES",
    "LPIPS",
    "PLANES",
    "PlaneFID",
    "build_extractor",
    "dice",
    "extract_features",
    "fid_from_features",
    "fid_per_plane",
    "fid_per_plane_detailed",
    "flag_near_copies",
    "frechet_distance",
    "hd95",
    "label_regions",
    "load_lpips",
    "ms_ssim_scales",
    "nearest_training",
    "paired_metrics",
    "plane_slices",
    "region_metrics",
    "training_nn_baseline",
]
