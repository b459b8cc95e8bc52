#!/usr/bin/env python
"""Compare downstream trainings of the same test cases: has a training length (or a network width, or any other
setting) reached its plateau? Each training is a `metrics.json` of `gem3d train-segmentation`
(results/<name>/evaluation/segmentation/<row>/seed<k>/metrics.json); trainings under one label are seeds of one
setting and are pooled per test case, as the study table pools them. Prints the study table's statistics: per
label and region the mean Dice and HD95 over test cases with 95 % bootstrap intervals, and the paired difference
to the first label (same test cases) with its interval.

    python scripts/compare_trainings.py \\
        "30 epochs=results/a/evaluation/segmentation/real/seed0/metrics.json" \\
        "60 epochs=results/b/evaluation/segmentation/real/seed0/metrics.json"

A setting whose doubled length moves Dice by less than the seeds do (the interval of the difference holding 0,
or within a few thousandths of it) has plateaued.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

from gem3d.evaluation import statistics  # noqa: E402
from gem3d.io import InputError, read_json  # noqa: E402


def long_table(pairs: list[tuple[str, Path]]) -> pd.DataFrame:
    """The long lines of every training (label, seed index within the label, case, region)."""
    frames, seeds, cases = [], {}, {}
    for label, path in pairs:
        record = read_json(path)
        if "cases" not in record:
            raise InputError(f"{path}: not a downstream metrics.json (no per-case scores)")
        ids = sorted(record["cases"])
        if label in cases and cases[label] != ids:
            raise InputError(f"{path}: its test cases differ from those of the other trainings labelled {label!r}")
        cases[label] = ids
        seed = seeds[label] = seeds.get(label, -1) + 1
        frames.append(statistics.long_lines(label, seed, {c: v["regions"] for c, v in record["cases"].items()}))
    first = cases[pairs[0][0]]
    for label, ids in cases.items():
        if ids != first:
            raise InputError(f"trainings labelled {label!r} were scored on other test cases than {pairs[0][0]!r}")
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trainings", nargs="+", metavar="LABEL=METRICS_JSON",
                        help="one training; repeat a label for its other seeds; the first label is the reference")
    args = parser.parse_args(argv)
    pairs = []
    for item in args.trainings:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            parser.error(f"{item!r} is not LABEL=METRICS_JSON")
        pairs.append((label, Path(path)))
    try:
        long_df = long_table(pairs)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = statistics.summarise(long_df, reference_row=pairs[0][0])
    print(statistics.summary_markdown(summary, title=f"Trainings against {pairs[0][0]!r}", reference_row=pairs[0][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
