"""The informed-slice fit guard: outline Dice and tumour share, the IC candidate order, manifests."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from gem3d.config import InformedFitConfig
from gem3d.data.slice_store import SliceStore
from gem3d.io import read_json
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeSampler
from gem3d.sampling.informed import (
    InformedSpec,
    StoreOutlines,
    choose_fitting,
    score_informed,
    slice_fit,
)
from gem3d.sampling.sample_sets import build_jobs, merge_shards, sample_set
from gem3d.sampling.sets import set_spec

GUARD = InformedFitConfig(min_dice=0.8, max_tumour_outside=0.1, max_tries=5)


def disc(size=32, centre=(16, 16), radius=10):
    y, x = np.mgrid[:size, :size]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 < radius**2


def mask_slice(outline, tumour):
    """Labels of a mask slice: -1 outside ``outline``, 1 on ``tumour``, 0 elsewhere inside."""
    return np.where(outline, np.where(tumour, 1, 0), -1).astype(np.int8)


def fit_of(outline, target):
    """slice_fit with the mask's body outline as on MRI: its non-zero region (label != -1)."""
    return slice_fit(outline, target, target != -1)


# ---- the fit ---------------------------------------------------------------------------------
def test_fit_of_identical_outlines_is_one_and_of_disjoint_ones_zero():
    head = disc()
    target = mask_slice(head, disc(radius=3))
    same = fit_of(head, target)
    assert same.dice == 1.0 and same.tumour_outside == 0.0 and same.passes(GUARD)
    apart = fit_of(disc(centre=(5, 5), radius=3), mask_slice(disc(centre=(25, 25), radius=4),
                                                                  disc(centre=(25, 25), radius=2)))
    assert apart.dice == 0.0 and apart.tumour_outside == 1.0 and not apart.passes(GUARD)
    # half the outline: Dice 2 * |A| / (|A| + |B|) with A inside B; a tumour on the missing half is outside
    left = head & (np.mgrid[:32, :32][1] < 16)
    half = fit_of(left, mask_slice(head, disc(centre=(16, 22), radius=3)))
    assert half.dice == pytest.approx(2 * left.sum() / (left.sum() + head.sum()))
    assert half.tumour_outside == 1.0
    assert fit_of(head, mask_slice(head, np.zeros_like(head))).tumour_outside == 0.0  # no tumour on the slice
    with pytest.raises(ValueError, match="differ in size"):
        fit_of(head[:8], target)


def test_guard_rejects_a_candidate_that_does_not_fit_and_records_it():
    head = disc()
    target = mask_slice(head, disc(radius=3))
    outlines = {("shifted", 0): disc(centre=(9, 9)), ("small", 0): disc(radius=5), ("good", 0): disc(radius=11)}
    cands = [InformedSpec("IC", c, 0) for c in ("shifted", "small", "good")]
    look = lambda case, index: outlines[(case, index)]  # noqa: E731
    chosen, record = choose_fitting(cands, target, target != -1, look, GUARD)
    assert chosen.case == "good" and record["rejected"] == 2 and record["passed"] is True
    assert record["dice"] >= 0.8 and record["tumour_outside"] == 0.0
    # none passes: the best of them, all counted as rejected
    chosen, record = choose_fitting(cands[:2], target, target != -1, look, GUARD)
    assert chosen.case == "small" and record == {**fit_of(outlines[("small", 0)], target).record(),
                                                 "rejected": 2, "passed": False}
    # off: the first candidate, scored only
    chosen, record = choose_fitting(cands, target, target != -1, look, InformedFitConfig())
    assert chosen.case == "shifted" and record["rejected"] == 0 and record["passed"] is None
    assert record["dice"] == round(fit_of(outlines[("shifted", 0)], target).dice, 4)


