"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") with known-slice pinning.

Equation numbers refer to the DDIM paper (arXiv 2010.02502):
- eq. 12: x_{t-1} = sqrt(ab_prev) * x0_pred
                    + sqrt(1 - ab_prev - sigma_t^2) * eps
                    + sigma_t * z,          x0_pred = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
- eq. 16: sigma_t(eta) = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
eta = 0 is deterministic DDIM, eta = 1 is DDPM-like ancestral sampling.

Timesteps ("leading" spacing): with T training steps and S inference steps, ratio = T // S and
t_i = i * ratio for i = 0..S-1, used in descending order (for T=1000, S=200: 995, 990, ..., 0).
The step from t goes to t_prev = t - ratio; the step from t = 0 goes to ``CLEAN`` (-1) with
ab_prev = 1.0, so the final step returns x0_pred itself (sigma = 0, no noise).

Known-slice pinning (RePaint-style replacement, Lugmayr et al. 2022): positions of a window
whose clean latent is known are overwritten by ``add_noise(known_x0, fresh noise, t)`` at the
timestep t that the window is at:
- at the start, x_T (which sits at t = timesteps[0]) is pinned with t = timesteps[0];
- after each step from t, x holds x_{t_prev}, so it is pinned with t_prev;
- after the final step t_prev = CLEAN: the pinned positions hold exactly known_x0.
(The authors noised with the step index 0..S-1 instead of the timestep: defect #1 in
docs/method.md; this module uses the timestep.)
"""

from __future__ import annotations

from typing import Callable

import torch

from gem3d.diffusion.schedules import CLEAN, NoiseSchedule


def randn_tensor(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``/``dtype``.

    Drawing on the generator's device keeps results reproducible from the seed alone.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
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
        # "leading" spacing: t_i = i * (T // S), i = 0..S-1, descending
        self.step_ratio = T // self.num_inference_steps
        self.timesteps: list[int] = [i * self.step_ratio
                                     for i in range(self.num_inference_steps)][::-1]

    def prev_timestep(self, t: int) -> int:
        """Timestep after one step from t: t - T//S, or CLEAN (-1) from the last timestep 0."""
        t = int(t)
        return t - self.step_ratio if t - self.step_ratio >= 0 else CLEAN

    def sigma(self, t: int) -> float:
        """sigma_t(eta), DDIM eq. 16 (0 for the final step, where ab_prev = 1)."""
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(self.prev_timestep(t))
        return self.eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from x_t at timestep t (one int for the whole batch) to x_{t_prev}.

        Returns ``(x_prev, x0_pred)``. Noise z (eta > 0, non-final step) comes from ``generator``.
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
                  t: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """RePaint replacement: x (b c f h w) at timestep t; where ``positions_mask`` (b, f) is
        True, x is replaced by add_noise(known_x0, fresh noise, t). Returns a new tensor.

        ``t`` must be the timestep x sits at (CLEAN = -1 after the final step: exact known_x0,
        no noise drawn). ``known_x0`` values outside the mask are ignored.
        """
        if x.ndim != 5 or known_x0.shape != x.shape:
            raise ValueError(f"pin_known needs x and known_x0 of the same shape b c f h w, got "
                             f"{tuple(x.shape)} and {tuple(known_x0.shape)}")
        b, _, f, _, _ = x.shape
        if tuple(positions_mask.shape) != (b, f) or positions_mask.dtype != torch.bool:
            raise ValueError(f"positions_mask must be a bool tensor of shape ({b}, {f}), got "
                             f"{positions_mask.dtype} {tuple(positions_mask.shape)}")
        known_x0 = known_x0.to(x.dtype)
        if int(t) == CLEAN:
            known_t = known_x0
        else:
            noise = randn_tensor(x.shape, generator, x.device, x.dtype)
            known_t = self.schedule.add_noise(known_x0, noise, int(t))
        mask = positions_mask.to(x.device)[:, None, :, None, None]  # (b, f) -> b 1 f 1 1
        return torch.where(mask, known_t, x)

    @torch.no_grad()
    def sample(self, eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor,
               generator: torch.Generator | None = None, known_x0: torch.Tensor | None = None,
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
            x = self.pin_known(x, known_x0, known_mask, self.timesteps[0], generator)
        for i, t in enumerate(self.timesteps):
            eps = eps_fn(x, t)
            x, x0_pred = self.step(eps, t, x, generator)
            t_prev = self.prev_timestep(t)
            if pin:
                x = self.pin_known(x, known_x0, known_mask, t_prev, generator)
            if callback is not None:
                callback(i, t, t_prev, x, x0_pred)
        return x
