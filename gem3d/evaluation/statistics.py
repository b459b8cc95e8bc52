"""Downstream statistics: bootstrap intervals over test cases, spread over seeds, paired differences.

Input is one long table, one line per (row, seed, case, region) (`LONG_COLUMNS`): ``row`` names the
training data (``real``, ``enhanced_1x``, ...), ``seed`` the seed of one training of it, ``case`` a
test case id, ``region`` an evaluation region (WT/TC/ET, or one label), and ``dice`` / ``hd95`` the
scores of that training on that case. `write_long_csv` / `read_long_csv` keep it as a CSV, so every
summary can be recomputed from the file.

`summarise` gives one line per row x region:

- **pooling of seeds per case**: the per-case value of a row is the mean over its seeds of that
  case's scores (every seed of a row must score the same cases); the row's mean is the mean over
  cases of these per-case values;
- **interval over test cases**: a bootstrap (``scipy.stats.bootstrap``) of that mean over the
  per-case values, method BCa; where BCa is degenerate (all values equal, or scipy cannot compute
  its acceleration) the percentile method, named in the ``*_ci_method`` column (all values equal: the
  interval is that value, method percentile); fewer than 2 cases: no interval (NaN, method ``none``);
- **spread over seeds**: the mean over cases of each seed's scores ("per-seed means"), and their
  standard deviation (ddof 1; NaN with one seed), minimum and maximum;
- **paired difference to the reference row**: per case, the row's per-case value minus the
  reference's (pairing BY CASE ID, never by position), and a bootstrap interval of the mean
  difference; ``*_diff_excludes_0`` says whether that interval excludes 0. Every row must be scored
  on exactly the reference's cases in every region: a row that lacks some (or has others) is
  refused with a ValueError naming the row and the case ids.

Every bootstrap draws from ``numpy.random.default_rng(seed)``, started afresh for each interval
from values sorted by case id: the same input gives the same numbers whatever its line order.

`summary_markdown` renders the summary in the style of the result tables (gem3d.evaluation.tables):
``0.812 [0.790, 0.830]`` for a mean and its interval, ``-0.013 [-0.030, +0.004]`` for a difference.

Only numpy, pandas and scipy are imported (and gem3d.io / gem3d.evaluation.tables, which need no more).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from gem3d.evaluation.tables import markdown_document
from gem3d.io import atomic_path

KEYS = ("row", "seed", "case", "region")
METRICS = ("dice", "hd95")
LONG_COLUMNS = KEYS + METRICS
DECIMALS = {"dice": 3, "hd95": 2}  # digits after the point in the markdown rendering (hd95 in mm)
LABELS = {"dice": "Dice", "hd95": "HD95 (mm)"}


class Interval(NamedTuple):
    """A mean and its bootstrap interval; ``method``: "BCa", "percentile" or "none" (fewer than 2 values)."""

    mean: float
    low: float
    high: float
    method: str


# ----------------------------------------------------------------------------- the long table
def check_long(long_df: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """The long table with its key columns as strings and metrics as floats; ValueError (one line) when a
    column is missing, a metric value is not a finite number, or a (row, seed, case, region) appears twice."""
    missing = [c for c in (*KEYS, *metrics) if c not in long_df.columns]
    if missing:
        raise ValueError(f"long table lacks columns {missing}; expected {list(KEYS) + list(metrics)}")
    if long_df.empty:
        raise ValueError("long table has no lines")
    df = long_df.loc[:, [*KEYS, *metrics]].copy()
    for key in KEYS:
        if df[key].isna().any():
            first = int(df[key].isna().to_numpy().argmax())
            raise ValueError(f"long table: column {key} has empty values (line {first})")
        df[key] = df[key].astype(str)
    for metric in metrics:
        values = pd.to_numeric(df[metric], errors="coerce").astype(float)
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            where = df.loc[bad, ["row", "seed", "case", "region"]].head(3).to_dict("records")
            raise ValueError(f"long table: {metric} is missing or not a finite number in {int(bad.sum())} lines, "
                             f"first: {where}")
        df[metric] = values
    twice = df.duplicated(list(KEYS), keep=False)
    if twice.any():
        raise ValueError(f"long table: (row, seed, case, region) appears more than once: "
                         f"{df.loc[twice, list(KEYS)].head(3).to_dict('records')}")
    return df


def _ids(values) -> str:
    ids = sorted(values)
    return ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def pool_seeds(long_df: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Per (row, region, case): the mean over the row's seeds of each metric, and ``n_seeds``.

    Every seed of a row must have scored the same cases in a region (else ValueError naming the row, the
    seed and the cases), so each case weighs the same in the row's mean.
    """
    df = check_long(long_df, metrics)
    for (row, region), group in df.groupby(["row", "region"], sort=True):
        cases = {seed: set(g["case"]) for seed, g in group.groupby("seed", sort=True)}
        union = set().union(*cases.values())
        for seed, have in cases.items():
            if have != union:
                raise ValueError(f"row {row}, region {region}: seed {seed} lacks cases {_ids(union - have)} that "
                                 "other seeds of the row have; seeds are pooled per case only over the same cases")
    pooled = df.groupby(["row", "region", "case"], sort=True)[list(metrics)].mean().reset_index()
    counts = df.groupby(["row", "region", "case"], sort=True)["seed"].nunique().reset_index(name="n_seeds")
    return pooled.merge(counts, on=["row", "region", "case"])


