"""What every sampler of gem3d/diffusion shares: the solver API, per-row noise and known-slice pinning.

A solver (``ddim.DDIMSampler``, ``dpm_solver.DPMSolverPP``; ``gem3d.diffusion.build_solver`` picks
one by name, config key ``sampling.solver``) is built on the noise schedule a network was trained
with and a number of steps S, and offers:
- ``timesteps``: the S integer timesteps the network is called at, descending to 0 (a 1-step
  grid may be one other timestep); each solver chooses its own grid (its module docstring says
  which and why);
- ``prev_timestep(t)``: where one step from t lands (the next timestep; ``CLEAN`` (-1) after the last,
  so the final step returns the clean sample; DDIM's ``ldm`` grid lands on timestep 0 as latent diffusion's);
- ``pin_known(x, known_x0, mask, t, generator)``: the known slices of x replaced by their clean
  latents noised to timestep t;
- ``sample(eps_fn, x_T, generator, known_x0, known_mask, callback)``: the whole loop, pinning the
  known slices at the start and after every step at the timestep x then sits at, with
  ``callback(i, t, t_prev, x, x0_pred)`` after each step (after pinning).
Propagation (gem3d/sampling/propagate.py) uses only this API: it does not know which solver runs.

Noise and reproducibility: ``generator`` is one ``torch.Generator`` for the whole batch, or a
sequence with one generator per batch row; then row i's noise (x_T, a stochastic solver's step
noise, the pinning noise) comes from generator i alone, so a volume's result does not depend on
the other volumes of its batch. Noise is drawn on the generator's device (the CPU in sampling) so a
seed gives the same noise on every device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from gem3d.diffusion.schedules import CLEAN, NoiseSchedule

Generators = torch.Generator | Sequence[torch.Generator] | None
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]


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


class Pinned:
    """The pinned (row, slice) pairs of a window batch, in row-major order: their clean latents
    ``values`` (k, c, h, w), the index that writes k slices into ``b c f h w`` and the row of each
    (for per-row noise)."""

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

    def noise(self, generator: Generators, like: torch.Tensor) -> torch.Tensor:
        """Fresh standard normal noise for the pinned slices (k, c, h, w), row i's from its generator."""
        return randn_tensor(self.values.shape, generator, like.device, like.dtype, rows=self.rows)

    def write(self, x: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
        """A copy of x (b c f h w) with the pinned positions set to ``slices`` (k, c, h, w)."""
        x = x.clone()
        x[self.index] = slices
        return x


def pinned_or_none(x: torch.Tensor, known_x0: torch.Tensor | None, known_mask: torch.Tensor | None) -> Pinned | None:
    if known_x0 is None or known_mask is None or not bool(known_mask.any()):
        return None
    return Pinned(x, known_x0, known_mask)


class Solver:
    """Base of the samplers: validated step count, the timestep grid and its successor map, x0 from
    eps, and pinning. Subclasses set ``name``, implement ``make_timesteps`` and ``sample``."""

    name = ""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int) -> None:
        T = schedule.num_train_timesteps
        if int(num_inference_steps) != num_inference_steps or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {T}], got {num_inference_steps}")
        self.schedule = schedule
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps: list[int] = self.make_timesteps()
        self._prev = dict(zip(self.timesteps, self.timesteps[1:] + [self.final_target()]))

    def make_timesteps(self) -> list[int]:
        raise NotImplementedError

    def final_target(self) -> int:
        """Where the last step lands: CLEAN (the clean sample) unless a solver's grid says otherwise."""
        return CLEAN

    def prev_timestep(self, t: int) -> int:
        """Timestep after one step from t (the next of ``timesteps``), CLEAN (-1) after t = 0."""
        try:
            return self._prev[int(t)]
        except KeyError:
            raise ValueError(f"timestep {t} is not one of this sampler's {len(self.timesteps)} timesteps") from None

    def x0_from_eps(self, eps: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
        """The data prediction of an epsilon model: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
        if eps.shape != x_t.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != x_t shape {tuple(x_t.shape)}")
        ab_t = self.schedule.alpha_bar(int(t))
        return (x_t - (1 - ab_t) ** 0.5 * eps.to(x_t.dtype)) / ab_t**0.5

    def pin_known(self, x: torch.Tensor, known_x0: torch.Tensor, positions_mask: torch.Tensor,
                  t: int, generator: Generators = None) -> torch.Tensor:
        """RePaint replacement: x (b c f h w) at timestep t; where ``positions_mask`` (b, f) is
        True, x is replaced by add_noise(known_x0, fresh noise, t). Returns a new tensor. (The samplers pin
        with one noise per window carried through their steps: ``_pin`` with ``noise``.)

        ``t`` must be the timestep x sits at (CLEAN = -1: exact known_x0, no noise drawn).
        ``known_x0`` values outside the mask are ignored. Noise is drawn for the pinned slices
        only, in row-major order (row i's from ``generator[i]`` when one is given per row). Pass
        ``positions_mask`` on the CPU: reading it from a GPU costs a sync.
        """
        return self._pin(x, Pinned(x, known_x0, positions_mask), t, generator)

    def _pin(self, x: torch.Tensor, pinned: Pinned, t: int, generator: Generators,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Pinned positions of x set to their known latents at timestep t, noised with ``noise``
        (fresh from ``generator`` when None); exact known latents at CLEAN."""
        known = pinned.values
        if int(t) != CLEAN:
            noise = pinned.noise(generator, x) if noise is None else noise
            known = self.schedule.add_noise(known, noise, int(t))
        return pinned.write(x, known)

    def sample(self, eps_fn: EpsFn, x_T: torch.Tensor, generator: Generators = None,
               known_x0: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               callback: Callback | None = None) -> torch.Tensor:
        raise NotImplementedError