def test_a_users_image_is_scored_and_a_misfit_warned_in_one_line(caplog):
    head = disc()
    target = mask_slice(head, disc(radius=3))
    image = torch.where(torch.from_numpy(disc(centre=(9, 9))), 0.3, -1.0)[None, None]  # (1, 1, s, s)
    spec = InformedSpec("user", slice=2, path="user.nii.gz")
    with caplog.at_level(logging.WARNING, logger="gem3d.sampling"):
        fit = score_informed(spec, None, target, target != -1, GUARD, image)
    assert fit == fit_of(disc(centre=(9, 9)), target) and fit.dice < 0.8
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning and "user.nii.gz" in warning and f"Dice {fit.dice:.3f}" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gem3d.sampling"):
        score_informed(spec, None, target, target != -1, InformedFitConfig(), image)  # guard off: no warning
        fitting = torch.where(torch.from_numpy(head), 0.3, -1.0)[None, None]
        score_informed(spec, None, target, target != -1, GUARD, fitting)
    assert not caplog.records
    generated = InformedSpec("IG", position=0.5)
    assert score_informed(generated, None, target, target != -1, GUARD) is None  # generated: no outline


def test_config_fit_section():
    from conftest import TINY_CONFIG

    from gem3d.config import config_from_dict
    from gem3d.io import InputError

    def config(**fit):
        return config_from_dict({**TINY_CONFIG, "sampling": {**TINY_CONFIG["sampling"], "fit": fit}},
                                source="tiny.yaml", check_paths=False)

    assert config().sampling.fit == InformedFitConfig(min_dice=None, max_tumour_outside=0.1, max_tries=20)
    assert config(min_dice=0.85, max_tries=5).sampling.fit == InformedFitConfig(0.85, 0.1, 5)
    with pytest.raises(InputError, match="sampling.fit.min_dice"):
        config(min_dice=1.5)
    with pytest.raises(InputError, match="sampling.fit"):
        config(min_dise=0.8)


# ---- IC draws on a run -----------------------------------------------------------------------
def with_fit(cfg, **fit):
    return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, fit=InformedFitConfig(**fit)))


def draws(cfg, name):
    store = SliceStore(Paths(cfg).slices)
    return build_jobs(cfg, set_spec(cfg, name), store, VolumeSampler(cfg)), store


@pytest.mark.parametrize("name", ["IC", "IC_MA", "IC_copy1"])
def test_guard_changes_only_the_informed_slice(in_run, name):
    """Off: the blind draw, its fit recorded. A guard every slice passes: the same draws. A strict guard:
    the same starts, masks, augmentation and seeds; misfits replaced and counted."""
    off, store = draws(in_run, name)
    assert all(j.extra["fit"]["rejected"] == 0 and j.extra["fit"]["passed"] is None for j in off)
    lenient, _ = draws(with_fit(in_run, min_dice=0.0, max_tumour_outside=1.0), name)
    strict, _ = draws(with_fit(in_run, min_dice=1.0, max_tumour_outside=0.0, max_tries=3), name)
    outlines = StoreOutlines(store)
    for a, b, c in zip(off, lenient, strict):
        assert a.informed == b.informed and b.extra["fit"]["rejected"] == 0 and b.extra["fit"]["passed"]
        for other in (b, c):
            assert (a.start, a.seed, a.augmentation) == (other.start, other.seed, other.augmentation)
            assert np.array_equal(a.label, other.label)
        fit_a = fit_of(outlines(a.informed.case, a.informed.slice), a.label[a.start])
        assert a.extra["fit"] == {**fit_a.record(), "rejected": 0, "passed": None}
        assert c.informed.case != c.source_case and c.extra["fit"]["rejected"] >= 1  # no phantom slice fits exactly
        score = lambda f: f["dice"] * (1 - f["tumour_outside"])  # noqa: E731
        assert score(c.extra["fit"]) >= score(a.extra["fit"]) - 1e-3  # the best candidate, the blind draw among them


def test_guard_takes_the_first_fitting_candidate(in_run):
    off, store = draws(in_run, "IC")
    worst = min(off, key=lambda j: j.extra["fit"]["dice"])
    threshold = worst.extra["fit"]["dice"] + 1e-3  # the blind draw of this volume fails it
    guarded, _ = draws(with_fit(in_run, min_dice=threshold, max_tumour_outside=1.0), "IC")
    job = next(j for j in guarded if j.sample_id == worst.sample_id)
    assert job.informed != worst.informed and job.extra["fit"]["rejected"] >= 1
    assert job.extra["fit"]["passed"] is False or job.extra["fit"]["dice"] >= threshold


