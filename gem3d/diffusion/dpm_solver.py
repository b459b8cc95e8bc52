"""DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2) with exact known-slice pinning,
and its SDE form (eta > 0; SDE-DPM-Solver++(2M), Lu et al. 2022 section 5 / k-diffusion's dpmpp_2m_sde).

A second-order multistep solver for the same epsilon-prediction networks DDIM samples, in its
data-prediction form: with eta = 0 a deterministic solver of the probability-flow ODE, with eta = 1
a solver of the reverse SDE (fresh noise every step, as DDIM's eta = 1 steps of the paper). Notation: alpha_t =
sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR), the data
prediction x0_t = (x_t - sigma_t eps(x_t, t)) / alpha_t. One step from t (network called at t) to
the next grid timestep s, with h = lambda_s - lambda_t > 0:

    x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D,                      (eta = 0, the ODE)
    x_s = (sigma_s / sigma_t) exp(-eta h) x_t + alpha_s (1 - exp(-(1 + eta) h)) D
          + sigma_s sqrt(1 - exp(-2 eta h)) n,   n ~ N(0, I)                      (eta in (0, 1])
    D = x0_t                                           (first step: first order, = DDIM eta 0)
    D = (1 + 1 / (2 r)) x0_t - 1 / (2 r) x0_u,   r = h_u / h   (later steps; u the timestep before t,
                                                                 h_u = lambda_t - lambda_u)

The step from the last grid timestep 0 goes to CLEAN (lambda = infinity) and returns x0_0, as
DDIM's final step does; there the second-order correction is undefined (r = 0), so it is first
order. S steps are S network calls. Error at the end point: O(1/S^2) (O(1/S) for DDIM), tested on
Gaussian data, whose probability-flow ODE has a closed-form solution (tests/test_dpm_solver.py).

Timestep grid: logSNR-uniform on the discrete schedule. The S targets lambda_i are equally spaced
from lambda_{T-1} (where x_T ~ N(0, I) stands) to lambda_0; each becomes the integer timestep whose
lambda is nearest, then the list is made strictly decreasing (0 stays last, T - 1 first), so S steps
are always S distinct timesteps (at many steps the lowest ones crowd onto 0, 1, 2, ...: lambda_0 -
lambda_1 = 0.35 on the latent-diffusion schedule). Why not time-uniform t: the solver's error
terms are powers of the step h in lambda, and time-uniform steps on the scaled-linear schedule make
the last steps huge in lambda (15 steps: 71 -> 0 spans lambda 1.3 -> 3.5). On the closed-form
Gaussian case (per-dimension std 0.05..1) the end-point RMS error at 10 / 15 / 25 steps is
0.013 / 0.0064 / 0.0023 with the logSNR grid and 0.11 / 0.077 / 0.044 with the time-uniform one
(DDIM eta 0: 0.099 / 0.071 / 0.046), and only the logSNR grid shows the second order (slope -1.86
on log error vs log steps from 15 to 80 steps; -1.2 time-uniform). Time-uniform steps are common
with latent image models; on this closed-form case the logSNR grid is clearly better, and the
real-scan comparison in docs/results.md is what tells for scans.

eta: 0 is the ODE (no noise after x_T: the only randomness is x_T and the pinning noise); 1 is the
SDE, whose fresh noise n at every step comes from each volume's generator; values in between
interpolate (k-diffusion's eta). Why the SDE: on the hippocampus CPU run the ODE at 15 or 25 steps
gave the same result, 0.02 MS-SSIM below the paper's DDIM 200 with eta 1 (docs/results.md), the gap of
a deterministic sampler to a stochastic one at this training length, not a step-count error.

Known-slice pinning, and why it keeps known slices exact:
- each window draws ONE noise z for its known slices (from the volume's generator, at the start)
  and, at the start and after every step, sets them to add_noise(known_x0, z, t) at the timestep
  t of the grid the window is at (the CURRENT timestep: timesteps[0] at the start, then the
  step's target); after the final step, at CLEAN, they are known_x0 exactly;
- the data predictions kept for the next step (the multistep history, x0_t and x0_u above) hold
  known_x0 at the known slices, never the network's prediction there, so no unpinned value of a
  known slice enters a later step.
With both, the solver's own update maps a pinned value alpha_t known + sigma_t z to exactly
alpha_s known + sigma_s z (D = known; (sigma_s / sigma_t)(alpha_t known + sigma_t z) - alpha_s
(exp(-h) - 1) known = sigma_s z + alpha_s known, since alpha_s exp(-h) = alpha_t sigma_s / sigma_t):
the known slices follow the probability-flow path of a point at known_x0, and the pin after each
step only removes rounding. With eta > 0 the same algebra gives alpha_s known + sigma_s z' with
z' = exp(-eta h) z + sqrt(1 - exp(-2 eta h)) n (unit variance): the window's pinning noise is
carried forward as z' with the step's own n at the known slices, so again the pin only removes
rounding (DDIM carries its pinning noise the same way, gem3d/diffusion/ddim.py). Fresh noise at every
step would instead make the known slices jump between unrelated noise draws, and the multistep
extrapolation of their neighbours, which see them through the slice-axis layers, would amplify
the jumps. The update is elementwise, so the unknown slices are never written by the pin.
"""

from __future__ import annotations

import math

import torch

from gem3d.diffusion.schedules import CLEAN, NoiseSchedule
from gem3d.diffusion.solver import Callback, EpsFn, Generators, Solver, pinned_or_none, randn_tensor

