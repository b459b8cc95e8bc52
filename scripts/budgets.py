"""Print what every generation method of a config is given (issue #23): parameters, optimizer steps x batch, the
training items and slices seen, resolution and resampling, and the ratios to GEM-3D's volume model. The tables' notes state the
same (gem3d.evaluation.stages.budget_notes); this prints them without a run. No network is built (meta device).

    python scripts/budgets.py config/hippocampus_cpu.yaml [config/brats.yaml ...]
"""

from __future__ import annotations

import argparse
import sys

from gem3d.config import load_config
from gem3d.io import InputError
from gem3d.methods import registry


def budget_lines(cfg) -> list[str]:
    """One line per enabled method: name, parameter and item ratios to GEM-3D's, its budget's text."""
    reference = registry.budget(cfg, "gem3d")
    lines = []
    for method in registry.enabled(cfg):
        b = registry.budget(cfg, method.name)
        lines.append(f"{method.name:<12} {b.ratios(reference)} | {b.text()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files (config/*.yaml)")
    args = parser.parse_args(argv)
    try:
        for path in args.configs:
            print(path)
            for line in budget_lines(load_config(path, check_paths=False)):
                print(f"  {line}")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