def test_manifest_records_the_fit_and_the_solver(in_run):
    cfg = with_fit(in_run, min_dice=1.0, max_tumour_outside=0.0, max_tries=2)
    sets = {**cfg.sampling.sets, "IC_guarded": {"informed": "IC"}}  # a set of its own in the shared run
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, sets=sets))
    manifest = read_json(sample_set(cfg, "IC_guarded") / "manifest.json")
    for entry in manifest["volumes"]:
        assert entry["fit"]["rejected"] == 2 and entry["fit"]["passed"] is False
        assert 0.0 <= entry["fit"]["dice"] < 1.0
        assert entry["sampler"] == {"solver": "ddim", "steps": in_run.sampling.steps, "eta": in_run.sampling.eta}


def test_fit_guard_draws_score_both_choices_and_draw_the_failure_figure(in_run):
    """gem3d/report/informed_fit.py (the report's failure-case figure and scripts/bench_fit_guard.py): per draw
    the blind IC candidate's fit (recorded as slice_fit computes it) and the guard's choice, never worse; the
    figure is written."""
    from gem3d.report.informed_fit import fit_draws, fit_summary, informed_fit

    store = SliceStore(Paths(in_run).slices)
    fit = InformedFitConfig(min_dice=0.99, max_tumour_outside=0.0, max_tries=4)
    rows = fit_draws(in_run, store, 3, fit)
    assert len(rows) == 3 * len(store.case_ids("train"))
    outlines = StoreOutlines(store)
    score = lambda f: f["dice"] * (1 - f["tumour_outside"])  # noqa: E731
    for r in rows:
        label = store.load(r["case"]).label
        blind = fit_of(outlines(r["blind"].case, r["blind"].slice), label[r["start"]])
        assert r["blind_fit"]["dice"] == blind.record()["dice"] and r["blind"].case != r["case"]
        assert score(r["guarded_fit"]) >= score(r["blind_fit"]) - 1e-3
    assert any(r["guarded"] != r["blind"] for r in rows)  # the strict guard replaces some blind draws
    mean = np.mean([r["blind_fit"]["dice"] for r in rows])
    assert f"outline Dice mean {mean:.3f}" in fit_summary(rows, "blind_fit", fit)
    paths = informed_fit(in_run)
    assert [p.name for p in paths] == ["informed_fit.png", "informed_fit.pdf"] and all(p.stat().st_size for p in paths)


def test_pooled_fid_of_one_set_is_its_table_row_and_the_script_prints_it(in_run, capsys):
    """The fit-guard FID on pooled copies (scripts/bench_fit_guard.py --fid) is Table 1's FID for one set."""
    import importlib.util
    import sys

    from conftest import REPO
    from gem3d.evaluation.quality import generation_quality, pooled_fid
    from gem3d.evaluation.stages import load_extractor
    from gem3d.sampling.sets import TRAIN_MASKS, SampleSet

    sample_set(in_run, "IC")
    merge_shards(in_run, "IC", 1)
    store = SliceStore(Paths(in_run).slices)
    extractor, description = load_extractor(in_run)
    ic = SampleSet.open(in_run, "IC", TRAIN_MASKS)
    row = generation_quality(store, [ic], extractor, description, 8).iloc[0]
    fid, n = pooled_fid(store, [ic], extractor, 8)
    assert n == len(ic.volumes) == row["n_volumes"]
    assert (fid["axial"], fid["coronal"], fid["sagittal"]) == pytest.approx((row["FID-A"], row["FID-C"], row["FID-S"]))
    spec = importlib.util.spec_from_file_location("bench_fit_guard", REPO / "scripts" / "bench_fit_guard.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    script.fid_report(in_run, store, ["IC"])
    out = capsys.readouterr().out
    assert f"FID-A {row['FID-A']:.4f}" in out and f"informed slices ({len(ic.volumes)})" in out


def test_failure_figure_shows_each_mask_slice_once(in_run):
    """Two draws can land on the same mask slice; the figure's five rows are five different mask slices."""
    from gem3d.report import informed_fit as F

    store = SliceStore(Paths(in_run).slices)
    rows = F.fit_draws(in_run, store, 3, GUARD)
    worst = min(rows, key=lambda r: r["blind_fit"]["dice"])
    rows = [dict(worst) for _ in range(3)] + rows  # the worst mask slice drawn three more times
    fig = F.worst_pairs_figure(rows, store, in_run.max_label)
    shown = [ax.get_title() for ax in fig.axes[::3]]  # the mask panel of each row
    F.plt.close(fig)
    assert len(shown) == F.WORST and len(set(shown)) == F.WORST