__all__ = ["DPMSolverPP"]


class DPMSolverPP(Solver):
    """DPM-Solver++(2M) for epsilon-prediction models; logSNR-uniform ``timesteps`` (module docstring)."""

    name = "dpmpp_2m"

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int = 15, eta: float = 0.0) -> None:
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1] for dpmpp_2m (0: the ODE, 1: the SDE), got {eta}")
        super().__init__(schedule, num_inference_steps)
        self.eta = float(eta)

    def make_timesteps(self) -> list[int]:
        """logSNR-uniform integer timesteps, strictly decreasing from T - 1 to 0 (module docstring)."""
        T, S = self.schedule.num_train_timesteps, self.num_inference_steps
        ab = self.schedule.alphas_cumprod
        lam = 0.5 * torch.log(ab / (1 - ab))  # (T,) float64, decreasing in t
        targets = torch.linspace(float(lam[-1]), float(lam[0]), S, dtype=torch.float64)
        ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # nearest t per target, descending
        for i in range(S - 2, -1, -1):  # from the clean end: each one above the next
            ts[i] = max(ts[i], ts[i + 1] + 1)
        ts[0] = min(ts[0], T - 1)
        for i in range(1, S):  # from the noisy end: each one below the previous (stays >= S - 1 - i)
            ts[i] = min(ts[i], ts[i - 1] - 1)
        return [int(t) for t in ts]

    def lam(self, t: int) -> float:
        """lambda_t = log(alpha_t / sigma_t); +inf at CLEAN."""
        ab = self.schedule.alpha_bar(t)
        return math.inf if int(t) == CLEAN else 0.5 * math.log(ab / (1 - ab))

    def step(self, x_t: torch.Tensor, t: int, x0: torch.Tensor,
             prev: tuple[int, torch.Tensor] | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One step from x_t at grid timestep t to ``prev_timestep(t)``, given the data prediction
        ``x0`` at t and ``prev = (u, x0_u)``, the previous network call's timestep and data
        prediction (None at the first step: first order); ``noise`` (standard normal, x_t's shape)
        is needed when eta > 0. At CLEAN the result is x0."""
        s = self.prev_timestep(t)
        if s == CLEAN:
            return x0
        h = self.lam(s) - self.lam(t)
        if prev is None:
            d = x0
        else:
            u, x0_u = prev
            half_inv_r = h / (2 * (self.lam(t) - self.lam(u)))  # 1 / (2 r), r = h_u / h
            d = (1 + half_inv_r) * x0 - half_inv_r * x0_u
        ab_t, ab_s = self.schedule.alpha_bar(t), self.schedule.alpha_bar(s)
        if self.eta == 0:
            return ((1 - ab_s) / (1 - ab_t)) ** 0.5 * x_t - ab_s**0.5 * math.expm1(-h) * d
        if noise is None:
            raise ValueError(f"dpmpp_2m with eta {self.eta} needs the step's noise")
        return (((1 - ab_s) / (1 - ab_t)) ** 0.5 * math.exp(-self.eta * h) * x_t
                - ab_s**0.5 * math.expm1(-(1 + self.eta) * h) * d
                + (1 - ab_s) ** 0.5 * (-math.expm1(-2 * self.eta * h)) ** 0.5 * noise)

    def carried_noise(self, z: torch.Tensor, n: torch.Tensor, t: int) -> torch.Tensor:
        """The pinning noise after the step from t: exp(-eta h) z + sqrt(1 - exp(-2 eta h)) n (module docstring)."""
        h = self.lam(self.prev_timestep(t)) - self.lam(t)
        return math.exp(-self.eta * h) * z + (-math.expm1(-2 * self.eta * h)) ** 0.5 * n

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: torch.Tensor, generator: Generators = None,
               known_x0: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               callback: Callback | None = None) -> torch.Tensor:
        """The whole loop from x_T (at timesteps[0]); returns the clean sample.

        ``eps_fn(x_t, t)`` predicts the noise at int timestep t. With ``known_x0`` and
        ``known_mask`` (b, f) the known slices are pinned with one noise draw per window (carried
        forward with the step's noise when eta > 0) and the history holds their known latents (module
        docstring). ``callback(i, t, t_prev, x, x0_pred)`` runs after each step (after pinning).
        ``generator`` (one, or one per row) gives the pinning noise and, with eta > 0, each step's noise.
        """
        pinned = pinned_or_none(x_T, known_x0, known_mask)
        x = x_T
        z = None
        if pinned is not None:
            z = pinned.noise(generator, x)  # one draw per window, kept for every step
            x = self._pin(x, pinned, self.timesteps[0], generator, z)
        prev = None
        for i, t in enumerate(self.timesteps):
            x0 = self.x0_from_eps(eps_fn(x, t), t, x)
            if pinned is not None:
                x0 = pinned.write(x0, pinned.values)  # the history holds the known latents
            t_prev = self.prev_timestep(t)
            noise = None
            if self.eta > 0 and t_prev != CLEAN:
                noise = randn_tensor(x.shape, generator, x.device, x.dtype)
                if pinned is not None:
                    z = self.carried_noise(z, noise[pinned.index], t)
            x = self.step(x, t, x0, prev, noise)
            if pinned is not None:
                x = self._pin(x, pinned, t_prev, generator, z)
            if callback is not None:
                callback(i, t, t_prev, x, x0)
            prev = (t, x0)
        return x
