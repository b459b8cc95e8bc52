"""A job ends with the Snakemake that started it.

The Snakefile puts its own process id into the environment (`GEM3D_OWNER_PID`); every job inherits it.
A rule's job is the process tree

    snakemake -> bash -c '... gem3d <stage> ...' -> gem3d [-> torchrun -> workers | -> nnU-Net]

Snakemake killed with SIGKILL cannot end its jobs, and its death reaches nobody: the shell waits on for
gem3d, and gem3d would go on training and write its model file after Snakemake had recorded nothing, or a
rerun had been refused by the training lock. So `gem3d` (`watch_owner`, called by the CLI):

- ends when its parent dies (Linux `prctl(PR_SET_PDEATHSIG, SIGTERM)`; bash usually execs the command,
  so the parent is Snakemake itself), and gives the same to the programs it starts (`die_with_parent`:
  torchrun, nnU-Net);
- watches the Snakemake process while it is an ancestor (a shell left between them, e.g. a conda
  activation): once it is gone, sends itself SIGTERM (training checkpoints and stops, like at a cluster's
  time limit, and takes repeated SIGTERMs as one; other stages end at once), and ends outright `GRACE_S`
  later;
- publishes no model file once its Snakemake is gone (`check_owned`, called before the file is renamed
  into place).

Where Snakemake is not an ancestor (a SLURM job step started by srun, another PID namespace) nothing is
watched: there the cluster ends the job's steps with the job. Without `GEM3D_OWNER_PID` (gem3d run by
hand) nothing changes. Torchrun workers do not watch: their launcher does (see gem3d.cli), and they end
with their torchrun agent (gem3d.training.distributed.watch_parent).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from gem3d.io import InputError

OWNER_ENV = "GEM3D_OWNER_PID"
POLL_S = 1.0  # how often a job checks that its Snakemake is still there
GRACE_S = 120.0  # after SIGTERM, how long a job may take to checkpoint before it is ended
PR_SET_PDEATHSIG = 1

log = logging.getLogger("gem3d.job_owner")
_watched: dict[int, int] = {}  # this process's pid -> the owner it watches (a forked child watches nothing)
_gone = threading.Event()


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux), looked up once, before any fork (a forked child only calls it)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Linux: this process gets `signum` when its parent dies. False where that cannot be set."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets SIGTERM when this process dies (and quits at once
    if this process died before the child could ask for that)."""
    parent = os.getpid()
    _prctl()  # resolved here, in the parent

    def preexec() -> None:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(128 + signal.SIGTERM)

    return preexec


def _parent_of(pid: int) -> int | None:
    try:  # the field after the state; the name before them may hold ")"
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def ancestors() -> list[int]:
    """The process ids above this process, its parent first (empty where /proc cannot tell)."""
    chain, pid = [], os.getppid()
    while pid > 1 and pid not in chain:
        chain.append(pid)
        pid = _parent_of(pid) or 0
    return chain


def owner_pid() -> int | None:
    value = os.environ.get(OWNER_ENV, "")
    return int(value) if value.isdigit() else None


def owner_gone() -> bool:
    """True once the Snakemake process this job watches has ended (never for a job nobody watches)."""
    owner = _watched.get(os.getpid())
    return owner is not None and (_gone.is_set() or owner not in ancestors())


def check_owned(path: str | Path) -> None:
    """Refuse to publish `path` (a model file) once the Snakemake that started this job is gone."""
    if owner_gone():
        raise InputError(f"{path}: not written: the Snakemake process (pid {_watched[os.getpid()]}) that started "
                         "this job has ended; run snakemake again")


def watch_owner() -> bool:
    """Called first thing by `gem3d`: end this job when the Snakemake that started it dies (see the module).
    True when a Snakemake process is watched."""
    owner = owner_pid()
    if owner is None or "LOCAL_RANK" in os.environ or os.getpid() in _watched:
        return False
    if owner not in ancestors():
        return False  # not our Snakemake's descendant (a cluster job step, another PID namespace)
    set_parent_death_signal(signal.SIGTERM)  # bash usually execs gem3d: Snakemake is then the parent
    _watched[os.getpid()] = owner
    threading.Thread(target=_watch, args=(owner,), name="gem3d-owner-watch", daemon=True).start()
    return True


def _watch(owner: int) -> None:
    while owner in ancestors():
        time.sleep(POLL_S)
    _gone.set()
    with contextlib.suppress(Exception):
        log.warning("the Snakemake process (pid %d) that started this job has ended: stopping this job", owner)
    os.kill(os.getpid(), signal.SIGTERM)  # the training loop takes a repeated SIGTERM as one
    time.sleep(GRACE_S)
    os._exit(128 + signal.SIGTERM)
