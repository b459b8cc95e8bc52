"""`gem3d <stage> --config FILE [options]`: one subcommand per pipeline stage (gem3d/commands.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from gem3d.commands import all_commands
from gem3d.io import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gem3d", description="GEM-3D pipeline stages. Each stage reads the "
                                     "config file and the outputs of earlier stages under results/<name>/.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, command in all_commands().items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", required=True, type=Path, help="config YAML (e.g. config/config.yaml)")
        p.add_argument("--log", type=Path, default=None, help="also write the log to this file")
        if command.data_parallel:
            p.add_argument("--nproc", type=int, default=1,
                           help="data-parallel processes on this node (torchrun/DDP; one per GPU)")
        for arg in command.args:
            p.add_argument(*arg.flags, **arg.options)
    return parser


def setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and int(os.environ.get("RANK", "0")) == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a" if "LOCAL_RANK" in os.environ else "w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int | None:
    """Re-run this command under torchrun when --nproc > 1 and we are not already a torchrun worker."""
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return None
    import subprocess

    from gem3d.training.distributed import launch_command

    # The workers get their arguments through the environment: torchrun's own parser would take
    # `--log`, `--nproc`, ... for abbreviations of its options. They know they are workers (LOCAL_RANK).
    env = dict(os.environ, GEM3D_WORKER_ARGV=json.dumps(argv))
    return subprocess.call(launch_command(nproc, [], module="gem3d.cli"), env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv and "GEM3D_WORKER_ARGV" in os.environ and "LOCAL_RANK" in os.environ:
        argv = json.loads(os.environ["GEM3D_WORKER_ARGV"])  # a torchrun worker (see _relaunch_under_torchrun)
    args = build_parser().parse_args(argv)
    command = all_commands()[args.command]
    code = _relaunch_under_torchrun(getattr(args, "nproc", 1), argv)
    if code is not None:
        return code
    setup_logging(args.log)
    logging.getLogger("gem3d").info("gem3d %s: CUDA_VISIBLE_DEVICES=%s", args.command,
                                    os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    from gem3d.config import load_config

    options = {a.options["dest"]: getattr(args, a.options["dest"]) for a in command.args}
    try:
        cfg = load_config(args.config, check_paths=command.needs_data_path)
        command.func(cfg, **options)
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
