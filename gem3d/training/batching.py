"""The global batch of one optimizer step: split over processes, then into accumulated micro-batches.

`cfg.batch_size` is the GLOBAL batch (the paper's numbers: 8 windows, 32 slices), split evenly over
the processes and, on each, into `accumulate` micro-batches of at most `cfg.micro_batch` items whose
gradients are summed (DDP all-reduces only after the last). Shard k = rank x accumulate + a holds the
global batch's items k x micro .. (k + 1) x micro - 1 (`shard_items`, handed to the batch source) and
draws with its own generator seeded `cfg.seed + k` (gem3d.training.loop), so 1 process accumulating 2
micro-batches trains on the same data as 2 processes with one each. A batch source that decides per
global item (the VAE's image-or-mask choice) is the same for every split of the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import torch

from gem3d.io import InputError
from gem3d.training.train_config import TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # items per optimizer step, all processes together
    world_size: int  # processes
    accumulate: int  # micro-batches per process and step (gradient accumulation)
    micro: int  # items per micro-batch


def batch_plan(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Split the global batch over `world_size` processes, then into micro-batches of <= cfg.micro_batch."""
    if cfg.batch_size % world_size:
        raise InputError(f"batch_size {cfg.batch_size} (the global batch) cannot be split evenly over {world_size} "
                         "processes: use a process count that divides it")
    share = cfg.batch_size // world_size
    micro = min(cfg.micro_batch or share, share)
    if share % micro:
        raise InputError(f"micro_batch {cfg.micro_batch} does not divide the {share} items of each of the "
                         f"{world_size} processes (batch_size {cfg.batch_size})")
    return BatchPlan(cfg.batch_size, world_size, share // micro, micro)


def shard_items(plan: BatchPlan, rank: int, a: int) -> range:
    """The global batch's items that micro-batch `a` of process `rank` holds (shard k = rank x accumulate + a)."""
    k = rank * plan.accumulate + a
    return range(k * plan.micro, (k + 1) * plan.micro)


def accumulate(step_model, loss_fn, batch_source, step: int, generators, items: list[range], device, autocast,
               to_device):
    """Forward and backward of every micro-batch of this process for one step (gradients summed with
    weight 1/accumulate; DDP all-reduces only after the last); micro-batch a draws with generators[a] the
    global items items[a]. Returns the mean loss and metrics."""
    n = len(generators)
    loss_total, metric_total = None, {}
    for a, g in enumerate(generators):
        batch = to_device(batch_source(step, g, items[a]), device)
        last = a == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(step_model, "no_sync") else step_model.no_sync()
        with sync:
            with autocast():
                out = loss_fn(step_model, batch, g)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            (loss / n if n > 1 else loss).backward()
        if n == 1:
            return loss, metrics
        loss_total = loss.detach() / n if loss_total is None else loss_total + loss.detach() / n
        for k, v in metrics.items():
            v = v.detach() if isinstance(v, torch.Tensor) else v
            metric_total[k] = metric_total.get(k, 0.0) + v / n
    return loss_total, metric_total
