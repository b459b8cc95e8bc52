"""`gem3d <stage> --config FILE [options]`: one subcommand per pipeline stage (gem3d/pipeline.py)."""

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
    "train-vae": "train the KL autoencoder; measure and store the latent scale factor",
    "encode": "encode every case's image and mask into the latent cache",
    "train-slice": "train the position-conditioned slice LDM (generated informed slices, IG)",
    "train-volume": "train the volume LDM: stage 1 (2D) or stage 2 (slice-axis layers); GEM-3D or baseline",
}
TRAINING = {"train-vae", "train-slice", "train-volume"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gem3d", description="GEM-3D pipeline stages. Each stage reads the "
                                     "config file and the outputs of earlier stages under results/<name>/.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, type=Path, help="config YAML (e.g. config/config.yaml)")
        p.add_argument("--log", type=Path, default=None, help="also write the log to this file")
        if name in TRAINING:
            p.add_argument("--nproc", type=int, default=1,
                           help="data-parallel processes on this node (torchrun/DDP; one per GPU)")
        if name == "train-volume":
            p.add_argument("--stage", type=int, choices=(1, 2), required=True, dest="volume_stage")
            p.add_argument("--model", choices=("gem3d", "baseline"), default="gem3d",
                           help="gem3d: mask + informed slice; baseline: Make-A-Volume, mask only")
    return parser


def setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and int(os.environ.get("RANK", "0")) == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a" if "LOCAL_RANK" in os.environ else "w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def _relaunch_under_torchrun(args, argv: list[str]) -> int | None:
    """Re-run this command under torchrun when --nproc > 1 and we are not already a torchrun worker."""
    if getattr(args, "nproc", 1) <= 1 or "LOCAL_RANK" in os.environ:
        return None
    import subprocess

    from gem3d.training.distributed import launch_command

    return subprocess.call(launch_command(args.nproc, argv, module="gem3d.cli"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    code = _relaunch_under_torchrun(args, argv)
    if code is not None:
        return code
    setup_logging(args.log)
    logging.getLogger("gem3d").info("gem3d %s: CUDA_VISIBLE_DEVICES=%s", args.stage,
                                    os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    from gem3d.config import load_config
    from gem3d.pipeline import STAGES

    extra = {}
    if args.stage == "train-volume":
        extra = {"stage": args.volume_stage, "model": args.model}
    try:
        cfg = load_config(args.config, check_paths=args.stage != "phantoms")
        STAGES[args.stage](cfg, **extra)
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
