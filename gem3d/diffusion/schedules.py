"""Noise schedules for epsilon-prediction diffusion (DDPM, Ho et al. 2020).

Notation (DDPM paper): beta_t is the variance added at step t, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s. Timesteps are 0-based: t in [0, T-1], where t = 0 is the
first (least noisy) step. The pseudo-timestep ``CLEAN = -1`` means "no noise at all"
(alpha_bar = 1); DDIM uses it as the target of its final step.

Per-slice timestep rule for ``add_noise`` (``x0`` is ``b c h w`` or ``b c f h w``):
- ``t`` a Python int or 0-d tensor: one timestep for everything;
- ``t`` of shape ``(b,)``: one timestep per sample (per window), broadcast over c, f, h, w;
- ``t`` of shape ``(b, f)`` and ``x0`` 5-D ``b c f h w``: one timestep per slice; sqrt(alpha_bar)
  is reshaped to ``(b, 1, f, 1, 1)``.
Anything else raises ValueError.
"""

from __future__ import annotations

import dataclasses
import math

import torch

CLEAN = -1  # pseudo-timestep of the clean sample x_0 (alpha_bar = 1)

BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SAMPLING = ("uniform", "linear_decay")


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Latent-diffusion "scaled linear" betas: linspace(sqrt(start), sqrt(end), T) ** 2.

    Computed in float64, returned as a float32 tensor of shape (T,).
    """
    _check_schedule_args(num_train_timesteps, beta_start, beta_end)
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                          dtype=torch.float64)
    return (root**2).to(torch.float32)


def linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02
) -> torch.Tensor:
    """DDPM linear betas: linspace(start, end, T) (float64 computed, float32 returned)."""
    _check_schedule_args(num_train_timesteps, beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, num_train_timesteps,
                          dtype=torch.float64).to(torch.float32)


def _check_schedule_args(num_train_timesteps: int, beta_start: float, beta_end: float) -> None:
    if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A fixed forward process q(x_t | x_0) with its alpha_bar table.

    ``alphas_cumprod`` (float64, shape (T,)) is derived from the float32 betas, like the
    checkpoints of latent-diffusion models. Save ``to_config()`` with a checkpoint and rebuild
    with ``NoiseSchedule.from_config``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    betas: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)
    alphas_cumprod: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)
    _tables: dict = dataclasses.field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(self.num_train_timesteps, self.beta_start, self.beta_end)
        elif self.beta_schedule == "linear":
            betas = linear_betas(self.num_train_timesteps, self.beta_start, self.beta_end)
        else:
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        # (DDPM eq. 4 notation) alpha_bar_t = prod_{s<=t} (1 - beta_s)
        alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)

    # ---- configuration -------------------------------------------------------------------
    def to_config(self) -> dict:
        return {"num_train_timesteps": int(self.num_train_timesteps),
                "beta_start": float(self.beta_start), "beta_end": float(self.beta_end),
                "beta_schedule": str(self.beta_schedule)}

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        allowed = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"unknown noise schedule keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**config)

    # ---- lookups -------------------------------------------------------------------------
    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a Python float (float64 precision); ``t = CLEAN`` (-1) gives 1.0."""
        t = int(t)
        if t == CLEAN:
            return 1.0
        self._check_range(t, t)
        return float(self.alphas_cumprod[t])

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < CLEAN or hi >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [{CLEAN}, {self.num_train_timesteps - 1}] "
                             f"(-1 = clean), got range [{lo}, {hi}]")

    def alpha_bar_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar for a long tensor of timesteps (any shape; CLEAN entries give 1.0), float64.

        The range is checked for CPU tensors (and Python ints in add_noise) only: on a GPU the check
        would stall every training step on a device-to-host copy, and an out-of-range timestep
        there fails in the table lookup instead (a device-side assert). Training draws its
        timesteps in range (sample_timesteps); the sampler passes Python ints.
        """
        t = torch.as_tensor(t, dtype=torch.long)
        if t.numel() and t.device.type == "cpu":
            self._check_range(int(t.min()), int(t.max()))
        table = self._table(t.device)
        return torch.where(t == CLEAN, torch.ones((), dtype=table.dtype, device=t.device),
                           table[t.clamp(min=0)])

    def _table(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod on `device`, copied once (a copy per call would stall a GPU every step)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self.alphas_cumprod.to(device)
        return self._tables[key]

    def _broadcast(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape per-timestep values (shape of t) to broadcast against x (module docstring)."""
        if values.ndim == 0:
            return values
        if values.ndim == 1 and values.shape[0] == x.shape[0]:
            return values.reshape(-1, *([1] * (x.ndim - 1)))  # (b,) -> (b, 1, ..., 1)
        if values.ndim == 2 and x.ndim == 5 and tuple(values.shape) == (x.shape[0], x.shape[2]):
            b, f = values.shape
            return values.reshape(b, 1, f, 1, 1)  # (b, f) -> (b, 1, f, 1, 1) for b c f h w
        raise ValueError(f"timesteps of shape {tuple(values.shape)} do not fit a sample of shape "
                         f"{tuple(x.shape)}: use (), (b,), or (b, f) for b c f h w")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Sample q(x_t | x_0) (DDPM eq. 4):
        x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise.

        ``t``: int, 0-d, (b,) or (b, f) long tensor (broadcast rule in the module docstring).
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        if isinstance(t, int):  # the sampler's case: checked here, no tensor, no device copy
            ab = torch.tensor(self.alpha_bar(t), dtype=torch.float64)
        else:
            ab = self._broadcast(self.alpha_bar_tensor(t).to(x0.device), x0)
        # (1) computed in float64, cast to the sample's dtype
        sqrt_ab = ab.sqrt().to(x0.dtype)
        sqrt_one_minus_ab = (1.0 - ab).sqrt().to(x0.dtype)
        return sqrt_ab * x0 + sqrt_one_minus_ab * noise

    # ---- training timesteps --------------------------------------------------------------
    def timestep_weights(self, mode: str = "uniform") -> torch.Tensor:
        """Probabilities (float64, shape (T,)) of drawing each training timestep.

        ``uniform``: 1/T each. ``linear_decay``: proportional to (2T - t), the stage-2 choice of
        the authors (2000 - t for T = 1000): small t are drawn about twice as often as t near T.
        """
        T = self.num_train_timesteps
        if mode == "uniform":
            w = torch.ones(T, dtype=torch.float64)
        elif mode == "linear_decay":
            w = 2.0 * T - torch.arange(T, dtype=torch.float64)
        else:
            raise ValueError(f"timestep sampling mode {mode!r} is not one of {TIMESTEP_SAMPLING}")
        return w / w.sum()

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, *,
                         mode: str = "uniform", frames: int | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """Draw training timesteps (long tensor).

        ``frames=None``: shape (b,), one timestep per sample/window (stage 2: the whole window
        shares it). ``frames=f``: shape (b, f), one independent timestep per slice (stage 1,
        where slices are 2D samples). ``mode``: "uniform" | "linear_decay" (timestep_weights).
        Draws on the generator's device, then moves to ``device``.
        """
        if batch_size < 1 or (frames is not None and frames < 1):
            raise ValueError(f"batch_size and frames must be >= 1, got {batch_size}, {frames}")
        shape = (batch_size,) if frames is None else (batch_size, frames)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        count = math.prod(shape)
        if mode == "uniform":
            t = torch.randint(0, self.num_train_timesteps, (count,), generator=generator,
                              device=gen_device)
        else:
            w = self.timestep_weights(mode).to(gen_device)
            t = torch.multinomial(w, count, replacement=True, generator=generator)
        return t.reshape(shape).to(device if device is not None else gen_device)