def long_lines(row: str, seed: int | str, cases: dict[str, dict], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """The long lines of one training (``row``, ``seed``) from its per-case scores ``{case: {region: {"dice": ..,
    "hd95": .., ...}}}`` (a downstream ``metrics.json``'s ``cases[case]["regions"]``); other keys are dropped."""
    lines = [{"row": row, "seed": seed, "case": case, "region": region, **{m: scores.get(m) for m in metrics}}
             for case, regions in cases.items() for region, scores in regions.items()]
    return pd.DataFrame(lines, columns=[*KEYS, *metrics])


def write_long_csv(long_df: pd.DataFrame, path: str | Path, metrics: Sequence[str] = METRICS) -> Path:
    """Write the long table (checked, sorted by row, region, seed, case) to ``path`` as CSV, atomically."""
    df = check_long(long_df, metrics).sort_values(["row", "region", "seed", "case"], kind="stable")
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.10g")
    return Path(path)


def read_long_csv(path: str | Path, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Read a long table written by `write_long_csv` (keys kept as text: case ``007`` stays ``007``)."""
    df = pd.read_csv(path, dtype={key: str for key in KEYS}, keep_default_na=False,
                     na_values={m: [""] for m in metrics})
    return check_long(df, metrics)


# ----------------------------------------------------------------------------- intervals
def bootstrap_interval(values, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> Interval:
    """The mean of ``values`` and a bootstrap interval of it (BCa; percentile where BCa is degenerate).

    ``numpy.random.default_rng(seed)`` drives the resampling: the same values give the same interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ValueError(f"bootstrap_interval: values must be finite, got {x[~np.isfinite(x)][:3].tolist()}")
    if len(x) == 0:
        raise ValueError("bootstrap_interval: no values")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, "none")
    if np.ptp(x) == 0:  # all equal: BCa is undefined; every resample's mean is this value
        return Interval(mean, mean, mean, "percentile")
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = scipy.stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                           method=method, rng=np.random.default_rng(seed))
        low, high = (float(v) for v in result.confidence_interval)
        degenerate = any(issubclass(w.category, scipy.stats.DegenerateDataWarning) for w in caught)
        if math.isfinite(low) and math.isfinite(high) and not degenerate:
            return Interval(mean, low, high, method)
    raise ValueError(f"bootstrap_interval: no finite interval for {len(x)} values (mean {mean})")


def _seed_spread(df: pd.DataFrame, metric: str) -> dict[str, float]:
    per_seed = df.groupby("seed", sort=True)[metric].mean().to_numpy(dtype=np.float64)
    return {f"{metric}_seed_std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else math.nan,
            f"{metric}_seed_min": float(per_seed.min()), f"{metric}_seed_max": float(per_seed.max())}


