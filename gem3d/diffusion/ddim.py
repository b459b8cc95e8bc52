"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") with known-slice pinning.

Equation numbers refer to the DDIM paper (arXiv 2010.02502):
- eq. 12: x_{t-1} = sqrt(ab_prev) * x0_pred
                    + sqrt(1 - ab_prev - sigma_t^2) * eps
                    + sigma_t * z,          x0_pred = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
- eq. 16: sigma_t(eta) = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
eta = 0 is deterministic DDIM, eta = 1 is DDPM-like ancestral sampling.

Timesteps ("leading" spacing): with T training steps and S inference steps,
t_i = floor(i * T / S) for i = 0..S-1, used in descending order (for T=1000, S=200: 995, 990, ...,
0; for S=300: 996, 993, 990, 986, ..., 0). When S divides T this is t_i = i * (T // S); for
other S the first timestep is still T - ceil(T / S) or later (with T // S it would start at 897
for S=300, far from the pure noise that x_T is). Each step goes to the next timestep of the list; the step
from t = 0 goes to ``CLEAN`` (-1) with ab_prev = 1.0, so the final step returns x0_pred itself
(sigma = 0, no noise).

Noise and reproducibility: ``generator`` is either one ``torch.Generator`` for the whole batch or a
sequence with one generator per batch row; then row i's noise (x_T, the eta noise of each step,
the pinning noise) comes from generator i alone, so a volume's result does not depend on which
other volumes share its batch. Noise is drawn on the CPU (``randn_tensor``) so a seed gives the
same noise on every device.

