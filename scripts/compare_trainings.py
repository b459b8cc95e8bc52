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
or within a few thousandths of it) has plateaued. `--figure PNG` also draws every training's validation
pseudo-Dice per epoch (nnU-Net's log, kept in its metrics.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

from gem3d.evaluation import statistics  # noqa: E402
from gem3d.io import InputError, read_json  # noqa: E402


def read_trainings(pairs: list[tuple[str, Path]]) -> list[tuple[str, int, dict]]:
    """Each training's (label, seed index within its label, metrics record), every one scored on the same test
    cases as the first."""
    trainings, seeds, first = [], {}, None
    for label, path in pairs:
        record = read_json(path)
        if "cases" not in record:
            raise InputError(f"{path}: not a downstream metrics.json (no per-case scores)")
        ids = sorted(record["cases"])
        if first is None:
            first = (path, ids)
        elif ids != first[1]:
            raise InputError(f"{path}: scored on other test cases than {first[0]}")
        seeds[label] = seeds.get(label, -1) + 1
        trainings.append((label, seeds[label], record))
    return trainings


def long_table(trainings: list[tuple[str, int, dict]]) -> pd.DataFrame:
    """The long lines of every training (label, seed index within the label, case, region)."""
    return pd.concat([statistics.long_lines(label, seed, {c: v["regions"] for c, v in record["cases"].items()})
                      for label, seed, record in trainings], ignore_index=True)


def curves_figure(trainings: list[tuple[str, int, dict]], out: Path) -> None:
    """Validation pseudo-Dice per epoch of every training (mean over regions), one line each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gem3d.io import atomic_path

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    late = []  # the values after each curve's first fifth set the lower limit (the start would flatten the rest)
    for label, seed, record in trainings:
        curve = record.get("curve") or []
        if curve:
            ax.plot([c["epoch"] + 1 for c in curve], [c["mean"] for c in curve], lw=1,
                    label=label if seed == 0 else f"{label} ({seed + 1})")
            late += [c["mean"] for c in curve[len(curve) // 5:]]
    if late:
        ax.set_ylim(bottom=max(0.0, min(late) - 0.02))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation pseudo-Dice (mean over regions)")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trainings", nargs="+", metavar="LABEL=METRICS_JSON",
                        help="one training; repeat a label for its other seeds; the first label is the reference")
    parser.add_argument("--figure", type=Path, help="also draw the trainings' pseudo-Dice per epoch to this PNG")
    args = parser.parse_args(argv)
    pairs = []
    for item in args.trainings:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            parser.error(f"{item!r} is not LABEL=METRICS_JSON")
        pairs.append((label, Path(path)))
    try:
        trainings = read_trainings(pairs)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = statistics.summarise(long_table(trainings), reference_row=pairs[0][0])
    print(statistics.summary_markdown(summary, title=f"Trainings against {pairs[0][0]!r}", reference_row=pairs[0][0]))
    if args.figure is not None:
        curves_figure(trainings, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
