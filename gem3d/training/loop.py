"""The one training loop shared by every network (VAE, slice LDM, volume LDM stages, baseline).

    result = train(model, loss_fn, batch_source, TrainConfig(steps=..., lr=...), "vae.pt",
                   kind="vae", model_args={...}, extra={"scale_factor": s})

Contract with the caller (model-agnostic: nothing here imports gem3d.models):

- `batch_source(step, generator, items) -> batch`: step = 0-based index of the step about to run;
  returns one micro-batch of `len(items)` items, which must depend only on (step, generator state,
  items). `items` (a range) are the positions in the global batch this micro-batch holds
  (`batching.shard_items`); `generator` is a CPU `torch.Generator` of that shard of the global batch
  (below), seeded with `cfg.seed + shard` and restored on resume, so draw with it
  (`torch.randint(n, (b,), generator=g)`), or decide per global item from (seed, step, item) where the
  items must not depend on how the batch is split (the VAE's image-or-mask choice). The loop moves the
  tensors of the returned batch — tensor, dict, list or tuple — to the training device itself.
- The batch: `cfg.batch_size` is the GLOBAL batch of one optimizer step (the paper's numbers: 8
  windows, 32 slices), split evenly over the processes, and on each process into `accumulate`
  micro-batches of at most `cfg.micro_batch` items whose gradients are accumulated
  (`batch_plan`). Shard k = rank x accumulate + a has its own generator seeded `cfg.seed + k`, so
  1 process accumulating 2 micro-batches trains on the same data as 2 processes with one each
  (and computes the same update up to float rounding).
- `loss_fn(model, batch, generator) -> (loss, metrics)`: `model` may be wrapped (DDP, compiled):
  run the trained computation through `model(...)` so DDP sees it; reach attributes through
  `unwrap_model(model)`. Metrics: floats or 0-d tensors (tensors avoid a GPU sync per step).
  Diffusion noise: `torch.randn(shape, generator=generator).to(device)`.
- Only the parameters in `trainable_parameters` (default: all with requires_grad) are trained;
  the others are set to requires_grad=False, so no gradient memory is spent on them.

Checkpoints (layout in gem3d.training.checkpoint) are written by rank 0, atomically, every
`checkpoint_every` steps and at the end, each verified by its checksum (the one it replaces stays as
`<name>.prev`, the fallback when the newest is corrupt). If `checkpoint_path` exists, training
resumes from it, bit-identically on CPU to an uninterrupted run, but only while it was trained on
what defines this run: the caller's `fingerprint` (config keys and input digests,
gem3d.fingerprint.stage_fingerprint). A state with another fingerprint is moved aside to
`<name>.stale` and training starts over, with one log line saying why. A state at step >= cfg.steps
returns at once, unless the model file exported from it (`model_path`) was removed since (a forced
rerun): then training starts over. One process at a time trains a state (a file lock).
SIGTERM / SIGINT finish the current step, write a checkpoint and raise SystemExit(143) /
KeyboardInterrupt. Any other exception leaves the last periodic checkpoint as it was.

Speed switches mean the same on every device (the CPU runs the code path a GPU runs, so the test
suite covers it; tests/test_accel_cpu.py):
- `precision: bf16`: the forward pass and loss under `torch.autocast(device, bfloat16)`, on the CPU
  too (weights, gradients and AdamW state stay fp32). A CPU config that wants fp32 says `fp32`; on a
  CPU without native bf16 instructions (AVX512-BF16 / AMX) bf16 is emulated and may be slower, which
  the log notes.
- `compile: true`: `torch.compile` of the (DDP-wrapped) model; forward and backward are compiled
  (inductor: Triton on a GPU, C++ on the CPU; both build native code, so a C/C++ compiler and
  Python's headers must be installed; on the CPU their absence stops training with one line before
  its first step).
- `channels_last: true`: 4D weights in channels-last memory layout, on any device.
- AdamW is always the fused kernel (CUDA and CPU alike).
GPU-only: cuDNN benchmark mode (set on CUDA), NCCL (gem3d.training.distributed); TF32 is left at
torch's defaults. The list with the reasons: docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from gem3d.io import InputError, remove_leftovers
from gem3d.training import distributed as D
from gem3d.training.checkpoint import (
    capture_rng_state,
    check_storable,
    export_model,
    exported_marker,
    load_optimizer_state,
    load_training_state,
    model_args_differences,
    previous_path,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from gem3d.training.batching import accumulate, batch_plan, shard_items
from gem3d.training.train_config import TrainConfig, lr_factor
from gem3d.training.distributed import unwrap_model  # noqa: F401  (re-exported)
from gem3d.training.ema import EMA
from gem3d.training.precision import autocast_for, native_cpu_bf16, require_cpu_compiler
from gem3d.training.resume import plan_resume, state_lock

LOGGER = logging.getLogger("gem3d.training")
SIGNAL_CHECK_EVERY = 10  # steps between the ranks' stop-signal all-reduces under DDP (each is a GPU sync)

@dataclass
class TrainResult:
    final_step: int  # optimizer steps completed (== cfg.steps on success)
    last_loss: float | None  # loss of the last step run (from the checkpoint on an idempotent rerun)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, running-mean loss) per log, all runs
    wall_time_s: float = 0.0  # wall time of this call
    steps_per_s: float = 0.0  # steps run in this call / loop time
    start_step: int = 0  # step this call started from (> 0 after a resume)
    checkpoint_path: str = ""
    already_done: bool = False  # the state had already reached cfg.steps and its model file exists: nothing ran


# ---------------------------------------------------------------------------------------------
# helpers


def _emitters(log: Any, is_main: bool) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """(info, warning) writers: `log` (a Logger or a callable) or the "gem3d.training" logger; rank 0 only.

    Warnings always also go to the "gem3d.training" logger, so they reach stderr even when logging
    is not configured.
    """
    if not is_main:
        return (lambda msg: None), (lambda msg: None)
    if log is None:
        return LOGGER.info, LOGGER.warning
    if isinstance(log, logging.Logger):
        return log.info, (log.warning if log is LOGGER else (lambda msg: (log.warning(msg), LOGGER.warning(msg))))
    if callable(log):
        return log, (lambda msg: (log(msg), LOGGER.warning(msg)))
    raise TypeError(f"log must be None, a logging.Logger or a callable, got {type(log).__name__}")


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensors, dicts, lists) to `device`; CPU tensors go to a GPU through pinned
    memory, so the copy does not wait for the previous step's kernels."""
    if isinstance(batch, torch.Tensor):
        if batch.device.type == "cpu" and device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _set_grad_checkpointing(model: nn.Module, flag: bool, emit: Callable[[str], None]) -> None:
    setter = getattr(model, "set_grad_checkpointing", None)
    if callable(setter):
        setter(flag)
    elif hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = flag
    elif flag:
        emit(f"note: {type(model).__name__} has no set_grad_checkpointing()/grad_checkpointing: flag ignored")


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# the loop


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any, torch.Generator], Any],
    batch_source: Callable[[int, torch.Generator], Any],
    cfg: TrainConfig,
    checkpoint_path: str | Path,
    *,
    kind: str,
    model_args: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    trainable_parameters: Iterable[nn.Parameter] | None = None,
    log: Any = None,
    fingerprint: Mapping[str, Any] | None = None,
    model_path: str | Path | None = None,
) -> TrainResult:
    """Train `model` for `cfg.steps` steps (resuming from `checkpoint_path` if it exists and matches
    `fingerprint`); `model_path` is the model file the caller exports from the finished state."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    check_storable(dict(model_args), "model_args")
    check_storable(dict(extra or {}), "extra", tensors=True)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty str, got {kind!r}")
    if fingerprint is not None:
        check_storable(dict(fingerprint), "fingerprint")
    started_group = not D.is_initialized() and D.distributed_env().world_size > 1
    info = D.init_distributed()
    path = Path(checkpoint_path)
    with state_lock(path, info.is_main):
        if info.is_main:  # a killed save's temporary state or model file (the lock makes them ours)
            for leftover_of in (path, model_path):
                if leftover_of is not None:
                    remove_leftovers(leftover_of)
        result = _train(model, loss_fn, batch_source, cfg, path, kind=kind,
                        model_args=dict(model_args), extra=dict(extra or {}),
                        trainable_parameters=trainable_parameters, emitters=_emitters(log, info.is_main), info=info,
                        fingerprint=None if fingerprint is None else dict(fingerprint),
                        model_path=None if model_path is None else Path(model_path))
    if started_group:
        D.shutdown_distributed()
    return result


def _train(model, loss_fn, batch_source, cfg: TrainConfig, path: Path, *, kind, model_args, extra,
           trainable_parameters, emitters, info: D.DistInfo, fingerprint: dict | None = None,
           model_path: Path | None = None) -> TrainResult:
    t_call = time.perf_counter()
    emit, warn = emitters
    device = info.device

    # -- which parameters train --------------------------------------------------------------
    named = list(model.named_parameters())
    if trainable_parameters is not None:
        wanted = {id(p) for p in trainable_parameters}
        unknown = wanted - {id(p) for _, p in named}
        if unknown:
            raise ValueError(f"trainable_parameters: {len(unknown)} tensors are not parameters of the model")
        for _, p in named:
            p.requires_grad_(id(p) in wanted)
    trained = [(n, p) for n, p in named if p.requires_grad]
    if not trained:
        raise ValueError("no parameter to train (none has requires_grad / trainable_parameters is empty)")

    # -- checkpoint to resume from -------------------------------------------------------------
    ckpt = plan_resume(path, kind, model_args, fingerprint, model_path, warn) if info.is_main else None
    D.barrier(info)  # rank 0 has moved a state that must not be resumed aside
    if not info.is_main and (path.exists() or previous_path(path).exists()):  # rank 0 may have moved it aside
        ckpt = load_training_state(path, warn, expect_kind=kind)
    if ckpt:
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            raise InputError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from exc
    history = dict(ckpt.get("history") or {}) if ckpt else {}
    losses: list[tuple[int, float]] = [(int(s), float(v)) for s, v in history.get("losses", [])]
    start = int(ckpt["step"]) if ckpt else 0
    if ckpt and start >= cfg.steps:
        emit(f"{path}: already trained to step {start} (>= {cfg.steps}) on the same settings and data; nothing to do")
        done = model_path is not None and model_path.exists() and exported_marker(path).exists()
        return TrainResult(start, history.get("last_loss"), losses, time.perf_counter() - t_call, 0.0, start, str(path),
                           already_done=done)
    if info.is_main:
        exported_marker(path).unlink(missing_ok=True)  # the state is about to move past the exported model

    # -- device, memory format, optimizer, EMA -------------------------------------------------
    _set_grad_checkpointing(model, cfg.grad_checkpointing, warn)
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest kernels
    if cfg.channels_last:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, fused=True)
    ema = EMA(model, cfg.ema_decay, cfg.ema_start, names=[n for n, _ in trained]) if cfg.ema_decay > 0 else None
    plan = batch_plan(cfg, info.world_size)
    generators = [torch.Generator() for _ in range(plan.accumulate)]  # shard k = rank * accumulate + a
    items = [shard_items(plan, info.rank, a) for a in range(plan.accumulate)]
    generator = generators[0]

    if ckpt:
        load_optimizer_state(optimizer, ckpt["optimizer"], path, lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay)
        if ema is not None:
            if ckpt.get("ema_state_dict") is not None:
                try:
                    ema.load_state_dict(ckpt["ema_state_dict"])
                except ValueError as exc:
                    raise InputError(f"{path}: {exc}") from exc
            else:
                warn(f"note: {path} has no EMA; the EMA starts from the step-{start} weights")
        rng = ckpt.get("rng") or {}
        ranks = rng.get("ranks")
        shards = rng.get("shards")
        if ranks is not None and len(ranks) == info.world_size:
            restore_rng_state(ranks[info.rank], generator)
        elif info.rank == 0 and rng:
            restore_rng_state(rng, generator)
        else:
            seed_everything(cfg.seed + info.rank + 1_000_003 * start, generator)
            warn(f"note: {path} holds no RNG state for {info.world_size} processes; resume is not bit-exact")
        if shards is not None and len(shards) == plan.world_size * plan.accumulate:
            for a, g in enumerate(generators):
                g.set_state(shards[info.rank * plan.accumulate + a].cpu())
        elif plan.accumulate > 1 or (shards is not None and len(shards) != plan.world_size):
            for a, g in enumerate(generators):
                g.manual_seed(cfg.seed + info.rank * plan.accumulate + a + 1_000_003 * start)
            warn(f"note: {path} was trained with another split of the batch; the global batch stays "
                 f"{cfg.batch_size} but the data draws are not those of an uninterrupted run")
        saved_cfg = {k: v for k, v in (ckpt.get("train_config") or {}).items() if k != "steps"}
        changed = model_args_differences(saved_cfg, {k: v for k, v in asdict(cfg).items() if k != "steps"})
        emit(f"resuming {path} at step {start}" + (f"; config changed: {', '.join(changed)}" if changed else ""))
    else:
        seed_everything(cfg.seed + info.rank, generator)
        for a, g in enumerate(generators):
            g.manual_seed(cfg.seed + info.rank * plan.accumulate + a)
    resumed = ckpt is not None
    del ckpt  # free host memory before training

    # -- wrappers, precision ------------------------------------------------------------------
    step_model: nn.Module = model
    if info.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if cfg.compile:
        if device.type == "cpu":
            require_cpu_compiler()
        step_model = torch.compile(step_model)
    autocast = autocast_for(cfg.precision, device)
    if cfg.precision == "bf16" and device.type == "cpu" and not native_cpu_bf16():
        emit("note: this CPU has no native bf16 instructions (AVX512-BF16 or AMX): bf16 is emulated and may be "
             "slower than precision fp32")
    n_train = sum(p.numel() for _, p in trained)
    n_all = sum(p.numel() for _, p in named)
    emit(f"training {kind}: {n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M parameters trained, device {device}, "
         f"world size {info.world_size}, batch {plan.global_batch} = {plan.world_size} processes x "
         f"{plan.accumulate} accumulated x {plan.micro}, steps {start}->{cfg.steps}, precision "
         f"{cfg.precision}{', compiled' if cfg.compile else ''}, lr {cfg.lr:g}, checkpoint {path}")

    # -- state for logs and checkpoints -------------------------------------------------------
    last_saved = start if resumed else -1  # step held by the file at `path` (-1: none yet)
    last_loss_t: torch.Tensor | None = None
    loss_sum = torch.zeros((), device=device)
    metric_sums: dict[str, tuple[Any, int]] = {}
    n_window = 0
    bad = torch.zeros((), dtype=torch.bool, device=device)
    t_loop = time.perf_counter()
    t_window, step_window, save_time = t_loop, start, 0.0

    def checkpoint(step: int) -> None:
        nonlocal last_saved, save_time
        t0 = time.perf_counter()
        if bool(D.any_rank(bool(bad.item()), info, device)):
            raise FloatingPointError(f"non-finite loss at or before step {step}; {path} left at step {last_saved}")
        rng_all = D.all_gather_objects(capture_rng_state(generator), info)
        shards_all = D.all_gather_objects([g.get_state() for g in generators], info)
        if info.is_main:
            rng = dict(rng_all[0])
            if info.world_size > 1:
                rng["ranks"] = rng_all
            rng["shards"] = [state for rank_states in shards_all for state in rank_states]
            payload = {
                "kind": kind, "model_args": model_args, "state_dict": model.state_dict(),
                "ema_state_dict": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
                "train_config": asdict(cfg), "extra": extra, "fingerprint": fingerprint,
                "batch_plan": asdict(plan),
                "history": {"losses": [list(x) for x in losses],
                            "last_loss": None if last_loss_t is None else float(last_loss_t.item())},
            }
            save_checkpoint(path, payload, keep_previous=True, owned_only=False)
        last_saved = step
        save_time += time.perf_counter() - t0

    step = start
    step_model.train()
    with D.StopSignals() as signals:
        try:
            while step < cfg.steps:
                # a stop signal on any rank stops all (under DDP an all-reduce, so only every few steps)
                if (info.world_size == 1 or step % SIGNAL_CHECK_EVERY == 0) and \
                        D.any_rank(signals.signum is not None, info, device):
                    if last_saved != step:
                        checkpoint(step)
                    name = signal.Signals(signals.signum).name if signals.signum else "a stop signal on another rank"
                    msg = (f"received {name} at step {step}/{cfg.steps}: checkpoint {path} holds step {step}; "
                           f"run the same command again to resume")
                    warn(msg)
                    if signals.signum == signal.SIGINT:
                        raise KeyboardInterrupt(msg)
                    raise SystemExit(128 + int(signals.signum or signal.SIGTERM))

                if cfg.lr_decay:
                    for group in optimizer.param_groups:
                        group["lr"] = cfg.lr * lr_factor(cfg, step)
                loss, metrics = accumulate(step_model, loss_fn, batch_source, step, generators, items, device,
                                           autocast, _to_device)
                if cfg.grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_([p for _, p in trained], cfg.grad_clip)
                    metrics = {**metrics, "grad_norm": norm}
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    ema.update(model, step)

                last_loss_t = loss.detach().float()
                bad |= ~torch.isfinite(last_loss_t)
                loss_sum += last_loss_t
                for k, v in metrics.items():  # kept on the device until the next log line
                    v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                    total, count = metric_sums.get(k, (0.0, 0))
                    metric_sums[k] = (total + v, count + 1)
                n_window += 1

                if step % cfg.log_every == 0 or step == cfg.steps:
                    mean = float(D.mean_over_ranks(loss_sum / n_window, info).item())
                    losses.append((step, mean))
                    now = time.perf_counter()
                    ips = (step - step_window) / max(now - t_window - save_time, 1e-9)
                    eta = (cfg.steps - step) / ips if ips > 0 else float("inf")
                    parts = [f"step {step}/{cfg.steps}", f"{ips:.2f} it/s", f"loss {mean:.5g}",
                             f"lr {optimizer.param_groups[0]['lr']:.3g}"]
                    parts += [f"{k} {float(v) / n:.4g}" for k, (v, n) in metric_sums.items()]
                    parts.append(f"eta {_fmt_duration(eta)}")
                    emit(" | ".join(parts))
                    loss_sum.zero_()
                    metric_sums, n_window = {}, 0
                    t_window, step_window, save_time = now, step, 0.0

                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    checkpoint(step)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            warn(f"training stopped by {type(exc).__name__} at step {step}; {path} keeps step {last_saved}")
            raise

    if last_saved != step:  # only cfg.steps == 0 on a fresh run gets here
        checkpoint(step)
    D.barrier(info)
    loop_time = time.perf_counter() - t_loop
    return TrainResult(
        final_step=step,
        last_loss=None if last_loss_t is None else float(last_loss_t.item()),
        losses=losses,
        wall_time_s=time.perf_counter() - t_call,
        steps_per_s=(step - start) / loop_time if loop_time > 0 else 0.0,
        start_step=start,
        checkpoint_path=str(path),
    )


def export_result(result: TrainResult, checkpoint: Path, out: Path, extra: Mapping[str, Any] | None = None) -> None:
    """After `train`: copy the final training state to the pipeline's model file `out`, with `extra` (provenance)
    merged into its extras; rank 0 only, and nothing when the training had already finished before this call."""
    if not D.distributed_env().is_main:
        return
    if result.already_done:
        LOGGER.info("%s is up to date (trained on the same settings and data); nothing to do", out)
        return
    export_model(checkpoint, out, extra)

