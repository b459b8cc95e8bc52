"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") with known-slice pinning.

Equation numbers refer to the DDIM paper (arXiv 2010.02502):
- eq. 12: x_{t-1} = sqrt(ab_prev) * x0_pred
                    + sqrt(1 - ab_prev - sigma_t^2) * eps
                    + sigma_t * z,          x0_pred = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
- eq. 16: sigma_t(eta) = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
eta = 0 is deterministic DDIM, eta = 1 is DDPM-like ancestral sampling.

Timesteps, ``spacing="leading"`` (the default): with T training steps and S inference steps,
t_i = floor(i * T / S) for i = 0..S-1, used in descending order (for T=1000, S=200: 995, 990, ...,
0; for S=300: 996, 993, 990, 986, ..., 0). When S divides T this is t_i = i * (T // S); for
other S the first timestep is still T - ceil(T / S) or later (with T // S it would start at 897
for S=300, far from the pure noise that x_T is). Each step goes to the next timestep of the list; the step
from t = 0 goes to ``CLEAN`` (-1) with ab_prev = 1.0, so the final step returns x0_pred itself
(sigma = 0, no noise).
``spacing="ldm"``: latent diffusion's DDIM grid, as the GEM-3D authors sampled: 1 + every (T // S)-th
timestep from 0 (T=1000, S=200: 996, 991, ..., 6, 1; S network calls when S divides T, ceil(T / (T // S))
otherwise, as theirs; S <= T / 2); the step from the last one (1) lands on timestep 0 with
ab_prev = alpha_bar_0, so the result is the sample at timestep 0, as theirs (their release networks were
sampled on this grid; `sampling.ddim_spacing`).

The solver API, per-row noise (one generator per volume) and the pinning helpers are shared with
the other solvers (gem3d/diffusion/solver.py).

Known-slice pinning (RePaint-style replacement, Lugmayr et al. 2022): positions of a window
whose clean latent is known are overwritten by ``add_noise(known_x0, z, t)`` at the timestep t
that the window is at:
- at the start, x_T (which sits at t = timesteps[0]) is pinned with t = timesteps[0] and ONE noise
  z drawn per window for its known slices (from the volume's generator);
- after each step from t, x holds x_{t_prev}, so it is pinned with t_prev and z carried through the
  step as the step itself carries the noise of a point at known_x0: x_prev = sqrt(ab_prev) known +
  dir_coef z + sigma n at a slice with x_t = sqrt(ab_t) known + sqrt(1 - ab_t) z and x0_pred = known,
  so z' = (dir_coef z + sigma n) / sqrt(1 - ab_prev) with the step's own noise n there (unit
  variance); at eta 0 (sigma = 0) z' = z, the same tensor at every step;
- after the final step t_prev = CLEAN: the pinned positions hold exactly known_x0.
Fresh noise at every step (the earlier RePaint replacement) made the known slices jump between
unrelated noise draws while, at eta < 1, the rest of the window follows a (nearly) deterministic path;
DPM-Solver++ carries its pinning noise the same way (gem3d/diffusion/dpm_solver.py). At eta 1 the
carried z' draws the known slices from DDPM's posterior given their previous value, which has the same
marginal as a fresh draw.
(The authors noised with the step index 0..S-1 instead of the timestep: a defect of the authors'
code; this module uses the timestep.)
"""

from __future__ import annotations

import torch

from gem3d.diffusion.schedules import CLEAN, NoiseSchedule
from gem3d.diffusion.solver import Callback, EpsFn, Generators, Solver, pinned_or_none, randn_tensor

__all__ = ["DDIMSampler", "SPACINGS", "randn_tensor"]

SPACINGS = ("leading", "ldm")


class DDIMSampler(Solver):
    """DDIM sampler for epsilon-prediction models; timesteps ``self.timesteps`` (descending).

    ``clip_sample``: clamp x0_pred to [-c, c] when set; off by default (latents are unbounded).
    """

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int = 200, eta: float = 1.0,
                 clip_sample: float | None = None, spacing: str = "leading") -> None:
        if spacing not in SPACINGS:
            raise ValueError(f"DDIM spacing must be one of {list(SPACINGS)}, got {spacing!r}")
        self.spacing = spacing
        super().__init__(schedule, num_inference_steps)
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if clip_sample is not None and not clip_sample > 0:
            raise ValueError(f"clip_sample must be > 0 or None, got {clip_sample}")
        self.eta = float(eta)
        self.clip_sample = clip_sample

    def make_timesteps(self) -> list[int]:
        """"leading": t_i = floor(i * T / S), i = 0..S-1; "ldm": 1 + multiples of T // S below T; descending."""
        T, S = self.schedule.num_train_timesteps, self.num_inference_steps
        if self.spacing == "ldm":  # range(0, T, T // S) + 1, as latent diffusion's make_ddim_timesteps
            if T // S < 2:
                raise ValueError(f"DDIM spacing 'ldm' needs num_inference_steps <= {T // 2} (T // S >= 2), got {S}: "
                                 f"its grid would reach timestep {T}")
            return [t + 1 for t in range(0, T, T // S)][::-1]
        return [i * T // S for i in range(S)][::-1]

    def final_target(self) -> int:
        return 0 if self.spacing == "ldm" else CLEAN

    def sigma(self, t: int) -> float:
        """sigma_t(eta), DDIM eq. 16 (0 for a final step to CLEAN, where ab_prev = 1)."""
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(self.prev_timestep(t))
        return self.eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: Generators = None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from x_t at timestep t (one int for the whole batch) to x_{t_prev}.

        Returns ``(x_prev, x0_pred)``. Noise z (eta > 0, non-final step) is ``noise`` when given (standard
        normal, x_t's shape), else drawn from ``generator`` (one, or one per row).
        """
        t = int(t)
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(self.prev_timestep(t))
        eps = eps.to(x_t.dtype)
        # (1) predicted clean sample, DDIM eq. 12 "predicted x_0" term
        x0_pred = self.x0_from_eps(eps, t, x_t)
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
            z = randn_tensor(x_t.shape, generator, x_t.device, x_t.dtype) if noise is None else noise
            x_prev = x_prev + sigma * z
        return x_prev, x0_pred

    def carried_noise(self, z: torch.Tensor, n: torch.Tensor, t: int) -> torch.Tensor:
        """The pinning noise after the step from t: (dir_coef z + sigma n) / sqrt(1 - ab_prev) (module docstring)."""
        ab_prev = self.schedule.alpha_bar(self.prev_timestep(t))
        sigma = self.sigma(t)
        dir_coef = max(1 - ab_prev - sigma**2, 0.0) ** 0.5
        return (dir_coef * z + sigma * n) / (1 - ab_prev) ** 0.5

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: torch.Tensor, generator: Generators = None,
               known_x0: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               callback: Callback | None = None) -> torch.Tensor:
        """Full DDIM loop from x_T; returns the clean sample (b c f h w, or any shape unpinned).

        ``eps_fn(x_t, t)`` predicts the noise for the batch at int timestep t. With ``known_x0``
        and ``known_mask`` (b, f), known positions are pinned at the start (t = timesteps[0]) and
        after every step (t_prev) with one noise per window carried through the steps, see the module
        docstring.
        ``callback(i, t, t_prev, x, x0_pred)`` runs after each step (after pinning).
        """
        pinned = pinned_or_none(x_T, known_x0, known_mask)  # index and values once, not every step
        x = x_T
        z = None
        if pinned is not None:
            z = pinned.noise(generator, x)  # one draw per window, carried through every step
            x = self._pin(x, pinned, self.timesteps[0], generator, z)
        for i, t in enumerate(self.timesteps):
            eps = eps_fn(x, t)
            t_prev = self.prev_timestep(t)
            noise = None
            if self.sigma(t) > 0:
                noise = randn_tensor(x.shape, generator, x.device, x.dtype)
            x, x0_pred = self.step(eps, t, x, generator, noise)
            if pinned is not None and noise is not None:  # without step noise (sigma 0) z stays as it is
                z = self.carried_noise(z, noise[pinned.index], t)
            if pinned is not None:
                x = self._pin(x, pinned, t_prev, generator, z)
            if callback is not None:
                callback(i, t, t_prev, x, x0_pred)
        return x
