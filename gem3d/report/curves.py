"""Training curves: loss vs step of every trained network, from the checkpoints' loss histories.

Each checkpoint records ``history["losses"] = [[step, running-mean loss since the previous log
line], ...]`` (gem3d/training/loop.py). The model file ``models/<name>.pt`` is a copy of the final
training state and carries the same history; ``train_state/<name>.ckpt`` is read when the model
file is absent (a run still training).
"""

from __future__ import annotations

import numpy as np

from gem3d.config import Config
from gem3d.io import InputError
from gem3d.paths import Paths
from gem3d.report.common import figure_title, plt, save_figure

MODEL_TITLES = {
    "vae": "VAE",
    "slice_model": "slice LDM (IG informed slices)",
    "volume_stage1": "GEM-3D volume LDM, stage 1 (2D)",
    "volume_stage2": "GEM-3D volume LDM, stage 2 (volumetric tuning)",
    "baseline_stage1": "baseline (mask only), stage 1",
    "baseline_stage2": "baseline (mask only), stage 2",
}


def vae_terms(cfg: Config) -> str:
    """The VAE's logged training loss, as its config makes it: L1 + KL, + LPIPS and + adversarial when weighted."""
    vae = cfg.vae
    return " + ".join(["L1", "KL"] + (["LPIPS"] if vae.perceptual_weight > 0 else [])
                      + (["adversarial"] if vae.adversarial.weight > 0 else []))


def model_names(cfg: Config) -> list[str]:
    """The networks this run trains (gem3d.sampling.sets.trained_models)."""
    from gem3d.sampling.sets import trained_models

    return trained_models(cfg)


def loss_history(cfg: Config, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(steps, losses, file read) of one network; InputError when neither file has a history."""
    from gem3d.training.checkpoint import load_checkpoint

    paths = Paths(cfg)
    candidates = [p for p in (paths.model(name), paths.train_state(name)) if p.is_file()]
    if not candidates:
        raise InputError(f"{paths.model(name)}: model {name} not found (and no {paths.train_state(name)}); "
                         "train it before drawing the training curves")
    payload = load_checkpoint(candidates[0])
    losses = (payload.get("history") or {}).get("losses") or []
    rows = [(int(s), float(v)) for s, v in losses]
    if not rows:
        raise InputError(f"{candidates[0]}: checkpoint of {name} has no loss history (history.losses is empty)")
    steps, values = (np.asarray(col) for col in zip(*sorted(rows)))
    return steps, values, str(candidates[0])


def training_curves(cfg: Config) -> list:
    """One panel per network: logged running-mean loss vs optimizer step (log scale)."""
    names = model_names(cfg)
    if not names:  # every network given as a file: nothing was trained
        fig, ax = plt.subplots(figsize=(6.0, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "No network was trained in this run: every one was given as a file (*.pretrained)",
                ha="center", va="center", fontsize=9)
        figure_title(fig, cfg, "Training curves")
        return save_figure(fig, cfg, "training_curves")
    histories = {name: loss_history(cfg, name) for name in names}
    ncol = 3 if len(names) > 4 else 2
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 2.9 * nrow + 0.9), squeeze=False)
    order = names if ncol == 2 or len(names) != 6 else ["vae", "volume_stage1", "baseline_stage1", "slice_model",
                                                        "volume_stage2", "baseline_stage2"]
    for ax, name in zip(axes.ravel(), order):  # 3 columns: GEM-3D and baseline stages 1 / 2 stacked
        steps, values, source = histories[name]
        ax.plot(steps, values, color="tab:blue", lw=1.2, marker="o", ms=2.2)
        positive = values[values > 0]
        if positive.size == values.size and positive.max() / positive.min() > 5:
            ax.set_yscale("log")
        title = f"{MODEL_TITLES[name]} ({vae_terms(cfg)})" if name == "vae" else MODEL_TITLES.get(name, name)
        ax.set_title(f"{title}\n{name}: {int(steps[-1])} steps, final loss {values[-1]:.4g}",
                     fontsize=8)
        ax.set_xlabel("optimizer step", fontsize=7)
        ax.set_ylabel(f"{vae_terms(cfg)} loss" if name == "vae" else "noise-prediction MSE", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    figure_title(fig, cfg, "Training curves: running-mean training loss per log interval")
    return save_figure(fig, cfg, "training_curves")

