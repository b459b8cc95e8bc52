"""Evaluation: FID per plane (pluggable extractors), paired metrics, Dice/HD95, privacy.

Every pretrained network loads from a LOCAL file given as an argument (nothing is downloaded) and
carries a ``description`` naming the extractor, file and hash, to be written into every table.
Names are imported lazily (PEP 562), so `gem3d --help` does not pay for torchmetrics.
"""

from importlib import import_module

_WHERE = {
    "EXTRACTOR_NAMES": "extractors", "build_extractor": "extractors",
    "PLANES": "fid", "PlaneFID": "fid", "extract_features": "fid", "fid_from_features": "fid",
    "fid_per_plane": "fid", "fid_per_plane_detailed": "fid", "frechet_distance": "fid", "plane_slices": "fid",
    "LPIPS": "paired", "load_lpips": "paired", "ms_ssim_scales": "paired", "paired_metrics": "paired",
    "flag_near_copies": "privacy", "nearest_training": "privacy", "training_nn_baseline": "privacy",
    "BRATS_REGIONS": "segmentation_metrics", "dice": "segmentation_metrics", "hd95": "segmentation_metrics",
    "label_regions": "segmentation_metrics", "region_metrics": "segmentation_metrics",
    "bootstrap_interval": "statistics", "summarise": "statistics", "summary_markdown": "statistics",
    "score_folders": "score",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"gem3d.evaluation.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gem3d.evaluation' has no attribute {name!r}")
