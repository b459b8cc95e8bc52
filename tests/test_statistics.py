"""gem3d.evaluation.statistics: bootstrap intervals over test cases, seeds pooled per case, paired
differences to the reference row by case id, degenerate data, determinism, rendering."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from gem3d.evaluation.statistics import (
    LONG_COLUMNS,
    bootstrap_interval,
    format_interval,
    long_lines,
    pool_seeds,
    read_long_csv,
    summarise,
    summary_markdown,
    write_long_csv,
    write_summary,
)


def long_table(rows: dict[str, dict[int, dict[str, float]]], region="WT", hd95=None) -> pd.DataFrame:
    """{row: {seed: {case: dice}}} -> the long table (hd95 = 10 * (1 - dice) unless given)."""
    lines = []
    for row, seeds in rows.items():
        for seed, cases in seeds.items():
            for case, dice in cases.items():
                lines.append({"row": row, "seed": seed, "case": case, "region": region, "dice": dice,
                              "hd95": 10 * (1 - dice) if hd95 is None else hd95})
    return pd.DataFrame(lines, columns=list(LONG_COLUMNS))


def cases(values, prefix="case") -> dict[str, float]:
    return {f"{prefix}{i:03d}": float(v) for i, v in enumerate(values)}


# ----------------------------------------------------------------------------- intervals
def test_interval_of_normal_data_covers_the_mean_with_the_textbook_width_and_is_scipys():
    rng = np.random.default_rng(1)
    x = rng.normal(0.8, 0.1, size=400)
    ci = bootstrap_interval(x, confidence=0.95, n_resamples=4999, seed=3)
    assert ci.method == "BCa" and ci.mean == pytest.approx(x.mean())
    assert ci.low < 0.8 < ci.high
    textbook = 2 * scipy.stats.norm.ppf(0.975) * x.std(ddof=1) / math.sqrt(len(x))  # 2 * 1.96 * s / sqrt(n)
    assert ci.high - ci.low == pytest.approx(textbook, rel=0.1)
    direct = scipy.stats.bootstrap((x,), np.mean, n_resamples=4999, confidence_level=0.95, method="BCa",
                                   rng=np.random.default_rng(3)).confidence_interval
    assert (ci.low, ci.high) == (direct.low, direct.high)
    ninety = bootstrap_interval(x, confidence=0.90, n_resamples=4999, seed=3)
    assert ci.low < ninety.low < ninety.high < ci.high


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(150):
        x = rng.normal(0.7, 0.15, size=40)
        ci = bootstrap_interval(x, n_resamples=999, seed=i)
        hits += ci.low <= 0.7 <= ci.high
    assert 0.87 <= hits / 150 <= 0.995, hits  # binomial sd at 95 %: 1.8 %


def test_constant_and_single_values_are_degenerate_but_answered():
    ci = bootstrap_interval([0.5] * 12)
    assert ci == (0.5, 0.5, 0.5, "percentile")
    one = bootstrap_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high) and one.method == "none"
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ValueError):
            bootstrap_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([0.1, 0.2], confidence=95)


def test_constant_rows_summarise_with_the_percentile_method_and_a_zero_difference():
    df = long_table({"real": {0: cases([0.6] * 8)}, "enhanced_1x": {0: cases([0.6] * 8)}}, hd95=4.0)
    summary = summarise(df, n_resamples=999).set_index("row")
    for row in ("real", "enhanced_1x"):
        assert summary.loc[row, "dice_ci_method"] == "percentile"
        assert summary.loc[row, "dice_ci_low"] == summary.loc[row, "dice_ci_high"] == pytest.approx(0.6)
    assert summary.loc["enhanced_1x", "dice_diff"] == 0 and summary.loc["enhanced_1x", "hd95_diff_ci_high"] == 0
    assert not summary.loc["enhanced_1x", "dice_diff_excludes_0"]
    assert summary.loc["real", "dice_diff_ci_method"] == "reference" and math.isnan(summary.loc["real", "dice_diff"])


# ----------------------------------------------------------------------------- pairing by case id
def paired_rows(n=30, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.uniform(0.4, 0.95, size=n)  # wide spread between cases
    better = real + 0.02 + rng.normal(0, 0.005, size=n)  # every case a little better
    return {"real": {0: cases(real)}, "enhanced_1x": {0: cases(better)}}


def test_paired_difference_is_the_bootstrap_of_per_case_differences():
    rows = paired_rows()
    summary = summarise(long_table(rows), n_resamples=1999, seed=5).set_index("row")
    real, better = (np.array(list(rows[r][0].values())) for r in ("real", "enhanced_1x"))
    line = summary.loc["enhanced_1x"]
    assert line["dice_diff"] == pytest.approx(np.mean(better - real))
    direct = scipy.stats.bootstrap((better - real,), np.mean, n_resamples=1999, method="BCa",
                                   rng=np.random.default_rng(5)).confidence_interval
    assert (line["dice_diff_ci_low"], line["dice_diff_ci_high"]) == pytest.approx((direct.low, direct.high))
    assert line["dice_diff_excludes_0"] and line["dice_diff_ci_low"] > 0  # paired: 0.02 is clearly resolved ...
    assert line["dice_ci_low"] < summary.loc["real", "dice_mean"]  # ... though the rows' own intervals overlap
    assert line["hd95_diff"] == pytest.approx(-10 * np.mean(better - real)) and line["hd95_diff_excludes_0"]


def test_pairing_is_by_case_id_not_by_line_order():
    rows = paired_rows()
    df = long_table(rows)
    expected = summarise(df, n_resamples=999)
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    pd.testing.assert_frame_equal(summarise(shuffled, n_resamples=999), expected)
    # the same values with the synthetic row's case ids given in another order: the pairs stay the same
    ids = list(rows["enhanced_1x"][0])
    reordered = {"real": rows["real"], "enhanced_1x": {0: {c: rows["enhanced_1x"][0][c] for c in reversed(ids)}}}
    pd.testing.assert_frame_equal(summarise(long_table(reordered), n_resamples=999), expected)
    # ... whereas relabelling the cases (positional pairing) changes the difference's interval
    relabelled = {"real": rows["real"], "enhanced_1x": {0: dict(zip(ids, reversed(rows["enhanced_1x"][0].values())))}}
    other = summarise(long_table(relabelled), n_resamples=999).set_index("row").loc["enhanced_1x"]
    assert other["dice_diff"] == pytest.approx(expected.set_index("row").loc["enhanced_1x", "dice_diff"])
    assert other["dice_diff_ci_high"] - other["dice_diff_ci_low"] > 5 * (
        expected.set_index("row").loc["enhanced_1x", "dice_diff_ci_high"]
        - expected.set_index("row").loc["enhanced_1x", "dice_diff_ci_low"])


def test_a_row_without_some_reference_cases_is_refused_naming_them():
    rows = paired_rows(n=6)
    rows["enhanced_1x"][0].pop("case004")
    with pytest.raises(ValueError, match=r"row enhanced_1x, region WT: lacks cases case004 that the reference row "
                                         r"real has") as info:
        summarise(long_table(rows), n_resamples=99)
    assert "\n" not in str(info.value)
    rows = paired_rows(n=6)
    rows["enhanced_1x"][0]["case099"] = 0.5
    with pytest.raises(ValueError, match="has cases case099 that the reference row real has not"):
        summarise(long_table(rows), n_resamples=99)
    with pytest.raises(ValueError, match="reference row 'nnunet' is not in the long table"):
        summarise(long_table(paired_rows(n=6)), reference_row="nnunet", n_resamples=99)


def test_without_a_reference_there_are_no_differences():
    summary = summarise(long_table(paired_rows(n=8)), reference_row=None, n_resamples=99)
    assert list(summary["row"]) == ["real", "enhanced_1x"]
    assert summary["dice_diff"].isna().all() and set(summary["dice_diff_ci_method"]) == {"none"}


# ----------------------------------------------------------------------------- seeds
def test_seeds_are_pooled_per_case_before_the_interval_and_spread_over_seeds_is_reported():
    seed0, seed1 = [0.60, 0.70, 0.80, 0.90], [0.70, 0.70, 0.60, 1.00]
    rows = {"real": {0: cases(seed0), 1: cases(seed1)}}
    pooled = pool_seeds(long_table(rows))
    assert list(pooled["dice"]) == pytest.approx([0.65, 0.70, 0.70, 0.95]) and set(pooled["n_seeds"]) == {2}
    line = summarise(long_table(rows), reference_row="real", n_resamples=999, seed=1).iloc[0]
    assert (line["n_cases"], line["n_seeds"]) == (4, 2)
    assert line["dice_mean"] == pytest.approx(0.75)
    direct = scipy.stats.bootstrap((np.array([0.65, 0.70, 0.70, 0.95]),), np.mean, n_resamples=999, method="BCa",
                                   rng=np.random.default_rng(1)).confidence_interval
    assert (line["dice_ci_low"], line["dice_ci_high"]) == pytest.approx((direct.low, direct.high))
    means = [np.mean(seed0), np.mean(seed1)]  # 0.75 each: no spread between seeds
    assert line["dice_seed_std"] == pytest.approx(np.std(means, ddof=1))
    assert (line["dice_seed_min"], line["dice_seed_max"]) == pytest.approx((0.75, 0.75))
    three = {"real": {0: cases(seed0), 1: cases(seed1), 2: cases([0.5] * 4)}}
    line = summarise(long_table(three), n_resamples=99).iloc[0]
    assert line["dice_seed_std"] == pytest.approx(np.std([0.75, 0.75, 0.5], ddof=1))
    assert (line["dice_seed_min"], line["dice_seed_max"], line["n_seeds"]) == pytest.approx((0.5, 0.75, 3))
    one = summarise(long_table({"real": {0: cases(seed0)}}), n_resamples=99).iloc[0]
    assert math.isnan(one["dice_seed_std"]) and one["n_seeds"] == 1


def test_a_seed_missing_cases_of_its_row_is_refused():
    rows = {"real": {0: cases([0.6, 0.7, 0.8]), 1: cases([0.6, 0.7])}}
    with pytest.raises(ValueError, match="row real, region WT: seed 1 lacks cases case002"):
        summarise(long_table(rows), n_resamples=99)


def test_bad_long_tables_are_refused_in_one_line():
    df = long_table(paired_rows(n=4))
    with pytest.raises(ValueError, match=r"lacks columns \['hd95'\]"):
        summarise(df.drop(columns="hd95"))
    nan = df.copy()
    nan.loc[2, "hd95"] = float("nan")
    with pytest.raises(ValueError, match="hd95 is missing or not a finite number in 1 lines"):
        summarise(nan)
    with pytest.raises(ValueError, match="appears more than once"):
        summarise(pd.concat([df, df.iloc[:1]]))


# ----------------------------------------------------------------------------- determinism, regions, files
def test_seeded_and_deterministic():
    df = long_table(paired_rows(n=20, seed=4))
    a, b = summarise(df, n_resamples=999, seed=11), summarise(df, n_resamples=999, seed=11)
    pd.testing.assert_frame_equal(a, b)
    c = summarise(df, n_resamples=999, seed=12)
    assert not np.allclose(a["dice_ci_low"], c["dice_ci_low"])  # the seed drives the resampling
    assert np.allclose(a["dice_mean"], c["dice_mean"])


def test_regions_and_rows_keep_their_order_and_reference_comes_first():
    df = pd.concat([long_table(paired_rows(n=5), region="TC"), long_table(paired_rows(n=5, seed=1), region="WT")])
    df = pd.concat([df[df["row"] == "enhanced_1x"], df[df["row"] == "real"]])
    summary = summarise(df, n_resamples=99)
    assert list(zip(summary["row"], summary["region"])) == [("real", "TC"), ("real", "WT"), ("enhanced_1x", "TC"),
                                                            ("enhanced_1x", "WT")]


def test_long_csv_round_trip_keeps_case_ids_as_text(tmp_path):
    df = long_table({"real": {0: {"007": 0.5, "NA": 0.6, "010": 0.7}}})
    path = write_long_csv(df, tmp_path / "long.csv")
    back = read_long_csv(path)
    assert sorted(back["case"]) == ["007", "010", "NA"] and set(back["seed"]) == {"0"}
    pd.testing.assert_frame_equal(summarise(back, n_resamples=99), summarise(df, n_resamples=99))
    assert [p.name for p in tmp_path.iterdir()] == ["long.csv"]  # written atomically, no leftovers


def test_markdown_rendering(tmp_path):
    assert format_interval(0.8123, 0.7904, 0.8301) == "0.812 [0.790, 0.830]"
    assert format_interval(-0.0131, -0.0302, 0.0041, signed=True) == "-0.013 [-0.030, +0.004]"
    assert format_interval(12.345, float("nan"), float("nan"), 2) == "12.35"
    rows = paired_rows(n=10)
    rows["real"][1] = cases(np.array(list(rows["real"][0].values())) - 0.01)
    summary = summarise(long_table(rows), n_resamples=199)
    text = summary_markdown(summary)
    lines = text.splitlines()
    assert lines[0] == "# Downstream segmentation with intervals"
    header = next(line for line in lines if line.startswith("| training data"))
    for column in ("Dice", "Dice seed sd (min-max)", "Dice difference", "HD95 (mm)", "HD95 (mm) difference"):
        assert f"| {column} |" in header
    real = next(line for line in lines if line.startswith("| real |"))
    line = summary.set_index("row").loc["real"]
    assert f"{line['dice_mean']:.3f} [{line['dice_ci_low']:.3f}, {line['dice_ci_high']:.3f}]" in real
    assert "| reference |" in real and "| 10 x 2 |" in real
    enhanced = next(line for line in lines if line.startswith("| enhanced_1x |"))
    assert "n/a (1 seed)" in enhanced and " *" in enhanced  # the 0.02 gain excludes 0
    assert "paired by case id" in text and "BCa" in text
    csv, md = write_summary(summary, tmp_path / "segmentation_ci.csv")
    assert md.read_text() == text and len(pd.read_csv(csv)) == len(summary)


def test_long_lines_from_per_case_region_scores():
    cases_a = {"c1": {"WT": {"dice": 0.8, "hd95": 3.0, "n_pred": 10}, "TC": {"dice": 0.5, "hd95": 7.0}},
               "c2": {"WT": {"dice": 0.9, "hd95": 2.0}, "TC": {"dice": 0.6, "hd95": 6.0}}}
    df = pd.concat([long_lines("real", 0, cases_a), long_lines("real", 1, cases_a)])
    assert list(df.columns) == list(LONG_COLUMNS) and len(df) == 8
    line = df[(df["seed"] == 1) & (df["case"] == "c2") & (df["region"] == "TC")].iloc[0]
    assert (line["dice"], line["hd95"]) == (0.6, 6.0)
    summary = summarise(df, n_resamples=99).set_index("region")
    assert summary.loc["WT", "dice_mean"] == pytest.approx(0.85) and summary.loc["TC", "n_seeds"] == 2
