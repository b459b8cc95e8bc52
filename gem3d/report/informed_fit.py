"""The failure-case figure: IC informed slices that contradict their mask, with and without the fit guard.

The paper's last figure shows its failure cases: an informed slice drawn blindly from another training
case at the same relative depth whose anatomy does not fit the mask (another head's outline, ventricles
where the tumour is). This module replays the IC sample set's own draws from the slice store alone (no
network): for every training mask and DRAWS seeded draws, the start slice p and the blind IC candidate
are drawn as the IC set draws them (`pick_informed`, `ic_candidates` in the set's candidate order), then
chosen twice by `choose_fitting`: guard off (the paper's blind draw) and guard on (`sampling.fit`; at
GUARD_MIN_DICE when the run leaves the guard off). The figure shows the five worst unguarded pairs (lowest
outline Dice x share of the mask's labels inside the slice's outline; one per mask slice) beside the guard's
choice, and its title gives both fit distributions.

    informed_fit(cfg)                 figures/informed_fit.{png,pdf} (the report's rule figure_informed_fit)
    fit_draws(cfg, store, n, fit)     the draws, both choices and their fits (scripts/bench_fit_guard.py)
    fit_summary(rows, key, fit)       one line: mean and quantiles of the fit, share below the guard's bar
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np

from gem3d.config import Config, InformedFitConfig
from gem3d.data.slice_store import SliceStore
from gem3d.paths import Paths
from gem3d.report.common import LABEL_COLOURS, View, figure_title, label_legend, plt, save_figure, show
from gem3d.sampling.generate import stable_seed
from gem3d.sampling.informed import StoreOutlines, choose_fitting, ic_candidates
from gem3d.sampling.sample_sets import pick_informed
from gem3d.sampling.sets import TRAIN_MASKS, SetSpec

DRAWS = 20  # seeded draws per training mask
GUARD_MIN_DICE = 0.85  # the guard drawn when the run's sampling.fit.min_dice is null (off)
WORST = 5


@dataclasses.dataclass
class StoreDepths:
    """The training cases and their depths: what IC's candidate draw reads of the latent cache, taken from
    the slice store (the same cases and depths), so no VAE is needed."""

    root: Path
    case_ids: list[str]
    depths: list[int]

    def depth(self, i: int) -> int:
        return self.depths[i]


def guard_of(cfg: Config) -> InformedFitConfig:
    """The run's guard, or the same guard at GUARD_MIN_DICE when the run samples without one."""
    fit = cfg.sampling.fit
    return fit if fit.min_dice is not None else dataclasses.replace(fit, min_dice=GUARD_MIN_DICE)


def fit_draws(cfg: Config, store: SliceStore, n_draws: int, fit_on: InformedFitConfig) -> list[dict]:
    """Per training mask and draw: case, start, the blind IC candidate and the guard's, and both fits."""
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
            target, region = np.asarray(label[start]), outlines(case_id, start)
            blind, blind_fit = choose_fitting(candidates[:1], target, region, outlines, fit_off)
            guarded, guarded_fit = choose_fitting(candidates, target, region, outlines, fit_on)
            rows.append({"case": case_id, "start": start, "blind": blind, "blind_fit": blind_fit,
                         "guarded": guarded, "guarded_fit": guarded_fit})
    return rows


def fit_summary(rows: list[dict], key: str, fit: InformedFitConfig) -> str:
    """The distribution of one choice's fit ("blind_fit" or "guarded_fit") in one line."""
    dice = np.array([r[key]["dice"] for r in rows])
    outside = np.array([r[key]["tumour_outside"] for r in rows])
    fails = np.mean([(d < fit.min_dice) or (o > fit.max_tumour_outside) for d, o in zip(dice, outside)])
    q = lambda a: "/".join(f"{v:.3f}" for v in np.quantile(a, [0.05, 0.25, 0.5]))  # noqa: E731
    return (f"outline Dice mean {dice.mean():.3f} (5%/25%/50% {q(dice)}), min {dice.min():.3f}; labelled voxels "
            f"outside mean {outside.mean():.3f}, max {outside.max():.3f}; below the guard's bar {100 * fails:.1f}%")