def _paired(pooled: pd.DataFrame, row: str, region: str, reference: pd.DataFrame, reference_row: str) -> pd.DataFrame:
    """The row's per-case values and the reference's, aligned by case id (ValueError on other cases)."""
    have, want = set(pooled["case"]), set(reference["case"])
    if have != want:
        parts = []
        if want - have:
            parts.append(f"lacks cases {_ids(want - have)} that the reference row {reference_row} has")
        if have - want:
            parts.append(f"has cases {_ids(have - want)} that the reference row {reference_row} has not")
        raise ValueError(f"row {row}, region {region}: " + "; ".join(parts) + " (rows are paired by case id)")
    return pooled.merge(reference, on="case", suffixes=("", "_ref")).sort_values("case", kind="stable")


def summarise(long_df: pd.DataFrame, reference_row: str | None = "real", confidence: float = 0.95,
              n_resamples: int = 9999, seed: int = 0, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """One line per row x region: means with bootstrap intervals, seed spread, paired differences.

    Columns: ``row, region, n_cases, n_seeds`` and, per metric ``m`` (``dice``, ``hd95``): ``m_mean``,
    ``m_ci_low``, ``m_ci_high``, ``m_ci_method``, ``m_seed_std``, ``m_seed_min``, ``m_seed_max``,
    ``m_diff`` (row - reference, mean over cases of the per-case differences), ``m_diff_ci_low``,
    ``m_diff_ci_high``, ``m_diff_ci_method``, ``m_diff_excludes_0``; then ``confidence`` and
    ``n_resamples``. The reference row's own differences are NaN (method ``reference``), as are all
    differences with ``reference_row=None``. Rows keep their first appearance's order, the reference
    first; regions likewise. See the module doc for pooling, pairing and methods.
    """
    df = check_long(long_df, metrics)
    pooled = pool_seeds(df, metrics)
    rows = list(dict.fromkeys(df["row"]))
    if reference_row is not None:
        if str(reference_row) not in rows:
            raise ValueError(f"reference row {reference_row!r} is not in the long table (rows: {', '.join(rows)})")
        reference_row = str(reference_row)
        rows = [reference_row] + [r for r in rows if r != reference_row]
    regions = list(dict.fromkeys(df["region"]))
    out = []
    for row in rows:
        for region in regions:
            per_case = pooled[(pooled["row"] == row) & (pooled["region"] == region)].sort_values("case", kind="stable")
            if per_case.empty:
                raise ValueError(f"row {row} has no cases in region {region} (other rows have)")
            raw = df[(df["row"] == row) & (df["region"] == region)]
            line = {"row": row, "region": region, "n_cases": len(per_case), "n_seeds": int(raw["seed"].nunique())}
            paired = None
            if reference_row is not None and row != reference_row:
                reference = pooled[(pooled["row"] == reference_row) & (pooled["region"] == region)]
                paired = _paired(per_case, row, region, reference[["case", *metrics]], reference_row)
            for metric in metrics:
                ci = bootstrap_interval(per_case[metric], confidence, n_resamples, seed)
                line.update({f"{metric}_mean": ci.mean, f"{metric}_ci_low": ci.low, f"{metric}_ci_high": ci.high,
                             f"{metric}_ci_method": ci.method, **_seed_spread(raw, metric)})
                if paired is None:
                    diff = Interval(math.nan, math.nan, math.nan, "reference" if row == reference_row else "none")
                else:
                    diff = bootstrap_interval(paired[metric] - paired[f"{metric}_ref"], confidence, n_resamples, seed)
                line.update({f"{metric}_diff": diff.mean, f"{metric}_diff_ci_low": diff.low,
                             f"{metric}_diff_ci_high": diff.high, f"{metric}_diff_ci_method": diff.method,
                             f"{metric}_diff_excludes_0": bool(diff.low > 0 or diff.high < 0)})
            line.update({"confidence": float(confidence), "n_resamples": int(n_resamples)})
            out.append(line)
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- rendering
def format_interval(mean: float, low: float, high: float, decimals: int = 3, signed: bool = False) -> str:
    """``0.812 [0.790, 0.830]``; ``signed``: ``-0.013 [-0.030, +0.004]``; NaN bounds: the value alone."""
    if not math.isfinite(mean):
        return "n/a"
    sign = "+" if signed else ""
    value = f"{mean:{sign}.{decimals}f}"
    if not (math.isfinite(low) and math.isfinite(high)):
        return value
    return f"{value} [{low:{sign}.{decimals}f}, {high:{sign}.{decimals}f}]"


def _spread(line: pd.Series, metric: str, decimals: int) -> str:
    std, lo, hi = (line[f"{metric}_seed_{k}"] for k in ("std", "min", "max"))
    if not math.isfinite(std):
        return "n/a (1 seed)"
    return f"{std:.{decimals}f} ({lo:.{decimals}f}-{hi:.{decimals}f})"


def summary_display(summary: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """The summary as text cells: per metric the mean [interval], the seed spread and the difference to the
    reference [interval], ``*`` when that interval excludes 0."""
    out = []
    for _, line in summary.iterrows():
        cells = {"training data": line["row"], "region": line["region"],
                 "cases x seeds": f"{line['n_cases']} x {line['n_seeds']}"}
        for metric in metrics:
            decimals, label = DECIMALS.get(metric, 3), LABELS.get(metric, metric)
            cells[label] = format_interval(line[f"{metric}_mean"], line[f"{metric}_ci_low"], line[f"{metric}_ci_high"],
                                           decimals)
            cells[f"{label} seed sd (min-max)"] = _spread(line, metric, decimals)
            method = line[f"{metric}_diff_ci_method"]
            if method == "reference":
                diff = "reference"
            else:
                diff = format_interval(line[f"{metric}_diff"], line[f"{metric}_diff_ci_low"],
                                       line[f"{metric}_diff_ci_high"], decimals, signed=True)
                diff += " *" if line[f"{metric}_diff_excludes_0"] else ""
            cells[f"{label} difference"] = diff
        out.append(cells)
    return pd.DataFrame(out)


def summary_notes(summary: pd.DataFrame, reference_row: str | None = "real") -> list[str]:
    """What the rendered summary's numbers are (intervals, pooling, pairing, methods used)."""
    confidence = float(summary["confidence"].iloc[0]) if len(summary) else 0.95
    n_resamples = int(summary["n_resamples"].iloc[0]) if len(summary) else 0
    methods = sorted({m for c in summary.columns if c.endswith("_ci_method") for m in summary[c]}
                     - {"reference", "none"})
    notes = [f"Mean over test cases [{confidence:.0%} bootstrap interval over test cases, {n_resamples} resamples, "
             f"BCa or percentile where BCa is degenerate; used here: {', '.join(methods) or 'none'}]. With several "
             "seeds, a case's value is the mean over the seeds first.",
             "Seed sd (min-max): standard deviation (and range) of the per-seed means over cases."]
    if reference_row is not None:
        notes.append(f"Difference: row minus {reference_row}, per test case (paired by case id), mean and "
                     f"{confidence:.0%} bootstrap interval; * the interval excludes 0.")
    return notes


def summary_markdown(summary: pd.DataFrame, title: str = "Downstream segmentation with intervals",
                     notes: Sequence[str] | None = None, reference_row: str | None = "real",
                     metrics: Sequence[str] = METRICS) -> str:
    """Markdown of `summarise`'s output: a title, notes (default: `summary_notes`), the display table."""
    notes = summary_notes(summary, reference_row) if notes is None else list(notes)
    return markdown_document(title, summary_display(summary, metrics), notes)


def write_summary(summary: pd.DataFrame, csv_path: str | Path, title: str = "Downstream segmentation with intervals",
                  notes: Sequence[str] | None = None, reference_row: str | None = "real",
                  metrics: Sequence[str] = METRICS) -> tuple[Path, Path]:
    """The summary as CSV (full precision) and its Markdown rendering (same name, ``.md``), each atomically."""
    csv_path = Path(csv_path)
    md_path = csv_path.with_suffix(".md")
    with atomic_path(csv_path) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(summary_markdown(summary, title, notes, reference_row, metrics))
    return csv_path, md_path
