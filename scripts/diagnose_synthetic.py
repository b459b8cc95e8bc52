#!/usr/bin/env python
"""Why does a segmentation network trained on synthetic volumes fall short of one trained on real ones?

Pairs each generated volume with the real volume whose mask it was generated from (same mask, same grid: gem3d's
enhancement sets IC/IG use the real training masks) and compares what a segmentation network sees, after
nnU-Net's z-score of each whole image:

- per label: the mean intensity inside the label, and its contrast to a 2-voxel ring around it (real and
  synthetic side by side; a smaller synthetic contrast is a weaker cue for the network);
- sharpness: the high-frequency energy (squared 3D Laplacian) of the synthetic image over the real one, and the
  same ratio for the gradient magnitude on the label boundaries only (where the network places its edges).

    python scripts/diagnose_synthetic.py --real results/hippocampus_study/nnunet/raw/Dataset920_hippocampus_study \\
        --synthetic results/hippocampus_study/samples/IC

Both folders in nnU-Net's raw layout (imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz); a synthetic case
`<source>_<set>[...]` pairs with the real case `<source>`. Prints one line per label and the sharpness ratios
(median and interquartile range over the pairs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

from gem3d.io import read_volume  # noqa: E402


def zscore(image: np.ndarray) -> np.ndarray:
    return (image - image.mean()) / max(float(image.std()), 1e-8)


def label_stats(image: np.ndarray, label: np.ndarray, value: int) -> tuple[float, float]:
    """(mean z inside the label, mean inside minus mean of the 2-voxel ring around it)."""
    inside = label == value
    ring = ndimage.binary_dilation(inside, iterations=2) & (label == 0)
    if not inside.any() or not ring.any():
        return float("nan"), float("nan")
    return float(image[inside].mean()), float(image[inside].mean() - image[ring].mean())


def boundary_gradient(image: np.ndarray, label: np.ndarray) -> float:
    """Mean gradient magnitude on the voxels where the label changes."""
    edges = ndimage.morphological_gradient(label.astype(np.int16), size=3) > 0
    grad = np.sqrt(sum(g ** 2 for g in np.gradient(image)))
    return float(grad[edges].mean()) if edges.any() else float("nan")


def pairs(real: Path, synthetic: Path) -> list[tuple[str, Path, Path, Path]]:
    """(synthetic case, synthetic image, real image, label) for every synthetic case with a real source."""
    out = []
    for image in sorted((synthetic / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        source = next((c for c in (case.rsplit("_", k)[0] for k in range(1, case.count("_") + 1))
                       if (real / "imagesTr" / f"{c}_0000.nii.gz").exists()), None)
        if source is None:
            raise SystemExit(f"error: {image}: no real case in {real / 'imagesTr'} that its name starts with")
        out.append((case, image, real / "imagesTr" / f"{source}_0000.nii.gz", real / "labelsTr" / f"{source}.nii.gz"))
    if not out:
        raise SystemExit(f"error: {synthetic / 'imagesTr'}: no *_0000.nii.gz images")
    return out


def summary(values: list[float]) -> str:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{med:.3f} [{q1:.3f}, {q3:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="nnU-Net raw dataset of the real cases")
    parser.add_argument("--synthetic", type=Path, required=True, help="a generated set (nnU-Net raw layout)")
    args = parser.parse_args()
    rows = {}
    hf, edge = [], []
    for case, synth_path, real_path, label_path in pairs(args.real, args.synthetic):
        label = np.asarray(read_volume(label_path).array).astype(np.int16)
        real, synth = (zscore(np.asarray(read_volume(p).array, np.float32)) for p in (real_path, synth_path))
        if real.shape != synth.shape or real.shape != label.shape:
            raise SystemExit(f"error: {synth_path}: shape {synth.shape} differs from its real case {real.shape}")
        for value in np.unique(label[label > 0]):
            rows.setdefault(int(value), []).append((*label_stats(real, label, value), *label_stats(synth, label, value)))
        lap = lambda x: float((ndimage.laplace(x) ** 2).sum())  # noqa: E731
        hf.append(lap(synth) / lap(real))
        edge.append(boundary_gradient(synth, label) / boundary_gradient(real, label))
    print(f"{len(hf)} pairs; intensities after each image's z-score; median [interquartile range] over the pairs")
    print("| label | real mean | synthetic mean | real contrast to its ring | synthetic contrast |")
    print("|---|---:|---:|---:|---:|")
    for value, stats in sorted(rows.items()):
        cols = list(zip(*stats))
        print(f"| {value} | {summary(cols[0])} | {summary(cols[2])} | {summary(cols[1])} | {summary(cols[3])} |")
    print(f"high-frequency energy, synthetic / real: {summary(hf)}")
    print(f"gradient on the label boundaries, synthetic / real: {summary(edge)}")


if __name__ == "__main__":
    main()
