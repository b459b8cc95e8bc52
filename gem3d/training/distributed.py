"""Data parallelism across the GPUs of one node (torchrun + DDP).

A CLI that wants N processes re-executes itself under torchrun:

    if n_gpus > 1 and not distributed_env().launched:
        cmd = launch_command(n_gpus, sys.argv)
        os.execvp(cmd[0], cmd)

Inside each process `init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun),
starts the process group (nccl on CUDA, gloo on CPU) and pins the process to its GPU. Without those
variables it is a no-op returning rank 0 of 1. `gem3d.training.train` calls it itself.
`StopSignals` turns SIGTERM/SIGINT (Snakemake, SLURM, Ctrl-C) into a flag the loop checks.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from gem3d.device import compute_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node = GPU index
    launched: bool = False  # True when started by torchrun (WORLD_SIZE set)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return compute_device(self.local_rank)


def distributed_env() -> DistInfo:
    """What torchrun's environment variables say (no process group is started)."""
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    try:
        return DistInfo(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            launched=True,
        )
    except ValueError as exc:
        raise ValueError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None


def init_distributed() -> DistInfo:
    """Start the process group when launched with WORLD_SIZE > 1 (idempotent); return this process's place."""
    if dist.is_available() and dist.is_initialized():
        env = distributed_env()
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank, True)
    info = distributed_env()
    if info.world_size <= 1:
        return info
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    watch_parent()
    if info.device.type == "cuda":  # not with GEM3D_DEVICE=cpu, even where a GPU exists
        torch.cuda.set_device(info.device)
        dist.init_process_group(backend="nccl", device_id=info.device)
    else:
        dist.init_process_group(backend="gloo")
    return info


PARENT_POLL_S = 2.0  # how often a worker checks that its torchrun agent is still alive
PARENT_GRACE_S = 120.0  # after SIGTERM, how long a worker may take to checkpoint before it is ended


def watch_parent() -> None:
    """End this worker when its launcher (the torchrun agent) dies.

    A killed agent leaves its workers running (they would go on training and write the model).
    A daemon thread notices the worker's parent change (it is re-parented), sends this process
    SIGTERM (the training loop then checkpoints and exits, like a cluster's time limit), and ends
    it outright if it is still alive `PARENT_GRACE_S` later (e.g. blocked in a collective).
    """
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GRACE_S)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="gem3d-parent-watch", daemon=True).start()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown_distributed() -> None:
    """Destroy the process group if one is running."""
    if is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if info.world_size <= 1 or not is_initialized():
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (one tiny all-reduce)."""
    if info.world_size <= 1 or not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average of a tensor across ranks (itself without a process group)."""
    if info.world_size <= 1 or not is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    if info.world_size > 1 and is_initialized():
        dist.barrier()


def launch_command(
    n_procs: int | None,
    argv: Sequence[str],
    *,
    module: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The command list that re-runs a program under torchrun with `n_procs` processes on this node.

    `argv` is `sys.argv`-like: argv[0] is the script (e.g. the `gem3d` console script), the rest
    its arguments. With `module="gem3d.cli"` argv holds only the arguments and the program runs as
    `python -m gem3d.cli ...`. `n_procs=None` uses every visible GPU when gem3d computes on the GPU
    (`gem3d.device`), one process on the CPU (GEM3D_DEVICE=cpu or no GPU). Without `master_port`,
    torchrun's standalone mode picks a free port.
    """
    if n_procs is None:
        from gem3d.device import compute_device

        n_procs = torch.cuda.device_count() if compute_device().type == "cuda" else 1
    if int(n_procs) < 1:
        raise ValueError(f"n_procs must be >= 1, got {n_procs}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(int(n_procs))]
    if master_port is None:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(int(master_port))]
    argv = list(argv)
    if module is not None:
        cmd += ["-m", module, *argv]
    else:
        if not argv:
            raise ValueError("argv must name the script to run (argv[0])")
        cmd += argv
    return cmd


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag checked between steps. A second SIGINT (Ctrl-C twice) stops at once;
    a repeated SIGTERM does not interrupt the checkpoint the first one asked for (a killed Snakemake's
    parent-death signal comes once per thread of it, and gem3d.job_owner's watch may send one too)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
