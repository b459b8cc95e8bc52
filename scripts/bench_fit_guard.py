"""How well IC informed slices fit their masks, with and without the fit guard (issue #14, part 2).

    python scripts/bench_fit_guard.py --config config/hippocampus_cpu.yaml [--draws 20] [--min-dice 0.85]

Needs the run's slice store only (results/<name>/slices: `snakemake results/<name>/slices/index.json`);
no network is trained or sampled. For every training mask and `--draws` seeded draws, the start slice p
and the blind IC candidate are drawn exactly as the IC sample set draws them (`pick_informed`,
`ic_candidates` with the set's candidate order), then chosen twice by `choose_fitting`: guard off (the
paper: the blind draw) and guard on (`sampling.fit` with `--min-dice`). Prints the distribution of the
outline Dice and of the share of the mask's labelled voxels (tumour, hippocampus) outside the informed
slice's outline, both ways, and draws the worst five unguarded pairs beside the guard's choice to
`results/<name>/figures/fit_guard_worst5.png` (the report's failure-case figure, after the paper's last
figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem3d.config import load_config  # noqa: E402
from gem3d.data.slice_store import OUTSIDE, SliceStore  # noqa: E402
from gem3d.paths import Paths  # noqa: E402
from gem3d.sampling.generate import stable_seed  # noqa: E402
from gem3d.sampling.informed import StoreOutlines, choose_fitting, ic_candidates  # noqa: E402
from gem3d.sampling.sample_sets import pick_informed  # noqa: E402
from gem3d.sampling.sets import TRAIN_MASKS, SetSpec  # noqa: E402


@dataclasses.dataclass
class StoreDepths:
    """The training cases and their depths: what IC's candidate draw reads of the latent cache, taken from
    the slice store (the same cases and depths), so no VAE is needed."""

    root: Path
    case_ids: list[str]
    depths: list[int]

    def depth(self, i: int) -> int:
        return self.depths[i]


def draws(cfg, store: SliceStore, n_draws: int, fit_on) -> list[dict]:
    train_ids = store.case_ids("train")
    train = StoreDepths(store.root, train_ids, [store.load(c, mmap=True).label.shape[0] for c in train_ids])
    outlines = StoreOutlines(store)
    fit_off = dataclasses.replace(fit_on, min_dice=None)
    spec = SetSpec("IC", TRAIN_MASKS, informed="IC")
    rows = []
    for case_id in train_ids:
        label = store.load(case_id, mmap=True).label
        for k in range(n_draws):
            seed = stable_seed(cfg.sampling.seed, "fit_guard", case_id, k)
            start, first = pick_informed(spec, case_id, label.shape[0], np.random.default_rng(seed), train, set())
            order = np.random.default_rng(stable_seed(seed, "informed_fit"))
            candidates = ic_candidates(first, case_id, start, label.shape[0], train, order, fit_on.max_tries)
            target = np.asarray(label[start])
            blind, blind_fit = choose_fitting(candidates[:1], target, outlines, fit_off)
            guarded, guarded_fit = choose_fitting(candidates, target, outlines, fit_on)
            rows.append({"case": case_id, "start": start, "blind": blind, "blind_fit": blind_fit,
                         "guarded": guarded, "guarded_fit": guarded_fit})
    return rows


def summary(rows: list[dict], key: str, fit) -> str:
    dice = np.array([r[key]["dice"] for r in rows])
    outside = np.array([r[key]["tumour_outside"] for r in rows])
    fails = np.mean([(d < fit.min_dice) or (o > fit.max_tumour_outside) for d, o in zip(dice, outside)])
    q = lambda a: "/".join(f"{v:.3f}" for v in np.quantile(a, [0.05, 0.25, 0.5]))  # noqa: E731
    return (f"outline Dice mean {dice.mean():.3f} (5%/25%/50% {q(dice)}), min {dice.min():.3f}; labelled voxels "
            f"outside mean {outside.mean():.3f}, max {outside.max():.3f}; below the guard's bar {100 * fails:.1f}%")


def worst_five_figure(rows: list[dict], store: SliceStore, max_label: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = sorted(rows, key=lambda r: r["blind_fit"]["dice"] * (1 - r["blind_fit"]["tumour_outside"]))[:5]
    fig, axes = plt.subplots(len(worst), 3, figsize=(7.5, 2.6 * len(worst)), squeeze=False)
    for i, r in enumerate(worst):
        mask = np.asarray(store.load(r["case"], mmap=True).label[r["start"]])
        panels = [("mask " + r["case"] + f":{r['start']}", mask, None)]
        for key, fit_key, title in (("blind", "blind_fit", "IC, no guard"), ("guarded", "guarded_fit", "IC, guard")):
            spec = r[key]
            image = np.asarray(store.load(spec.case, mmap=True).image[spec.slice], dtype=np.float32)
            fit = r[fit_key]
            panels.append((f"{title}: {spec.case}:{spec.slice}\nDice {fit['dice']:.2f}, outside "
                           f"{fit['tumour_outside']:.2f}", image, mask))
        for ax, (title, data, contour) in zip(axes[i], panels):
            if contour is None:
                ax.imshow(data, cmap="viridis", vmin=OUTSIDE, vmax=max_label, interpolation="nearest")
            else:
                ax.imshow(data, cmap="gray", vmin=-1, vmax=1)
                ax.contour(contour != OUTSIDE, levels=[0.5], colors="yellow", linewidths=0.8)
                ax.contour(contour > 0, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("Worst five IC informed slices without the fit guard (yellow: the mask's body outline, red: its "
                 "labels)", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--draws", type=int, default=20, help="seeded draws per training mask")
    parser.add_argument("--min-dice", type=float, default=0.85, help="the guard's sampling.fit.min_dice")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, check_paths=False)
    store = SliceStore(Paths(cfg).slices)
    fit = dataclasses.replace(cfg.sampling.fit, min_dice=args.min_dice)
    rows = draws(cfg, store, args.draws, fit)
    print(f"{cfg.name}: {len(rows)} IC draws ({len(store.case_ids('train'))} training masks x {args.draws}); guard: "
          f"min_dice {fit.min_dice}, max_tumour_outside {fit.max_tumour_outside}, max_tries {fit.max_tries}")
    print("  no guard (paper):", summary(rows, "blind_fit", fit))
    print("  guard:           ", summary(rows, "guarded_fit", fit))
    replaced = [r for r in rows if r["guarded"] != r["blind"]]
    failed = sum(r["guarded_fit"]["passed"] is False for r in rows)
    print(f"  the guard replaced {len(replaced)} of {len(rows)} blind draws ({100 * len(replaced) / len(rows):.1f}%); "
          f"mean rejected candidates {np.mean([r['guarded_fit']['rejected'] for r in rows]):.2f}; no candidate passed "
          f"for {failed} (the best was kept)")
    out = Paths(cfg).figures / "fit_guard_worst5.png"
    worst_five_figure(rows, store, cfg.max_label, out)
    print(f"  worst five pairs without the guard: {out}")


if __name__ == "__main__":
    main()
