"""Fig. 3: counterfactual synthesis, one mask (and a counterfactual edit of it) x several informed slices.

The volumes are generated here with the trained GEM-3D stage-2 model (``VolumeSampler``), not
taken from the sample sets: the grid needs the SAME mask with DIFFERENT informed slices, which no
set holds (the copies of the augmented set each augment the mask differently).

- mask: the first test case's mask (so a real volume of that mask exists and the models never
  trained on it), and a counterfactual edit of it: the mask augmentation of the ``IC_MA`` sets
  (rotation, tumour moved toward the volume centre, clipped to the brain) without flips;
- informed slices: training cases of different scanners (demo) at the same relative depth as the
  start slice p (the tumour's centre slice), given as fixed informed slices.

Provenance (cases, slices, seeds, augmentation, checkpoint hashes) goes to
``figures/fig3_counterfactual.json``.
"""

from __future__ import annotations

import numpy as np

from gem3d.config import Config
from gem3d.io import InputError, write_json
from gem3d.paths import Paths
from gem3d.report.common import (Store, centre_of, figure_title, label_legend, pick_by_scanner, plt, save_figure,
                                 scanner_ids, show, tag, views_for)


def counterfactual_mask(cfg: Config, native: np.ndarray, seed: int, spacing) -> tuple[np.ndarray, dict]:
    """The mask augmentation of the MA sets, without flips, on an (d, y, x) native-resolution mask of voxel
    `spacing` (the case's spacing_preprocessed: rotations in mm, as the MA sets rotate)."""
    from gem3d.sampling.augment import augment_mask

    aug = cfg.augmentation
    return augment_mask(native.astype(np.int16), np.random.default_rng(seed), mode=aug.mode, flip=False,
                        max_rotation_deg=aug.max_rotation_deg, translate_range=aug.translate_range,
                        tumour_labels=aug.tumour_labels, spacing=spacing, seed=seed)


def generate(cfg: Config, jobs: list) -> tuple[list[np.ndarray], dict]:
    """GEM-3D stage 2 volumes for the jobs (pinned overlap, as the sample sets); returns (images, checkpoints)."""
    from gem3d.sampling.generate import VolumeSampler

    sampler = VolumeSampler(cfg, "gem3d", 2)
    return sampler.generate(jobs, pin=True), dict(sampler.checkpoints)


