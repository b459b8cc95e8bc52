"""The downstream study's figures (gem3d/evaluation/downstream.py, tables/segmentation.csv):

    downstream            Dice per region against the number of generated copies per training mask, with the
                          95 % intervals over test cases: real (0 copies), GEM-3D synthetic only, real + GEM-3D,
                          the baseline; the adherent row beside them
    segmentation_curves   nnU-Net's validation pseudo-Dice per epoch of every downstream training (one panel per
                          row, a line per seed): did the training plateau?
    adherence             the real-data nnU-Net's Dice of each generated volume against its own mask, per set
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gem3d.config import Config
from gem3d.io import InputError, read_json
from gem3d.report.common import figure_title, plt, save_figure

SERIES = {  # series of the Dice-against-copies figure: (colour, marker, label)
    "gem3d": ("tab:blue", "o", "GEM-3D, synthetic only"),
    "real+gem3d": ("tab:green", "s", "real + GEM-3D"),
    "baseline": ("tab:orange", "^", "baseline, synthetic only"),
    "adherent": ("tab:purple", "D", "GEM-3D, adherent volumes only"),
}


def _summary(cfg: Config) -> pd.DataFrame:
    from gem3d.evaluation.stages import table_path

    path = table_path(cfg, "segmentation")
    if not path.is_file():
        raise InputError(f"{path}: the downstream table is missing (run `gem3d evaluate-segmentation` first)")
    return pd.read_csv(path)


def _series_of(cfg: Config, row: str) -> str | None:
    from gem3d.sampling.sets import downstream_rows

    spec = downstream_rows(cfg).get(row)
    if spec is None or spec.method is None:
        return None
    if spec.adherent:
        return "adherent"
    return "real+gem3d" if spec.real else spec.method


def downstream(cfg: Config) -> list:
    """Dice per region against the number of generated copies, with intervals."""
    from gem3d.sampling.sets import downstream_rows

    summary = _summary(cfg)
    rows = downstream_rows(cfg)
    regions = list(dict.fromkeys(summary["region"]))
    fig, axes = plt.subplots(1, len(regions), figsize=(4.2 * len(regions), 3.8), squeeze=False)
    for ax, region in zip(axes[0], regions):
        part = summary[summary["region"] == region].set_index("row")
        if "real" in part.index:
            real = part.loc["real"]
            ax.axhspan(real["dice_ci_low"], real["dice_ci_high"], color="0.85", zorder=0)
            ax.axhline(real["dice_mean"], color="0.3", lw=1, label="real only (band: interval)")
        for key, (colour, marker, label) in SERIES.items():
            points = [(rows[r].copies, part.loc[r]) for r in part.index if r in rows and _series_of(cfg, r) == key]
            if key == "real+gem3d" and points and "real" in part.index:
                points = [(0, part.loc["real"])] + points
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            x = np.array([p[0] for p in points], float) + {"baseline": 0.08, "adherent": 0.16}.get(key, 0.0)
            y = np.array([p[1]["dice_mean"] for p in points])
            err = np.array([[p[1]["dice_mean"] - p[1]["dice_ci_low"], p[1]["dice_ci_high"] - p[1]["dice_mean"]]
                            for p in points]).T
            ax.errorbar(x, y, yerr=err, color=colour, marker=marker, ms=5, lw=1.2, capsize=3, label=label)
        ax.set_title(f"region {region}", fontsize=9)
        ax.set_xlabel("generated copies per training mask", fontsize=8)
        ax.set_ylabel("Dice on the real test cases", fontsize=8)
        ax.set_xticks(sorted({0} | {r.copies for r in rows.values()}))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
    n = summary[["n_cases", "n_seeds"]].iloc[0]
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False,
               title=f"{int(n['n_cases'])} real test cases x {int(n['n_seeds'])} seeds; bars: 95 % bootstrap "
                     "intervals over test cases", title_fontsize=7)
    fig.tight_layout(rect=(0, 0.7 / fig.get_figheight(), 1, 1 - 0.9 / fig.get_figheight()))
    figure_title(fig, cfg, "Downstream segmentation: Dice against generated copies per training mask")
    return save_figure(fig, cfg, "downstream")


def segmentation_curves(cfg: Config) -> list:
    """Validation pseudo-Dice per epoch of every downstream training (from nnU-Net's log)."""
    from gem3d.evaluation.downstream import downstream_data, metrics_path, seeds

    names = downstream_data(cfg)
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.6 * nrow + 0.8), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        for seed in seeds(cfg):
            path = metrics_path(cfg, name, seed)
            if not path.is_file():
                raise InputError(f"{path}: segmentation metrics of {name} seed {seed} not found")
            curve = read_json(path).get("curve") or []
            if curve:
                ax.plot([c["epoch"] + 1 for c in curve], [c["mean"] for c in curve], lw=1, marker=".", ms=3,
                        label=f"seed {seed}")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("validation pseudo-Dice (mean)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    figure_title(fig, cfg, "Downstream nnU-Net trainings: validation pseudo-Dice per epoch (nnU-Net's log)")
    return save_figure(fig, cfg, "segmentation_curves")


def adherence(cfg: Config) -> list:
    """Histogram of the generated volumes' mask adherence, per set."""
    from gem3d.evaluation.stages import table_path

    path = table_path(cfg, "adherence_volumes")
    if not path.is_file():
        raise InputError(f"{path}: mask adherence not measured (run `gem3d evaluate-adherence` first)")
    volumes = pd.read_csv(path)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(0, 1, 41)
    for name, group in volumes.groupby("set", sort=False):
        ax.hist(group["mean Dice"], bins=bins, histtype="step", lw=1.4, label=f"{name} ({len(group)} volumes, "
                                                                             f"mean {group['mean Dice'].mean():.3f})")
    threshold = cfg.evaluation.segmentation.min_adherence
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"min_adherence {threshold:g}")
    ax.set_xlabel("Dice of the real-data nnU-Net's segmentation vs the volume's own mask (mean over regions)",
                  fontsize=8)
    ax.set_ylabel("volumes", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    figure_title(fig, cfg, "Mask adherence of the generated volumes")
    return save_figure(fig, cfg, "adherence")