Known-slice pinning (RePaint-style replacement, Lugmayr et al. 2022): positions of a window
whose clean latent is known are overwritten by ``add_noise(known_x0, fresh noise, t)`` at the
timestep t that the window is at (noise is drawn for the pinned slices only):
- at the start, x_T (which sits at t = timesteps[0]) is pinned with t = timesteps[0];
- after each step from t, x holds x_{t_prev}, so it is pinned with t_prev;
- after the final step t_prev = CLEAN: the pinned positions hold exactly known_x0.
(The authors noised with the step index 0..S-1 instead of the timestep: defect #1 in
docs/method.md; this module uses the timestep.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from gem3d.diffusion.schedules import CLEAN, NoiseSchedule


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_tensor(shape, generator: Generators, device, dtype, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on the generator's device, moved to ``device``/``dtype``.

    ``generator``: one generator (or None) for the whole tensor, or one per row. With per-row
    generators, row k of the result is drawn from ``generator[rows[k]]`` (``rows`` defaults to
    0..shape[0]-1), so each row's noise depends on its own generator only. Drawing on the
    generator's device keeps results reproducible from the seed alone; CPU noise goes to a GPU
    through pinned memory without stalling the host.
    """
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    else:
        rows = range(shape[0]) if rows is None else rows
        if len(rows) != shape[0] or (len(rows) and not 0 <= min(rows) <= max(rows) < len(generator)):
            raise ValueError(f"per-row noise of shape {shape} needs a generator index per row, got rows "
                             f"{list(rows)[:8]} for {len(generator)} generators")
        noise = torch.stack([torch.randn(shape[1:], generator=generator[r], device=generator[r].device,
                                         dtype=torch.float32) for r in rows]) if len(rows) else \
            torch.zeros(shape, dtype=torch.float32)
    device = torch.device(device)
    if noise.device.type == "cpu" and device.type == "cuda":
        return noise.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return noise.to(device=device, dtype=dtype)


class DDIMSampler:
    """DDIM sampler for epsilon-prediction models; timesteps ``self.timesteps`` (descending).

    ``clip_sample``: clamp x0_pred to [-c, c] when set; off by default (latents are unbounded).
    """

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int = 200, eta: float = 1.0,
                 clip_sample: float | None = None) -> None:
        T = schedule.num_train_timesteps
        if int(num_inference_steps) != num_inference_steps or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {T}], got {num_inference_steps}")
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if clip_sample is not None and not clip_sample > 0:
            raise ValueError(f"clip_sample must be > 0 or None, got {clip_sample}")
        self.schedule = schedule
        self.num_inference_steps = int(num_inference_steps)
        self.eta = float(eta)
        self.clip_sample = clip_sample
        # "leading" spacing: t_i = floor(i * T / S), i = 0..S-1, descending (module docstring)
        S = self.num_inference_steps
        self.timesteps: list[int] = [i * T // S for i in range(S)][::-1]
        self._prev = dict(zip(self.timesteps, self.timesteps[1:] + [CLEAN]))

    def prev_timestep(self, t: int) -> int:
        """Timestep after one step from t (the next of ``timesteps``), CLEAN (-1) after t = 0."""
        try:
            return self._prev[int(t)]
        except KeyError:
            raise ValueError(f"timestep {t} is not one of this sampler's {len(self.timesteps)} timesteps") from None

    def sigma(self, t: int) -> float:
        """sigma_t(eta), DDIM eq. 16 (0 for the final step, where ab_prev = 1)."""
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(self.prev_timestep(t))
        return self.eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from x_t at timestep t (one int for the whole batch) to x_{t_prev}.

        Returns ``(x_prev, x0_pred)``. Noise z (eta > 0, non-final step) comes from ``generator``
        (one, or one per row).
        """
        if eps.shape != x_t.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != x_t shape {tuple(x_t.shape)}")
        t = int(t)
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(self.prev_timestep(t))
        eps = eps.to(x_t.dtype)
        # (1) predicted clean sample, DDIM eq. 12 "predicted x_0" term
        x0_pred = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
        if self.clip_sample is not None:
            x0_pred = x0_pred.clamp(-self.clip_sample, self.clip_sample)
            # keep eps consistent with the clipped x0 (as in DDPM/DDIM reference samplers)
            eps = (x_t - ab_t**0.5 * x0_pred) / (1 - ab_t) ** 0.5
        # (2) sigma_t(eta), DDIM eq. 16
        sigma = self.sigma(t)
        # (3) "direction pointing to x_t", DDIM eq. 12 (clamped at 0 against rounding)
        dir_coef = max(1 - ab_prev - sigma**2, 0.0) ** 0.5
        x_prev = ab_prev**0.5 * x0_pred + dir_coef * eps
        # (4) random noise sigma_t * z, DDIM eq. 12
        if sigma > 0:
            x_prev = x_prev + sigma * randn_tensor(x_t.shape, generator, x_t.device, x_t.dtype)
        return x_prev, x0_pred

    def pin_known(self, x: torch.Tensor, known_x0: torch.Tensor, positions_mask: torch.Tensor,
                  t: int, generator: Generators = None) -> torch.Tensor:
        """RePaint replacement: x (b c f h w) at timestep t; where ``positions_mask`` (b, f) is
        True, x is replaced by add_noise(known_x0, fresh noise, t). Returns a new tensor.

        ``t`` must be the timestep x sits at (CLEAN = -1 after the final step: exact known_x0,
        no noise drawn). ``known_x0`` values outside the mask are ignored. Noise is drawn for the
        pinned slices only, in row-major order (row i's from ``generator[i]`` when one is given
        per row). Pass ``positions_mask`` on the CPU: reading it from a GPU costs a sync.
        """
        return self._pin(x, _Pinned(x, known_x0, positions_mask), t, generator)

    def _pin(self, x: torch.Tensor, pinned: "_Pinned", t: int, generator: Generators) -> torch.Tensor:
        known = pinned.values
        if int(t) != CLEAN:
            noise = randn_tensor(known.shape, generator, x.device, x.dtype, rows=pinned.rows)
            known = self.schedule.add_noise(known, noise, int(t))
        x = x.clone()
        x[pinned.index] = known
        return x

    @torch.no_grad()
    def sample(self, eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor,
               generator: Generators = None, known_x0: torch.Tensor | None = None,
               known_mask: torch.Tensor | None = None,
               callback: Callable[[int, int, int, torch.Tensor, torch.Tensor], None] | None = None,
               ) -> torch.Tensor:
        """Full DDIM loop from x_T; returns the clean sample (b c f h w, or any shape unpinned).

        ``eps_fn(x_t, t)`` predicts the noise for the batch at int timestep t. With ``known_x0``
        and ``known_mask`` (b, f), known positions are pinned at the start (t = timesteps[0]) and
        after every step (t_prev), see the module docstring. ``callback(i, t, t_prev, x, x0_pred)``
        runs after each step (after pinning).
        """
        pin = known_x0 is not None and known_mask is not None and bool(known_mask.any())
        x = x_T
        if pin:
            pinned = _Pinned(x, known_x0, known_mask)  # index and values once, not every step
            x = self._pin(x, pinned, self.timesteps[0], generator)
        for i, t in enumerate(self.timesteps):
            eps = eps_fn(x, t)
            x, x0_pred = self.step(eps, t, x, generator)
            t_prev = self.prev_timestep(t)
            if pin:
                x = self._pin(x, pinned, t_prev, generator)
            if callback is not None:
                callback(i, t, t_prev, x, x0_pred)
        return x


class _Pinned:
    """The pinned (row, slice) pairs of a window batch, in row-major order: their clean latents
    (k, c, h, w), the index that writes them into ``b c f h w`` and the row of each (for per-row noise)."""

    def __init__(self, x: torch.Tensor, known_x0: torch.Tensor, positions_mask: torch.Tensor):
        if x.ndim != 5 or known_x0.shape != x.shape:
            raise ValueError(f"pin_known needs x and known_x0 of the same shape b c f h w, got "
                             f"{tuple(x.shape)} and {tuple(known_x0.shape)}")
        b, _, f, _, _ = x.shape
        if tuple(positions_mask.shape) != (b, f) or positions_mask.dtype != torch.bool:
            raise ValueError(f"positions_mask must be a bool tensor of shape ({b}, {f}), got "
                             f"{positions_mask.dtype} {tuple(positions_mask.shape)}")
        rows, pos = positions_mask.cpu().nonzero(as_tuple=True)  # one read of the mask
        self.rows = rows.tolist()
        self.index = (rows.to(x.device), slice(None), pos.to(x.device))
        self.values = known_x0[self.index].to(x.dtype)
