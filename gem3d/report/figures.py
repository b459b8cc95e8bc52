"""The paper's qualitative figures from generated sets and the real data (slice space).

    fig2_comparison        Fig. 2(b): test masks -> real, baseline (mask only), GEM-3D (true informed slice)
    fig4_deenhancement     Fig. 4: real training volumes of several scanners vs the "deenhanced" set
    fig5_overlap_ablation  Fig. 5: three consecutive slices across a window boundary, with / without pinning
    fig6_stage2_ablation   Fig. 6: coronal / sagittal views, stage 1 only vs stage 2 (volumetric tuning)
    fig7_samples           Fig. 7: generated axial slices beside their mask slices, training cases x the sets of
                           `sampling.sets` (training masks, and augmented masks for the sets that augment)

Grey levels are drawn on the fixed range [-1, 1] in every panel (no per-panel rescaling), so
brightness differences between panels are real differences of the arrays. Masks are drawn in one
colour map with one label legend in every figure (common.mask_cmap, common.label_legend).
"""

from __future__ import annotations

import logging

import numpy as np

from gem3d.config import Config
from gem3d.io import InputError
from gem3d.report.common import (
    Case,
    Store,
    View,
    axial_pair,
    centre_of,
    common_cases,
    consecutive_difference,
    figure_title,
    label_legend,
    open_set,
    pick_by_scanner,
    plt,
    save_figure,
    scanner_ids,
    show,
    tag,
    views_for,
)
from gem3d.sampling.sets import DEENHANCE, TEST_TRUE, TRAIN_MASKS
from gem3d.sampling.windows import plan_windows

log = logging.getLogger("gem3d.report")

SET_TITLES = {"test_no_overlap": "w/o overlapped inpainting", "test_no_stage2": "w/o volumetric tuning\n(stage 1 only)"}


def _block_header(fig, cell, text: str, size: float = 9) -> None:
    pos = cell.get_position(fig)
    fig.text(pos.x0 + pos.width / 2, pos.y1 + 0.004, text, ha="center", va="bottom", fontsize=size)


def _row_label(fig, cell, text: str, size: float = 8) -> None:
    pos = cell.get_position(fig)
    fig.text(pos.x0 - 0.008, pos.y0 + pos.height / 2, text, ha="right", va="center", fontsize=size, rotation=90)


def _mark_axial(ax, view: View, axial: tuple[int, ...]) -> None:
    """Dashed lines on a coronal / sagittal view at the axial slices shown beside it."""
    if view.plane != "axial":
        for k in axial:
            ax.axhline(k, color="cyan", lw=0.6, ls="--")


def _boundaries(depth: int, n: int, p: int, overlap: int) -> list[tuple[int, int, str]]:
    """(lower, upper, direction) slice pairs where a later window's new slices meet earlier ones.

    direction "up": the slices <= lower come from the earlier window; "down": the slices >= upper do.
    """
    pairs = []
    for rnd in plan_windows(depth, n, p, overlap)[1:]:
        for w in rnd.windows:
            if not w.new_slices:
                continue
            if w.direction == "up":
                pairs.append((min(w.new_slices) - 1, min(w.new_slices), "up"))
            else:
                pairs.append((max(w.new_slices), max(w.new_slices) + 1, "down"))
    return sorted(pairs)


def _profile(ax, curves: list[tuple[str, np.ndarray, str, list | None]], chosen=None) -> None:
    """Consecutive-slice difference vs slice index; each generated curve's window boundaries dotted in its colour."""
    for _, _, colour, bounds in curves:
        for lo, _, _ in bounds or ():
            ax.axvline(lo + 0.5, color=colour, lw=0.7, ls=":", alpha=0.8)
    if chosen is not None:
        ax.axvspan(chosen[0] - 0.5, chosen[1] + 0.5, color="orange", alpha=0.25, lw=0)
    for name, values, colour, _ in curves:
        ax.plot(np.arange(len(values)) + 0.5, values, color=colour, lw=1.1, label=name)
    ax.set_xlabel("slice k (boundary k|k+1 at k+0.5)", fontsize=7)
    ax.set_ylabel("mean |slice k+1 - slice k|", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, frameon=False, loc="upper left")


