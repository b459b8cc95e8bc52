"""Generated sample sets as the evaluation reads them, and which sets each table uses.

A set (written by `gem3d sample`) lives in ``Paths.samples(name)``:

    manifest.json            {"set", "kind": train_masks|test_true|deenhance, "volumes": [{"sample_id",
                              "source_case", "copy", "informed", "start", "augmentation", "seed", ...}]}
    slices/<sample_id>.npz   "image" (d, s, s) float16 in [-1, 1], "label" (d, s, s) int8 (-1 outside
                             nnU-Net's non-zero region), in the slice store's slice space
    imagesTr/<sample_id>_0000.nii.gz, labelsTr/<sample_id>.nii.gz, dataset.json   (nnU-Net raw format,
                             the source case's original geometry and affine)

Set names: "baseline" (when ``volume_model.baseline``) and every key of ``sampling.sets`` are
train_masks sets (one sample per training mask); the enhanced "kx" dataset is the
``sampling.enhancement_set`` plus its copies ``<set>_copy1 .. <set>_copy{k-1}``; the test sets
(true informed slice, paired with the real test case slice by slice) are ``TEST_SETS``.
workflow/rules/evaluation.smk repeats these few lines (importing this package loads torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gem3d.config import Config
from gem3d.io import InputError, read_json
from gem3d.paths import Paths

TRAIN_MASKS = "train_masks"
TEST_TRUE = "test_true"
TEST_SETS = ("test_gem3d", "test_baseline", "test_no_overlap", "test_no_stage2")


def generation_sets(cfg: Config) -> list[str]:
    """Table 1 rows: "baseline" (when the baseline model is trained) and every ``sampling.sets`` key."""
    return (["baseline"] if cfg.volume_model.baseline else []) + list(cfg.sampling.sets)


def enhancement_copies(cfg: Config) -> list[str]:
    """Extra copies of the enhancement set: ``<set>_copy1 .. <set>_copy{max(multiples) - 1}``."""
    name = cfg.sampling.enhancement_set
    return [f"{name}_copy{k}" for k in range(1, max(cfg.sampling.enhancement_multiples))]


def enhanced_sets(cfg: Config, multiple: int) -> list[str]:
    """The sets forming the enhanced "<multiple>x" dataset (copy 0 is the set itself)."""
    if multiple not in cfg.sampling.enhancement_multiples:
        raise InputError(f"{cfg.source}: enhancement multiple {multiple} is not in sampling.enhancement_multiples "
                         f"{list(cfg.sampling.enhancement_multiples)}")
    return [cfg.sampling.enhancement_set] + enhancement_copies(cfg)[: multiple - 1]


def test_sets(cfg: Config) -> list[str]:
    """Table 2 rows (test_baseline only when the baseline model is trained)."""
    return [s for s in TEST_SETS if s != "test_baseline" or cfg.volume_model.baseline]


def privacy_sets(cfg: Config) -> list[str]:
    """Every train_masks set and the enhancement copies."""
    return generation_sets(cfg) + enhancement_copies(cfg)


def downstream_data(cfg: Config) -> list[str]:
    """Training data of the downstream nnU-Net (Table 4 rows)."""
    multiples = sorted(set(cfg.sampling.enhancement_multiples))
    return (["real"] + [f"enhanced_{k}x" for k in multiples]
            + (["baseline"] if cfg.volume_model.baseline else []))


@dataclass(frozen=True)
class SampleSet:
    """Read access to one generated set (manifest checked on opening)."""

    name: str
    root: Path
    kind: str
    volumes: list[dict]

    @classmethod
    def open(cls, cfg: Config, name: str, kind: str | None = None) -> "SampleSet":
        root = Paths(cfg).samples(name)
        path = root / "manifest.json"
        if not path.is_file():
            raise InputError(f"{path}: sample set {name} not found (run `gem3d sample` for it first)")
        manifest = read_json(path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("volumes"), list):
            raise InputError(f"{path}: not a sample set manifest (needs a 'volumes' list)")
        if kind is not None and manifest.get("kind") != kind:
            raise InputError(f"{path}: sample set {name} has kind {manifest.get('kind')!r}, expected {kind!r}")
        if not manifest["volumes"]:
            raise InputError(f"{path}: sample set {name} is empty (no volumes)")
        for i, entry in enumerate(manifest["volumes"]):
            missing = [k for k in ("sample_id", "source_case") if k not in entry]
            if missing:
                raise InputError(f"{path}: volume {i} lacks {', '.join(missing)}")
        return cls(name, root, str(manifest.get("kind")), manifest["volumes"])

    def slices_path(self, entry: dict) -> Path:
        return self.root / "slices" / f"{entry['sample_id']}.npz"

    def image_path(self, entry: dict) -> Path:
        return self.root / "imagesTr" / f"{entry['sample_id']}_0000.nii.gz"

    def label_path(self, entry: dict) -> Path:
        return self.root / "labelsTr" / f"{entry['sample_id']}.nii.gz"

    def load(self, entry: dict, slice_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image (d, s, s) float32, label (d, s, s) int8) of one volume in slice space.

        With ``slice_size`` the slices must be ``slice_size x slice_size`` (the slice store's geometry).
        """
        path = self.slices_path(entry)
        try:
            with np.load(path) as data:
                image = np.asarray(data["image"], dtype=np.float32)
                label = np.asarray(data["label"]).astype(np.int8)
        except FileNotFoundError:
            raise InputError(f"{path}: slices of sample {entry['sample_id']} (set {self.name}) not found") from None
        except (KeyError, ValueError, OSError) as exc:
            raise InputError(f"{path}: cannot read sample slices ({type(exc).__name__}: {exc})".splitlines()[0]) \
                from exc
        if image.ndim != 3 or image.shape != label.shape:
            raise InputError(f"{path}: image {image.shape} and label {label.shape} must be equal (d, s, s) arrays")
        if slice_size is not None and image.shape[1:] != (slice_size, slice_size):
            raise InputError(
                f"{path}: set {self.name} has {image.shape[1]}x{image.shape[2]} slices but the slice store has "
                f"{slice_size}x{slice_size} (different slice geometry: generated with another preprocess.slice_size?)")
        return image, label
