"""How well IC informed slices fit their masks, with and without the fit guard (issue #14, part 2).

    python scripts/bench_fit_guard.py --config config/hippocampus_cpu.yaml [--draws 20] [--min-dice 0.85]

Needs the run's slice store only (results/<name>/slices: `snakemake results/<name>/slices/index.json`);
no network is trained or sampled. For every training mask and `--draws` seeded draws, the start slice p
and the blind IC candidate are drawn exactly as the IC sample set draws them (`pick_informed`,
`ic_candidates` with the set's candidate order), then chosen twice by `choose_fitting`: guard off (the
paper: the blind draw) and guard on (`sampling.fit` with `--min-dice`). Prints the distribution of the
outline Dice and of the share of the mask's labelled voxels (tumour, hippocampus) outside the informed
slice's outline, both ways. The same draws make the report's failure-case figure (the worst five unguarded
pairs beside the guard's choice, after the paper's last figure): `snakemake results/<name>/figures/informed_fit.png`
(gem3d/report/informed_fit.py).

    python scripts/bench_fit_guard.py --config config/brats_cpu.yaml --fid IC IC_copy1 IC_copy2 IC_copy3 IC_copy4

With --fid, after the run's sets are sampled (snakemake results/<name>/samples/<set>/manifest.json ...), it
prints instead the FID-A/C/S of those sets pooled and of each, against the real training volumes
(evaluation.fid_extractor), and the fit of the informed slices their manifests record: run it once with the
config's sampling.fit.min_dice null and once with it set (the sets are sampled again; the networks are reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem3d.config import load_config  # noqa: E402
from gem3d.data.slice_store import SliceStore  # noqa: E402
from gem3d.paths import Paths  # noqa: E402
from gem3d.report.informed_fit import fit_draws, fit_summary  # noqa: E402


def fid_report(cfg, store: SliceStore, names: list[str]) -> None:
    from gem3d.evaluation.quality import pooled_fid, real_moments
    from gem3d.evaluation.stages import load_extractor
    from gem3d.sampling.sets import TRAIN_MASKS, SampleSet

    extractor, description = load_extractor(cfg)
    sets = [SampleSet.open(cfg, name, TRAIN_MASKS) for name in names]
    fits = [v["fit"] for s in sets for v in s.volumes if "fit" in v]
    fit = cfg.sampling.fit
    print(f"{cfg.name}: guard min_dice {fit.min_dice}; FID ({description}) of {', '.join(names)}")
    batch = cfg.evaluation.fid_batch_size
    real, _ = real_moments(store, extractor, batch)  # once for every row below
    for label, group in [("pooled", sets)] + [(s.name, [s]) for s in sets]:
        fid, n = pooled_fid(store, group, extractor, batch, real)
        print(f"  {label:>9}: {n:3d} volumes  FID-A {fid['axial']:.4f}  FID-C {fid['coronal']:.4f}  "
              f"FID-S {fid['sagittal']:.4f}")
    if fits:
        dice = np.array([f["dice"] for f in fits])
        outside = np.array([f["tumour_outside"] for f in fits])
        print(f"  informed slices ({len(fits)}): outline Dice mean {dice.mean():.3f}, min {dice.min():.3f}; labelled "
              f"voxels outside mean {outside.mean():.3f}, max {outside.max():.3f}; replaced by the guard "
              f"{sum(f['rejected'] > 0 for f in fits)}; no candidate passed {sum(f['passed'] is False for f in fits)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--draws", type=int, default=20, help="seeded draws per training mask")
    parser.add_argument("--min-dice", type=float, default=0.85, help="the guard's sampling.fit.min_dice")
    parser.add_argument("--fid", nargs="+", metavar="SET", help="instead: FID of these sampled sets, pooled and each")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, check_paths=False)
    store = SliceStore(Paths(cfg).slices)
    if args.fid:
        return fid_report(cfg, store, args.fid)
    fit = dataclasses.replace(cfg.sampling.fit, min_dice=args.min_dice)
    rows = fit_draws(cfg, store, args.draws, fit)
    print(f"{cfg.name}: {len(rows)} IC draws ({len(store.case_ids('train'))} training masks x {args.draws}); guard: "
          f"min_dice {fit.min_dice}, max_tumour_outside {fit.max_tumour_outside}, max_tries {fit.max_tries}")
    print("  no guard (paper):", fit_summary(rows, "blind_fit", fit))
    print("  guard:           ", fit_summary(rows, "guarded_fit", fit))
    replaced = [r for r in rows if r["guarded"] != r["blind"]]
    failed = sum(r["guarded_fit"]["passed"] is False for r in rows)
    print(f"  the guard replaced {len(replaced)} of {len(rows)} blind draws ({100 * len(replaced) / len(rows):.1f}%); "
          f"mean rejected candidates {np.mean([r['guarded_fit']['rejected'] for r in rows]):.2f}; no candidate passed "
          f"for {failed} (the best was kept)")


if __name__ == "__main__":
    main()