def fig3_counterfactual(cfg: Config, n_informed: int = 4) -> list:
    from gem3d.data.slice_store import to_slices
    from gem3d.sampling.generate import VolumeJob, stable_seed
    from gem3d.sampling.informed import InformedSpec, relative_slice

    store = Store(cfg)
    pool = store.case_ids("test") or store.case_ids("train")
    if not pool:
        raise InputError(f"{store.store.root}: the slice store has no cases")
    case = store.load(pool[0])
    s = store.store.slice_size
    seed = stable_seed(cfg.sampling.seed, "fig3_counterfactual", case.case_id)
    edited_native, params = counterfactual_mask(cfg, np.asarray(store.store.load(case.case_id).label_native), seed,
                                                case.geometry["spacing_preprocessed"])
    edited = to_slices(edited_native, s, is_label=True, fit=store.store.slice_fit)
    d = case.label.shape[0]
    p = centre_of(case.label)[0]
    scanners = scanner_ids(cfg)
    donors = [c for c in store.case_ids("train") if c != case.case_id]
    if not donors:
        raise InputError(f"{store.store.root}: no training case to take informed slices from")
    donors = pick_by_scanner(donors, scanners, n_informed)
    depths = {c: int(store.store.index["cases"][c]["preprocessed_shape"][0]) for c in donors}
    specs = [InformedSpec("fixed", c, relative_slice(p, d, depths[c])) for c in donors]
    masks = [("original mask", case.label), ("counterfactual mask\n(tumour moved)", edited)]
    jobs = [VolumeJob(f"fig3_{m}_{spec.case}", case.case_id, label, p, spec,
                      stable_seed(seed, m, spec.case, spec.slice))
            for m, (_, label) in enumerate(masks) for spec in specs]
    images, checkpoints = generate(cfg, jobs)
    grid = [images[m * len(specs):(m + 1) * len(specs)] for m in range(len(masks))]

    ncol = 2 + len(specs)
    fig = plt.figure(figsize=(1.6 * ncol + 0.8, 9.0))
    gs = fig.add_gridspec(5, ncol, height_ratios=[1, 1, 0.85, 1, 0.85], left=0.09, right=0.99, top=0.87,
                          bottom=0.075, wspace=0.05, hspace=0.1)
    for j, spec in enumerate(specs):
        donor = store.load(spec.case)
        view = views_for(donor, (spec.slice,))[0]
        ax = fig.add_subplot(gs[0, 2 + j])
        show(ax, view.take(donor.image), view)
        sid = scanners.get(spec.case)
        ax.set_title(f"informed slice\n{spec.case}:{spec.slice}" + ("" if sid is None else f"\nscanner {sid}"),
                     fontsize=7)
    for j in (0, 1):
        fig.add_subplot(gs[0, j]).axis("off")
    fig.text(0.09, 0.80, f"mask of {case.case_id}\n(test case)\nstart slice p = {p}\n\ninformed slices:\nother "
             "cases at the same\nrelative depth  ->", fontsize=7, va="center")
    for m, (name, label) in enumerate(masks):
        views = views_for(case, (centre_of(label)[0],), point=centre_of(label))
        for r, view in enumerate(views[:2]):  # axial through the tumour, coronal through it
            row = 1 + 2 * m + r
            ax = fig.add_subplot(gs[row, 0])
            show(ax, view.take(label), view, mask=True, max_label=store.max_label)
            tag(ax, view.short())
            if r == 0:
                ax.set_ylabel(name, fontsize=7)
            ax = fig.add_subplot(gs[row, 1])
            if m == 0:
                show(ax, view.take(case.image), view)
                if row == 1:
                    ax.set_title("real volume\nof this mask", fontsize=7)
            else:
                ax.axis("off")
                ax.text(0.5, 0.5, "no real volume\n(counterfactual)", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
            for j, image in enumerate(grid[m]):
                ax = fig.add_subplot(gs[row, 2 + j])
                show(ax, view.take(image), view)
    spread = [_row_spread(row, label) for row, (_, label) in zip(grid, masks)]
    inside = case.label >= 0
    to_real = float(np.mean([np.abs(img - case.image)[inside].mean() for img in grid[0]]))
    fig.text(0.5, 0.035, "mean |difference| inside the non-zero region: between the generated volumes of a row "
             f"{spread[0]:.3f} (original mask), {spread[1]:.3f} (counterfactual mask); "
             f"generated vs real (original mask) {to_real:.3f}", ha="center", fontsize=7)
    figure_title(fig, cfg, "Fig. 3 - counterfactual synthesis: the same mask with informed slices of other cases "
                           "(GEM-3D stage 2)")
    label_legend(fig, store.labels, store.max_label)
    paths = save_figure(fig, cfg, "fig3_counterfactual")
    write_json(Paths(cfg).figures / "fig3_counterfactual.json", {
        "mask_case": case.case_id, "start": p, "counterfactual_augmentation": params, "seed": seed,
        "informed": [spec.record() for spec in specs], "volume_seeds": {j.sample_id: j.seed for j in jobs},
        "row_mean_abs_difference": dict(zip(("original", "counterfactual"), spread)),
        "generated_vs_real_mean_abs_difference": to_real,
        "checkpoints": checkpoints, "synthetic_data": cfg.phantoms is not None})
    return paths


def _row_spread(images: list[np.ndarray], label: np.ndarray) -> float:
    """Mean |a - b| over the non-zero region, averaged over all pairs of a row's volumes (0 for one volume)."""
    inside = label >= 0
    pairs = [np.abs(a - b)[inside].mean() for i, a in enumerate(images) for b in images[i + 1:]]
    return float(np.mean(pairs)) if pairs else 0.0
