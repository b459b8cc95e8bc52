"""The settings of one training (`TrainConfig`), read from a config's training section; torch-free.

gem3d.training.loop trains with them; gem3d.config checks every training section with them when a config loads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # total optimizer steps (a resume continues up to this number)
    lr: float = 4e-5  # AdamW learning rate, used as given (not scaled by batch size or world size)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    batch_size: int = 1  # GLOBAL batch of one optimizer step (all processes, all accumulated micro-batches)
    micro_batch: int | None = None  # most items one process puts through one forward/backward (None: its whole share)
    grad_clip: float | None = None  # max global grad norm (None: no clipping; the norm is logged when set)
    lr_decay: float = 0.0  # the last fraction of the steps over which the lr falls linearly toward 0 (pix2pix: 0.5,
    # its n_epochs_decay = n_epochs; `lr_factor`); 0: a constant lr
    ema_decay: float = 0.9999  # EMA decay of the trained parameters; 0 disables EMA
    ema_start: int = 0  # until this step the EMA is a plain copy of the weights
    log_every: int = 50  # one progress line every N steps (and at the last step)
    checkpoint_every: int = 1000  # checkpoint every N steps (and at the last step)
    seed: int = 0  # rank r seeds its loop generator and global RNGs with seed + r
    precision: str = "fp32"  # "fp32" | "bf16" (bf16 autocast on any device, CPU included)
    grad_checkpointing: bool = False  # handed to model.set_grad_checkpointing(flag) / model.grad_checkpointing
    compile: bool = False  # torch.compile the model for the step (any device; the CPU needs a C++ compiler)
    channels_last: bool = False  # 4D weights in channels_last memory format (any device)
    num_workers: int = 0  # data-loading workers; latents are in memory, so carried only for the record

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        checks = [
            ("steps", isinstance(self.steps, int) and self.steps >= 0, "an int >= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an int >= 1"),
            ("micro_batch", self.micro_batch is None or (isinstance(self.micro_batch, int) and self.micro_batch >= 1),
             "None or an int >= 1"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "None or > 0"),
            ("lr_decay", 0 <= self.lr_decay <= 1, "in [0, 1]"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("ema_start", isinstance(self.ema_start, int) and self.ema_start >= 0, "an int >= 0"),
            ("log_every", isinstance(self.log_every, int) and self.log_every >= 1, "an int >= 1"),
            ("checkpoint_every", isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1, "an int >= 1"),
            ("seed", isinstance(self.seed, int), "an int"),
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("num_workers", isinstance(self.num_workers, int) and self.num_workers >= 0, "an int >= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be {allowed}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from a plain dict (config file, checkpoint); unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**dict(d))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The factor of `cfg.lr` for the 0-based step `step`: 1, then over the last `lr_decay` share of the steps
    pix2pix's linear rule, 1 - (step + 1 - start) / (decay + 1) (per step where pix2pix steps per epoch)."""
    decay = round(cfg.lr_decay * cfg.steps)
    start = cfg.steps - decay
    if decay == 0 or step < start:
        return 1.0
    return 1.0 - (step + 1 - start) / (decay + 1)