def _score(fit: dict) -> float:
    return fit["dice"] * (1 - fit["tumour_outside"])


def worst_pairs_figure(rows: list[dict], store: SliceStore, max_label: int, title: str = ""):
    """The WORST unguarded draws, one per mask slice: the mask's slice (the label colours of every figure), the
    blind IC slice and the guard's, with the mask's body outline (white, dashed) and its labels (their colours) drawn
    over."""
    worst, seen = [], set()
    for r in sorted(rows, key=lambda r: _score(r["blind_fit"])):
        if len(worst) == WORST:
            break
        if (r["case"], r["start"]) not in seen:
            seen.add((r["case"], r["start"]))
            worst.append(r)
    head = 0.5 + 0.12 * (title.count("\n") + 1)  # inches above the panels: figure title, data note, this title
    foot = 0.35  # inches below: the label legend
    fig, axes = plt.subplots(len(worst), 3, figsize=(7.5, 2.85 * len(worst) + head + foot), squeeze=False)
    axial = View("axial", 0, 1.0)
    for i, r in enumerate(worst):
        mask = np.asarray(store.load(r["case"], mmap=True).label[r["start"]])
        body = store.body(r["case"])[r["start"]]
        panels = [("mask " + r["case"] + f":{r['start']}", mask, None)]
        for key, fit_key, name in (("blind", "blind_fit", "IC, no guard"), ("guarded", "guarded_fit", "IC, guard")):
            spec, fit = r[key], r[fit_key]
            image = np.asarray(store.load(spec.case, mmap=True).image[spec.slice], dtype=np.float32)
            panels.append((f"{name}: {spec.case}:{spec.slice}\nDice {fit['dice']:.2f}, outside "
                           f"{fit['tumour_outside']:.2f}", image, mask))
        for ax, (name, data, contour) in zip(axes[i], panels):
            show(ax, data, axial, mask=contour is None, max_label=max_label)
            if contour is not None:
                if body.any() and not body.all():
                    ax.contour(body, levels=[0.5], colors="white", linewidths=0.9, linestyles="dashed")
                for k in range(1, max_label + 1):
                    if (contour == k).any():
                        ax.contour(contour == k, levels=[0.5], colors=LABEL_COLOURS[(k - 1) % len(LABEL_COLOURS)],
                                   linewidths=0.8)
            ax.set_title(name, fontsize=7)
    fig.tight_layout(rect=(0, foot / fig.get_figheight(), 1, 1 - head / fig.get_figheight()))
    if title:
        fig.text(0.5, 1 - 0.45 / fig.get_figheight(), title, ha="center", va="top", fontsize=6)
    return fig


def informed_fit(cfg: Config) -> list[Path]:
    """figures/informed_fit.{png,pdf}: the worst five IC informed slices without the guard, the guard's beside."""
    store = SliceStore(Paths(cfg).slices)
    fit = guard_of(cfg)
    rows = fit_draws(cfg, store, DRAWS, fit)
    replaced = sum(r["guarded"] != r["blind"] for r in rows)
    off = "" if cfg.sampling.fit.min_dice is not None else ", off in this run"
    lines = [f"{len(rows)} IC draws ({DRAWS} per training mask); white dashes: the mask's body outline, in the "
             "label colours: its labels",
             f"no guard (the paper): {fit_summary(rows, 'blind_fit', fit)}",
             f"guard (min_dice {fit.min_dice}, max_tumour_outside {fit.max_tumour_outside}, max_tries "
             f"{fit.max_tries}{off}; replaced {replaced} of {len(rows)}): {fit_summary(rows, 'guarded_fit', fit)}"]
    title = "\n".join(textwrap.fill(line, 125) for line in lines)
    fig = worst_pairs_figure(rows, store, cfg.max_label, title)
    figure_title(fig, cfg, "Failure cases: IC informed slices that contradict their mask", y=0.999)
    label_legend(fig, {int(v): k for k, v in store.index["labels"].items()}, cfg.max_label)
    return save_figure(fig, cfg, "informed_fit")
