#!/usr/bin/env python
"""What one nnU-Net prediction call costs: start-up and model loading against the per-volume work.

Predicts the first N volumes of a generated set with a trained downstream nnU-Net (row and seed of the config's
downstream experiment; the adherence check uses row "real", seed 0) for each N given, and prints the CPU seconds
of the nnU-Net process and the wall seconds. The per-call overhead is the intercept, the per-volume cost the slope:
that tells whether predicting several sets in one call (what `gem3d evaluate-adherence` does) saves anything.

    OMP_NUM_THREADS=1 python scripts/bench_nnunet_predict.py --config config/hippocampus_study.yaml --set IC \\
        --volumes 1 1 10

CPU seconds barely depend on other jobs sharing the machine, wall seconds do.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

from gem3d.config import load_config  # noqa: E402
from gem3d.evaluation import downstream  # noqa: E402


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", default="IC", help="a generated set of the run (default IC)")
    parser.add_argument("--row", default="real", help="downstream row whose nnU-Net predicts (default real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--volumes", type=int, nargs="+", default=[1, 1, 10])
    args = parser.parse_args()
    cfg = load_config(args.config)
    cases = [case for _, case in downstream.set_cases(cfg, args.set)]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.volumes:
            out = Path(tmp) / "predictions"
            shutil.rmtree(out, ignore_errors=True)
            cpu, wall = child_cpu(), time.time()
            downstream.predict(cfg, args.row, args.seed, cases[:n], out)
            print(f"{min(n, len(cases))} volumes of {args.set}: nnU-Net CPU {child_cpu() - cpu:.1f} s, "
                  f"wall {time.time() - wall:.1f} s", flush=True)


if __name__ == "__main__":
    main()
