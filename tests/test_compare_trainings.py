"""scripts/compare_trainings.py: trainings of one label pooled as seeds, the paired difference to the first label
on known per-case scores, and one-line refusals of files that cannot be compared."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from gem3d.io import write_json

SCRIPT = REPO / "scripts" / "compare_trainings.py"
CASES = [f"hippocampus_{i:03d}" for i in range(6)]


def metrics(path, dice_of_case, cases=CASES):
    record = {"data": "real", "curve": [{"epoch": e, "mean": 0.5 + 0.01 * e} for e in range(5)], "cases": {c: {"regions": {"anterior": {"dice": dice_of_case(k), "hd95": 2.0 + k,
                                                                     "n_pred": 5, "n_ref": 5}}}
                                        for k, c in enumerate(cases)}}
    write_json(path, record)
    return path


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_seeds_pool_per_case_and_the_difference_is_paired(tmp_path):
    short = metrics(tmp_path / "short.json", lambda k: 0.70 + 0.02 * k)
    long0 = metrics(tmp_path / "long0.json", lambda k: 0.73 + 0.02 * k)
    long1 = metrics(tmp_path / "long1.json", lambda k: 0.75 + 0.02 * k)
    figure = tmp_path / "curves.png"
    res = run(f"30 epochs={short}", f"60 epochs={long0}", f"60 epochs={long1}", "--figure", figure)
    assert res.returncode == 0, res.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = next(x for x in res.stdout.splitlines() if x.startswith("| 60 epochs"))
    # per case +0.04 (the mean of seeds +0.03 and +0.05) on every case: a degenerate interval at +0.040
    assert "+0.040 [+0.040, +0.040]" in line and "0.790" in line
    assert "row minus 30 epochs" in res.stdout


@pytest.mark.parametrize("problem", ["other_cases", "not_metrics", "no_label"])
def test_refusals_are_one_line(tmp_path, problem):
    good = metrics(tmp_path / "a.json", lambda k: 0.8)
    if problem == "other_cases":
        args = [f"a={good}", f"b={metrics(tmp_path / 'b.json', lambda k: 0.8, CASES[:4])}"]
        expected = "other test cases"
    elif problem == "not_metrics":
        write_json(tmp_path / "b.json", {"epochs": 3})
        args = [f"a={good}", f"b={tmp_path / 'b.json'}"]
        expected = "not a downstream metrics.json"
    else:
        args = [str(good)]
        expected = "is not LABEL=METRICS_JSON"
    res = run(*args)
    assert res.returncode == 2 and expected in res.stderr
    assert len([x for x in res.stderr.splitlines() if x.strip()]) <= 3  # argparse's usage + the line, or the line
