"""The informed-slice fit guard on CT: nnU-Net's non-zero region against the stored body outline (issue #24.2).

    python scripts/bench_ct_outline.py --out /tmp/ct_bench --ct ../shared/data/TotalSegmentator_example_CT
    python scripts/bench_ct_outline.py --out /tmp/ct_phantoms --phantoms

On CT nnU-Net's non-zero region is the whole field of view (air is -1000 HU, not 0), so the fit guard, which
compared those regions, scored every IC candidate Dice 1. This script builds a small CT dataset in --out (never
in the repository), runs the real import, nnU-Net preprocessing and slice store, and prints the IC set's draws
(report/informed_fit.fit_draws: 20 seeded draws per training mask) scored both ways: with the old outline
(label != -1, nnU-Net's region) and with the body outline the slice store now keeps (above -500 HU, holes
filled), without and with the guard (min_dice 0.85).

--ct DIR: a TotalSegmentator-style folder (example_ct.nii.gz in HU, example_seg_fast_force_split.nii.gz and
class_map_total.json); its liver, kidneys, spleen and pancreas become labels 1-4 (AbdomenCT-1K's). One scan gives
one body, so the dataset holds it and copies shrunk in-plane about the volume centre (another patient's size,
air around): two large bodies (1.0, 0.95) and two small ones (0.65, 0.6) for training, 0.8 for the test split;
a blind IC draw pairs a mask with a body of the other size two times in three.
--phantoms: CT-like phantoms (gem3d.data.phantoms.ct_phantom) with bodies of scales 1.0, 0.95, 0.6, 0.55
(training) and 0.8 (test).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem3d.config import InformedFitConfig, config_from_dict  # noqa: E402
from gem3d.data.phantoms import ct_phantom  # noqa: E402
from gem3d.data.slice_store import OUTSIDE, SliceStore  # noqa: E402
from gem3d.io import Volume, read_json, read_volume, write_volume  # noqa: E402
from gem3d.paths import Paths  # noqa: E402
from gem3d.pipeline import build_slices, import_data, preprocess  # noqa: E402
from gem3d.report.informed_fit import fit_draws  # noqa: E402
from gem3d.sampling.informed import slice_fit  # noqa: E402

ORGANS = {"liver": 1, "kidney_right": 2, "kidney_left": 2, "spleen": 3, "pancreas": 4}
LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}
AIR = -1024


def shrunk(array: np.ndarray, scale: float, fill: float, order: int) -> np.ndarray:
    """(x, y, z) array scaled in-plane by `scale` about the centre of each slice, `fill` outside."""
    centre = (np.asarray(array.shape[:2], float) - 1) / 2
    matrix = np.diag([1 / scale, 1 / scale, 1.0])
    offset = np.append(centre - centre / scale, 0.0)
    return ndimage.affine_transform(array, matrix, offset=offset, order=order, mode="constant", cval=fill)


def ct_cases(folder: Path) -> list[tuple[str, float, Volume, Volume]]:
    image = read_volume(folder / "example_ct.nii.gz")
    seg = read_volume(folder / "example_seg_fast_force_split.nii.gz")
    names = read_json(folder / "class_map_total.json")
    labels = np.zeros(seg.shape, np.uint8)
    for value, name in names.items():
        if name in ORGANS:
            labels[np.rint(seg.array) == int(value)] = ORGANS[name]
    hu = image.array.astype(np.float32)
    out = []
    for name, scale in (("ct_100", 1.0), ("ct_095", 0.95), ("ct_065", 0.65), ("ct_060", 0.6), ("ct_080", 0.8)):
        out.append((name, scale, Volume(np.rint(shrunk(hu, scale, AIR, 1)).astype(np.int16), image.affine),
                    Volume(shrunk(labels, scale, 0, 0).astype(np.uint8), seg.affine)))
    return out


def phantom_cases() -> list[tuple[str, float, Volume, Volume]]:
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    out = []
    for i, scale in enumerate((1.0, 0.95, 0.6, 0.55, 0.8)):
        hu, mask, _ = ct_phantom(scale, (48, 48, 16), seed=i)
        out.append((f"phantom_{i}_{int(100 * scale):03d}", scale, Volume(hu, affine), Volume(mask, affine)))
    return out


def summary(values: np.ndarray) -> str:
    return (f"mean {values.mean():.3f} (5 % {np.quantile(values, 0.05):.3f}, min {values.min():.3f}); below 0.85: "
            f"{100 * (values < 0.85).mean():.1f} %")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="work folder (data, results); not the repository")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ct", type=Path, help="a TotalSegmentator example folder")
    what.add_argument("--phantoms", action="store_true", help="CT-like phantoms of five body sizes")
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args(argv)
    cases = ct_cases(args.ct) if args.ct else phantom_cases()
    root = args.out.resolve()
    for name, _, image, mask in cases:
        write_volume(root / "data" / "images" / f"{name}.nii.gz", image, np.int16)
        write_volume(root / "data" / "masks" / f"{name}.nii.gz", mask, np.uint8)
    names = [c[0] for c in cases]
    cfg = config_from_dict({
        "name": "ct_outline", "data": {"format": "folder", "path": str(root / "data"), "modality": "CT",
                                       "labels": LABELS if args.ct else {"background": 0, "organ": 1},
                                       "split": {"train": names[:-1], "test": names[-1:]}},
        "preprocess": {"dataset_id": 984, "num_processes": 1, "slice_size": 64},
        "vae": {"model": {"channel_mult": [1, 2]}}}, source="bench_ct_outline")
    os.chdir(root)
    import_data(cfg)
    preprocess(cfg)
    build_slices(cfg)
    store = SliceStore(Paths(cfg).slices)
    share = {c: float(store.body(c).mean()) for c in store.case_ids("train")}
    fov = {c: float((np.asarray(store.load(c).label) != OUTSIDE).mean()) for c in store.case_ids("train")}
    print(f"{len(names) - 1} training cases: share of slice pixels inside nnU-Net's region "
          + ", ".join(f"{c} {v:.2f}" for c, v in fov.items()) + "; inside the body outline "
          + ", ".join(f"{c} {v:.2f}" for c, v in share.items()))
    guard = InformedFitConfig(min_dice=0.85, max_tumour_outside=0.1, max_tries=20)
    rows = fit_draws(cfg, store, args.draws, guard)
    old = []
    for r in rows:
        target = np.asarray(store.load(r["case"], mmap=True).label[r["start"]])
        candidate = np.asarray(store.load(r["blind"].case, mmap=True).label[r["blind"].slice]) != OUTSIDE
        old.append(slice_fit(candidate, target, target != OUTSIDE).dice)
    blind = np.array([r["blind_fit"]["dice"] for r in rows])
    guarded = np.array([r["guarded_fit"]["dice"] for r in rows])
    outside = np.array([r["blind_fit"]["tumour_outside"] for r in rows])
    replaced = sum(r["guarded"] != r["blind"] for r in rows)
    print(f"{len(rows)} IC draws; outline Dice of the blind draw, nnU-Net's region (before): {summary(np.array(old))}")
    print(f"  body outline (now), no guard: {summary(blind)}; labelled voxels outside the slice's body: mean "
          f"{outside.mean():.3f}, max {outside.max():.3f}")
    print(f"  body outline, guard min_dice 0.85: {summary(guarded)}; replaced {replaced} of {len(rows)} "
          f"({100 * replaced / len(rows):.1f} %), no passing candidate for "
          f"{sum(r['guarded_fit']['passed'] is False for r in rows)}")
    pairs = {}
    for r in rows:
        pairs.setdefault((r["case"], r["blind"].case), []).append(r["blind_fit"]["dice"])
    for (mask_case, slice_case), values in sorted(pairs.items()):
        print(f"    mask {mask_case} <- slice of {slice_case}: body Dice mean {np.mean(values):.3f} ({len(values)})")


if __name__ == "__main__":
    main()
