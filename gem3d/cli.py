"""`gem3d <stage> --config FILE`: one subcommand per pipeline stage (see gem3d/pipeline.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gem3d.io import InputError

HELP = {
    "phantoms": "write the synthetic demo volumes (BraTS layout) into data.path",
    "import": "validate input cases; write the nnU-Net raw dataset and the train/test split",
    "preprocess": "nnU-Net v2 fingerprint, planning and 3d_fullres preprocessing",
    "slices": "build the slice store (letterboxed axial slices in [-1, 1], masks, geometry)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gem3d", description="GEM-3D pipeline stages. Each stage reads the "
                                     "config file and the outputs of earlier stages under results/<name>/.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, type=Path, help="config YAML (e.g. config/config.yaml)")
        p.add_argument("--log", type=Path, default=None, help="also write the log to this file")
    return parser


def setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    logging.getLogger("gem3d").info("gem3d %s: CUDA_VISIBLE_DEVICES=%s", args.stage,
                                    os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    from gem3d.config import load_config
    from gem3d.pipeline import STAGES

    try:
        cfg = load_config(args.config, check_paths=args.stage != "phantoms")
        STAGES[args.stage](cfg)
    except InputError as exc:
        for handler in logging.getLogger().handlers:  # the log file gets the error too
            if isinstance(handler, logging.FileHandler):
                handler.stream.write(f"error: {exc}\n")
                handler.flush()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
