"""`gem3d <stage> --config FILE [options]`: one subcommand per pipeline stage (gem3d/commands.py);
commands registered with `needs_config=False` (`gem3d score`) take no --config.

How a stage ends:

- success: exit 0;
- bad user input (`InputError`: a config key, a file, GEM3D_DEVICE): one line `error: <message>`,
  exit 2;
- anything else: exit 1, and the last line on stderr is
  `error: stage <stage> failed (<Type>: <message>); full log: <--log file>`. A full disk, a
  permission error or a non-finite training loss is the environment's or the run's, not a bug:
  its traceback goes to the log file only. Any other exception (a CUDA out-of-memory, a bug)
  prints its traceback on stderr too.

With `--log FILE` everything the job writes to stderr (log records, warnings, tracebacks, the
torchrun workers of a data-parallel job) is also appended to FILE, below the lines of earlier attempts
(Snakemake deletes a rule's log before each attempt: gem3d keeps a second name for the file, see
`open_job_log`). A job started by Snakemake ends when that Snakemake dies (gem3d/job_owner.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import IO, Iterator

from gem3d import version
from gem3d.commands import Command
from gem3d.io import InputError
from gem3d.job_owner import watch_owner

# OSError numbers that say the machine cannot do the job (disk full, quota, read-only, no access)
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def all_commands() -> dict[str, Command]:
    """Every stage command, in pipeline order (each stage module's COMMANDS)."""
    from gem3d import pipeline
    from gem3d.evaluation import stages as evaluation_stages
    from gem3d.report import stages as report_stages
    from gem3d.sampling import stages as sampling_stages

    return {**pipeline.COMMANDS, **sampling_stages.COMMANDS, **evaluation_stages.COMMANDS, **report_stages.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gem3d", description="GEM-3D pipeline stages. Each stage reads the "
                                     "config file and the outputs of earlier stages under results/<name>/ "
                                     "(`gem3d score` needs no config: it scores two NIfTI folders).")
    parser.add_argument("--version", action="version", version=f"gem3d {version()}",
                        help="print gem3d's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, command in all_commands().items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.accepts_bundle:
            p.add_argument("--config", type=Path, default=None, help="config YAML (e.g. config/config.yaml)")
            p.add_argument("--bundle", type=Path, default=None, help="a bundle written by `gem3d export` instead of "
                                                                     "--config (its config and networks)")
        elif command.needs_config:
            p.add_argument("--config", required=True, type=Path, help="config YAML (e.g. config/config.yaml)")
        p.add_argument("--log", type=Path, default=None,
                       help="also write everything this job writes to stderr (tracebacks included) to this file")
        if command.data_parallel:
            p.add_argument("--nproc", type=int, default=1,
                           help="data-parallel processes on this node (torchrun/DDP; one per GPU)")
        for arg in command.args:
            p.add_argument(*arg.flags, **arg.options)
    return parser


class Tee:
    """A text stream that writes to stderr and to the job's log file.

    A failing log write (the disk that is full) is dropped: stderr still gets everything.
    """

    def __init__(self, stream: IO[str], log: IO[str]):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.write_log(text)
        return len(text)

    def write_log(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.log.write(text)
            self.log.flush()

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ... of the real stderr
        return getattr(self.stream, name)


def open_job_log(path: Path) -> IO[str]:
    """Open a job's log for appending, with the lines of every earlier attempt kept above.

    Snakemake deletes a rule's log file before each attempt, so the log of a killed, refused or failed
    attempt would be gone. The file has a second name, `.<name>.attempts` beside it (a hard link: one
    file, never copied); a log that was deleted is linked back to it before this attempt appends. (Delete
    both names to start a log afresh.)
    """
    keep = path.with_name(f".{path.name}.attempts")
    with contextlib.suppress(OSError):
        if not path.exists() and keep.is_file():
            os.link(keep, path)
    log = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by job_log, errors dropped)
    with contextlib.suppress(OSError):  # a file system without hard links keeps this attempt's log only
        if not keep.is_file() or not os.path.samefile(keep, path):
            keep.unlink(missing_ok=True)
            os.link(path, keep)
    return log


@contextlib.contextmanager
def job_log(path: Path | None) -> Iterator[Tee | None]:
    """While inside, sys.stderr also writes to `path` (None: no log file), appended (`open_job_log`)."""
    if path is None:
        yield None
        return
    try:  # a folder, a path under a file, no permission: one line, before any work
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open_job_log(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the log file (--log): {exc.strerror or exc}") from None
    old = sys.stderr
    tee = Tee(old, log)
    sys.stderr = tee
    try:
        yield tee
    finally:
        sys.stderr = old
        with contextlib.suppress(OSError):
            log.close()


def setup_logging() -> list[logging.Handler]:
    """Log records to (the current) stderr; returns the root logger's previous handlers."""
    root = logging.getLogger()
    previous = list(root.handlers)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    return previous


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int | None:
    """Re-run this command under torchrun when --nproc > 1 and we are not already a torchrun worker.

    The workers' stderr comes back through this process, so its log file holds every rank's output.
    """
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return None
    import signal
    import subprocess

    from gem3d.job_owner import die_with_parent
    from gem3d.training.distributed import launch_command

    # The workers get their arguments through the environment: torchrun's own parser would take
    # `--log`, `--nproc`, ... for abbreviations of its options. They know they are workers (LOCAL_RANK).
    # torchrun ends with this process (SIGTERM), and SIGTERM sent here goes on to torchrun, which passes
    # it to its workers (they checkpoint and stop) while their last lines still reach the log.
    env = dict(os.environ, GEM3D_WORKER_ARGV=json.dumps(argv))
    with subprocess.Popen(launch_command(nproc, [], module="gem3d.cli"), env=env, stderr=subprocess.PIPE,
                          text=True, errors="replace", bufsize=1, preexec_fn=die_with_parent()) as proc:
        forwarded: list[int] = []

        def forward(signum, frame) -> None:  # once: torchrun's agent is stopping its workers already
            if not forwarded:
                forwarded.append(signum)
                proc.send_signal(signal.SIGTERM)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            for line in proc.stderr:
                sys.stderr.write(line)
            return proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else '(no message)'}"[:500]


def _is_environment_failure(exc: BaseException) -> bool:
    return isinstance(exc, FloatingPointError) or (isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS)


def _failure_line(name: str, cause: str, log: Path | None) -> str:
    return f"error: stage {name} failed ({cause})" + (f"; full log: {log}" if log is not None else "")


def _config_of(command: Command, args: argparse.Namespace):
    """The stage's config: --config, or a bundle's (--bundle) where the command accepts one."""
    from gem3d.config import load_config

    bundle = getattr(args, "bundle", None)
    if command.accepts_bundle and (bundle is None) == (args.config is None):
        raise InputError(f"gem3d {args.command}: give --config FILE or --bundle DIR (one of them)")
    if bundle is not None:
        from gem3d.bundle import bundle_config

        return bundle_config(bundle)
    return load_config(args.config)


def run_stage(command: Command, args: argparse.Namespace, argv: list[str], tee: Tee | None) -> int:
    """Check the device and the config, run the stage; map how it ends to an exit code and one line."""
    from gem3d.config import check_data_path
    from gem3d.device import compute_device, device_choice

    options = {a.options["dest"]: getattr(args, a.options["dest"]) for a in command.args}
    try:
        if device_choice() == "cuda":
            compute_device()  # refuses GEM3D_DEVICE=cuda without a GPU before any work
        nproc = getattr(args, "nproc", 1)
        if nproc < 1:
            raise InputError(f"--nproc {nproc}: the number of processes on this node must be an integer >= 1")
        cfg = _config_of(command, args) if command.needs_config else None
        if command.needs_data_path:
            check_data_path(cfg)
        code = _relaunch_under_torchrun(nproc, argv)  # after the checks: refused once
        if code is not None:
            if code != 0:
                print(_failure_line(args.command, f"torchrun exit code {code}", args.log), file=sys.stderr)
            return code
        logging.getLogger("gem3d").info("gem3d %s: CUDA_VISIBLE_DEVICES=%s", args.command,
                                        os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
        if command.needs_config:
            command.func(cfg, **options)
        else:
            command.func(**options)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (every failure ends in one line naming the stage)
        trace = traceback.format_exc()
        if not _is_environment_failure(exc):
            sys.stderr.write(trace)
        elif tee is not None:
            tee.write_log(trace)
        print(_failure_line(args.command, _cause(exc), args.log), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    launched_worker = not argv and "GEM3D_WORKER_ARGV" in os.environ and "LOCAL_RANK" in os.environ
    if launched_worker:
        argv = json.loads(os.environ["GEM3D_WORKER_ARGV"])  # a torchrun worker (see _relaunch_under_torchrun)
    args = build_parser().parse_args(argv)
    # The launching process writes the log of a relaunched job (its workers' stderr passes through it);
    # under a plain torchrun, rank 0 writes it.
    log = None if launched_worker or int(os.environ.get("RANK", "0")) != 0 else args.log
    try:
        with job_log(log) as tee:
            previous_handlers = setup_logging()
            watch_owner()  # started by Snakemake: end with it
            try:
                return run_stage(all_commands()[args.command], args, argv, tee)
            finally:
                logging.getLogger().handlers = previous_handlers
    except InputError as exc:  # only the log file itself reaches here (run_stage turns every error into a code)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