def _mark_start(ax, p: int, view: View) -> None:
    """A cyan arrowhead at slice p on the left edge of a coronal / sagittal view."""
    if view.plane != "axial":
        ax.plot([0], [p], marker=">", color="cyan", ms=4, clip_on=False, transform=ax.get_yaxis_transform())


def _start(volumes, cid: str) -> int:
    entry = volumes.first(cid)
    if "start" not in entry:
        raise InputError(f"{volumes.root / 'manifest.json'}: volume {entry['sample_id']} does not record its start "
                         "slice p ('start')")
    return int(entry["start"])


def fig2_comparison(cfg: Config, n_cases: int = 3) -> list:
    """Rows: test cases. Column blocks: mask, real, the methods of the run's registry entries with a Fig. 2 title
    (baseline, 3D Pix2Pix, 3D LDM, ...: gem3d.sampling.sets.figure_sets), GEM-3D; per block 2 axial + coronal +
    sagittal."""
    from gem3d.sampling.sets import figure_sets

    store = Store(cfg)
    columns = figure_sets(cfg)
    sets = [open_set(cfg, name, TEST_TRUE) for name in columns]
    cases = common_cases(sets, store, "test", n_cases)
    titles = ["Mask", "Real"] + [columns[s.name] for s in sets]
    ncol, nrow = len(titles), len(cases)
    fig = plt.figure(figsize=(2.35 * ncol + 0.6, 2.45 * nrow + 1.3))
    outer = fig.add_gridspec(nrow, ncol, left=0.06, right=0.99, top=1 - 0.95 / fig.get_figheight(),
                             bottom=0.35 / fig.get_figheight(), wspace=0.06, hspace=0.16)
    s = store.store.slice_size
    for i, cid in enumerate(cases):
        real = store.load(cid)
        p = sets[-1].first(cid).get("start")
        axial = axial_pair(real.label, avoid=p)
        views = views_for(real, axial)
        vols = [("mask", real.label), ("real", real.image)] + [(x.name, x.load(x.first(cid), s)[0]) for x in sets]
        for j, (kind, vol) in enumerate(vols):
            inner = outer[i, j].subgridspec(2, 2, wspace=0.03, hspace=0.03)
            for k, view in enumerate(views):
                ax = fig.add_subplot(inner[k // 2, k % 2])
                show(ax, view.take(vol), view, mask=kind == "mask", max_label=store.max_label)
                if j == 0:
                    tag(ax, view.short())
                    _mark_axial(ax, view, axial)
            if i == 0:
                _block_header(fig, outer[0, j], titles[j])
        _row_label(fig, outer[i, 0], f"{cid}\ninformed slice p = {p}")
    figure_title(fig, cfg, "Fig. 2 - test masks: real vs baseline vs GEM-3D (two axial, coronal, sagittal views)")
    label_legend(fig, store.labels, store.max_label)
    return save_figure(fig, cfg, "fig2_comparison")


def fig4_deenhancement(cfg: Config, n_cases: int = 6) -> list:
    """Columns: the fixed informed slice, then training cases (by scanner). Rows: real / de-enhanced, histograms."""
    store = Store(cfg)
    de = open_set(cfg, "deenhanced", DEENHANCE)
    scanners = scanner_ids(cfg)
    cases = pick_by_scanner(common_cases([de], store, "train", 10 ** 6), scanners, n_cases)
    informed = de.first(cases[0]).get("informed", {})
    if "case" not in informed or "slice" not in informed:
        raise InputError(f"{de.root / 'manifest.json'}: volume {de.first(cases[0])['sample_id']} does not record "
                         "its fixed informed slice (informed.case / informed.slice)")
    ref = store.load(informed["case"])
    s = store.store.slice_size
    ncol = len(cases) + 1
    fig = plt.figure(figsize=(1.55 * ncol + 0.5, 8.4))
    gs = fig.add_gridspec(4, ncol, height_ratios=[1, 1, 0.8, 0.8], left=0.05, right=0.99, top=0.885,
                          bottom=0.31, wspace=0.05, hspace=0.12)
    hist_gs = fig.add_gridspec(1, 2, left=0.07, right=0.98, top=0.24, bottom=0.06, wspace=0.12)
    rows = ["real (axial)", "de-enhanced (axial)", "real (coronal)", "de-enhanced (coronal)"]
    ref_view = views_for(ref, (int(informed["slice"]),))[0]
    ax = fig.add_subplot(gs[0, 0])
    show(ax, ref_view.take(ref.image), ref_view)
    ax.set_title(f"fixed informed slice\n{informed['case']}:{informed['slice']}"
                 + (f" (scanner {scanners[informed['case']]})" if informed["case"] in scanners else ""), fontsize=7)
    for r in range(1, 4):
        fig.add_subplot(gs[r, 0]).axis("off")
    medians = {"real": [], "de-enhanced": []}
    hist_real, hist_de = fig.add_subplot(hist_gs[0, 0]), fig.add_subplot(hist_gs[0, 1])
    colours = plt.get_cmap("tab10")
    bins = np.linspace(-1, 1, 61)
    for j, cid in enumerate(cases, start=1):
        real = store.load(cid)
        gen, _ = de.load(de.first(cid), s)
        z, _, _ = centre_of(real.label)
        views = views_for(real, (z,))
        for r, (vol, view) in enumerate([(real.image, views[0]), (gen, views[0]), (real.image, views[1]),
                                         (gen, views[1])]):
            ax = fig.add_subplot(gs[r, j])
            show(ax, view.take(vol), view)
            if r == 0:
                sid = scanners.get(cid)
                ax.set_title(cid + ("" if sid is None else f"\nscanner {sid}"), fontsize=7)
            if j == 1:
                ax.set_ylabel(rows[r], fontsize=7)
        inside = real.label >= 0
        sid = scanners.get(cid, j - 1)
        for ax, vol, key in ((hist_real, real.image, "real"), (hist_de, gen, "de-enhanced")):
            values = vol[inside]
            medians[key].append(float(np.median(values)))
            ax.hist(values, bins=bins, density=True, histtype="step", color=colours(sid % 10), lw=1,
                    label=f"{cid}" + ("" if cid not in scanners else f" (scanner {sid})"))
    for ax, key in ((hist_real, "real"), (hist_de, "de-enhanced")):
        ax.set_title(f"{key} volumes: intensity histograms in the non-zero region\n"
                     f"spread of the cases (std of per-case medians) = {np.std(medians[key]):.3f}", fontsize=7.5)
        ax.set_xlabel("intensity (slice-store scale [-1, 1])", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    hist_real.legend(fontsize=5.5, frameon=False, loc="upper left")
    figure_title(fig, cfg, "Fig. 4 - de-enhancement: every training mask generated with ONE fixed informed slice")
    return save_figure(fig, cfg, "fig4_deenhancement")


def fig5_overlap_ablation(cfg: Config, n_cases: int = 2) -> list:
    """Per case: rows real / without / with overlapped inpainting; three consecutive slices across a boundary.

    The boundary is one of the window plan of the volume WITHOUT overlapped inpainting (where a seam
    would show). Each set draws its own start slice p, so the GEM-3D volume's boundaries lie at the
    same place only when both p agree (given per row).
    """
    store = Store(cfg)
    with_oi, without = open_set(cfg, "test_gem3d", TEST_TRUE), open_set(cfg, "test_no_overlap", TEST_TRUE)
    n, overlap = cfg.volume_model.window, cfg.sampling.overlap
    s = store.store.slice_size
    picked = []
    for cid in common_cases([with_oi, without], store, "test", 10 ** 6):
        real = store.load(cid)
        d = real.label.shape[0]
        p_no, p_oi = _start(without, cid), _start(with_oi, cid)
        pairs = _boundaries(d, n, p_no, overlap)
        if pairs:
            score = [(real.label[lo] >= 0).sum() + (real.label[hi] >= 0).sum() + 3 * (real.label[lo:hi + 1] > 0).sum()
                     for lo, hi, _ in pairs]
            picked.append((cid, real, (p_no, p_oi), (pairs, _boundaries(d, n, p_oi, overlap)),
                           pairs[int(np.argmax(score))]))
        if len(picked) == n_cases:
            break
    if not picked:
        raise InputError(f"test volumes of {without.root} fit in one {n}-slice window: no window boundary to show")
    fig = plt.figure(figsize=(8.2, 4.1 * len(picked) + 1.2))
    outer = fig.add_gridspec(len(picked), 2, width_ratios=[3, 2.3], left=0.1, right=0.985,
                             top=1 - 1.0 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(), wspace=0.22,
                             hspace=0.3)
    for i, (cid, real, (p_no, p_oi), (pairs_no, pairs_oi), (lo, hi, direction)) in enumerate(picked):
        d = real.label.shape[0]
        # two slices of the later window and one of the earlier one, when the volume allows
        if direction == "up":
            triple = [lo, hi, hi + 1] if hi + 1 < d else [lo - 1, lo, hi]
        else:
            triple = [lo - 1, lo, hi] if lo >= 1 else [lo, hi, hi + 1]
        view = views_for(real, triple)[:3]
        vols = [("real", real.image),
                (f"w/o overlapped\ninpainting (p = {p_no})", without.load(without.first(cid), s)[0]),
                (f"with overlapped inp.\n(GEM-3D, p = {p_oi})", with_oi.load(with_oi.first(cid), s)[0])]
        inner = outer[i, 0].subgridspec(3, 3, wspace=0.03, hspace=0.05)
        for r, (name, vol) in enumerate(vols):
            for c, v in enumerate(view):
                ax = fig.add_subplot(inner[r, c])
                show(ax, v.take(vol), v)
                if r == 0:
                    earlier = v.index <= lo if direction == "up" else v.index >= hi
                    ax.set_title(f"slice {v.index}\n({'earlier' if earlier else 'later'} window)", fontsize=7)
                if c == 0:
                    ax.set_ylabel(name, fontsize=7)
        pos = outer[i, 0].get_position(fig)
        fig.text(pos.x0 - 0.07, pos.y0 + pos.height / 2, cid, rotation=90, fontsize=8, ha="center", va="center")
        ax = fig.add_subplot(outer[i, 1])
        _profile(ax, [("real", consecutive_difference(real.image, real.label), "0.3", None),
                      ("w/o overlapped inpainting", consecutive_difference(vols[1][1], real.label), "tab:red",
                       pairs_no),
                      ("with overlapped inpainting", consecutive_difference(vols[2][1], real.label), "tab:blue",
                       pairs_oi)], chosen=(lo, hi))
        ax.set_title(f"{cid}: change between consecutive slices\ndotted: window boundaries of each volume; "
                     "orange: shown", fontsize=7)
    figure_title(fig, cfg, f"Fig. 5 - overlapped inpainting ablation (window n = {n}, overlap = {overlap})")
    return save_figure(fig, cfg, "fig5_overlap_ablation")


def fig6_stage2_ablation(cfg: Config, n_cases: int = 3) -> list:
    """Per case: coronal and sagittal rows; columns mask, real, stage 1 only, stage 2; difference profile."""
    store = Store(cfg)
    st2, st1 = open_set(cfg, "test_gem3d", TEST_TRUE), open_set(cfg, "test_no_stage2", TEST_TRUE)
    cases = common_cases([st2, st1], store, "test", n_cases)
    n, overlap = cfg.volume_model.window, cfg.sampling.overlap
    s = store.store.slice_size
    titles = ["Mask", "Real", SET_TITLES["test_no_stage2"], "GEM-3D\n(stage 2: volumetric tuning)"]
    fig = plt.figure(figsize=(10.0, 2.7 * len(cases) + 1.4))
    outer = fig.add_gridspec(len(cases), 2, width_ratios=[4, 1.9], left=0.06, right=0.985,
                             top=1 - 1.15 / fig.get_figheight(), bottom=0.85 / fig.get_figheight(), wspace=0.2,
                             hspace=0.42)
    for i, cid in enumerate(cases):
        real: Case = store.load(cid)
        d = real.label.shape[0]
        p1, p2 = _start(st1, cid), _start(st2, cid)
        views = views_for(real, ())
        vols = [("mask", real.label, None), ("real", real.image, None),
                ("st1", st1.load(st1.first(cid), s)[0], p1), ("st2", st2.load(st2.first(cid), s)[0], p2)]
        inner = outer[i, 0].subgridspec(2, 4, wspace=0.03, hspace=0.05)
        for r, view in enumerate(views):
            for c, (kind, vol, p) in enumerate(vols):
                ax = fig.add_subplot(inner[r, c])
                show(ax, view.take(vol), view, mask=kind == "mask", max_label=store.max_label)
                if c == 0:
                    tag(ax, view.short())
                if p is not None:
                    _mark_start(ax, p, view)
                    if r == 0:
                        tag(ax, f"p = {p}")
                if i == 0 and r == 0:
                    ax.set_title(titles[c], fontsize=8)
        _row_label(fig, outer[i, 0], cid)
        ax = fig.add_subplot(outer[i, 1])
        _profile(ax, [("real", consecutive_difference(real.image, real.label), "0.3", None),
                      ("stage 1 only", consecutive_difference(vols[2][1], real.label), "tab:red",
                       _boundaries(d, n, p1, overlap)),
                      ("stage 2", consecutive_difference(vols[3][1], real.label), "tab:blue",
                       _boundaries(d, n, p2, overlap))])
        ax.set_title(f"{cid}: change between consecutive slices\ndotted: window boundaries of each volume",
                     fontsize=7)
    figure_title(fig, cfg, "Fig. 6 - volumetric tuning ablation: coronal / sagittal consistency, stage 1 vs stage 2")
    label_legend(fig, store.labels, store.max_label)
    return save_figure(fig, cfg, "fig6_stage2_ablation")


def _set_header(cfg: Config, name: str) -> str:
    spec = cfg.sampling.sets[name]
    informed = {"IC": "informed slice of another case", "IG": "generated informed slice"}.get(spec["informed"],
                                                                                             spec["informed"])
    return f"{name}\n{'augmented' if spec.get('augment') else 'training'} masks, {informed}"


def fig7_samples(cfg: Config, n_cases: int = 4) -> list:
    """Rows: training cases. Column pairs: the sets of `sampling.sets` (mask slice, generated slice), each at the
    axial slice of its mask with the largest labelled area (an augmented mask has its own)."""
    store = Store(cfg)
    sets = [open_set(cfg, name, TRAIN_MASKS) for name in cfg.sampling.sets]
    cases = common_cases(sets, store, "train", n_cases)
    s = store.store.slice_size
    ncol, nrow = 2 * len(sets), len(cases)
    fig = plt.figure(figsize=(1.45 * ncol + 0.6, 1.55 * nrow + 1.5))
    outer = fig.add_gridspec(nrow, len(sets), left=0.05, right=0.99, top=1 - 1.05 / fig.get_figheight(),
                             bottom=0.4 / fig.get_figheight(), wspace=0.08, hspace=0.1)
    for i, cid in enumerate(cases):
        real = store.load(cid)
        for j, sample_set in enumerate(sets):
            entry = sample_set.first(cid)
            image, label = sample_set.load(entry, s)
            view = views_for(Case(cid, image, label, real.geometry), (axial_pair(label)[0],))[0]
            inner = outer[i, j].subgridspec(1, 2, wspace=0.03)
            for k, (vol, is_mask) in enumerate(((label, True), (image, False))):
                ax = fig.add_subplot(inner[0, k])
                show(ax, view.take(vol), view, mask=is_mask, max_label=store.max_label)
                if k == 0:
                    tag(ax, view.short())
                if i == 0:
                    ax.set_title("mask" if is_mask else "generated", fontsize=7)
            if i == 0:
                pos = outer[0, j].get_position(fig)
                fig.text(pos.x0 + pos.width / 2, pos.y1 + 0.36 / fig.get_figheight(), _set_header(cfg, sample_set.name),
                         ha="center", va="bottom", fontsize=7.5)
        _row_label(fig, outer[i, 0], cid, size=7)
    figure_title(fig, cfg, "Fig. 7 - generated slices beside their mask slices (training and augmented masks)")
    label_legend(fig, store.labels, store.max_label)
    return save_figure(fig, cfg, "fig7_samples")
