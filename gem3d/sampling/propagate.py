"""Bi-directional propagation (GEM-3D Algorithm 1) over several volumes at once.

For every volume a window plan is made (``gem3d.sampling.windows``). Round r of all volumes
(the first windows in round 0; the r-th upward AND downward windows later) is stacked into ONE
batch ``b c f h w`` and denoised through the whole loop of the configured solver (DDIM or
DPM-Solver++, any ``gem3d.diffusion.Solver``: this module does not know which), with the already
generated slices pinned at the solver's current timestep (``Solver.sample`` with ``known_x0``).

Conditioning per window: ``cond = concat(mask latent window, informed latent repeated over f)``
along channels (``use_informed=True``), or the mask latent window alone (``use_informed=False``,
baseline Make-A-Volume). The informed latent of round 0 is the caller's (IC / IG / true /
fixed); for later rounds it is the clean generated latent of the window's ``informed_slice``
(the boundary slice just generated).

Switches:
- ``pin=False``: the paper's "no overlapped inpainting" ablation. Windows still overlap and the
  informed slice is still the boundary slice, but nothing is pinned; the overlapped slices of the
  output come from the EARLIER window (the one that generated them first), the later window's
  values for them are discarded.
- ``independent_windows=True``: baseline sampling: the volume is tiled by windows without
  overlap (``plan_independent_windows``), all denoised in a single round, nothing pinned;
  ``starts`` is ignored. With ``use_informed`` every tile gets the caller's informed latent.

Assembly: each output slice is taken from the window that generated it first; with pinning, the
later windows hold exactly the same values at those positions (pinning at CLEAN is exact).

Reproducibility: each volume has its own generator, and all noise of its windows (x_T, DDIM eta
noise, pinning noise) is drawn from it alone (per-row generators of the solvers), so a volume
does not depend on the other volumes of its batch (up to floating-point rounding of batched
convolutions). ``max_batch_windows`` only splits the model calls, so results do not depend on it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from einops import repeat

from gem3d.diffusion import Solver, randn_tensor
from gem3d.sampling.windows import (
    Round,
    Window,
    plan_independent_windows,
    plan_windows,
)

__all__ = ["Round", "Window", "plan_independent_windows", "plan_windows", "propagate_volumes"]

logger = logging.getLogger("gem3d.sampling")

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _validate(cond_latents, informed_latents, starts, latent_channels, use_informed) -> None:
    if not cond_latents:
        raise ValueError("cond_latents is empty: give at least one mask latent volume")
    if len(informed_latents) != len(cond_latents) or len(starts) != len(cond_latents):
        raise ValueError(f"got {len(cond_latents)} mask latents, {len(informed_latents)} informed "
                         f"latents and {len(starts)} starts: the three lists must match")
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    hw = None
    for v, m in enumerate(cond_latents):
        if m.ndim != 4:
            raise ValueError(f"mask latent {v} must be (c_m, d, h, w), got {tuple(m.shape)}")
        if hw is not None and tuple(m.shape[-2:]) != hw:
            raise ValueError(f"mask latent {v} has slice size {tuple(m.shape[-2:])}, others {hw}: "
                             "volumes batched together need the same h, w")
        hw = tuple(m.shape[-2:])
        if not use_informed:
            continue
        inf = informed_latents[v]
        if inf is None:
            raise ValueError(f"volume {v}: use_informed=True needs an informed latent, got None")
        if inf.ndim != 3 or tuple(inf.shape) != (latent_channels, *hw):
            raise ValueError(f"informed latent {v} must be ({latent_channels}, {hw[0]}, {hw[1]}), "
                             f"got {tuple(inf.shape)}")


def propagate_volumes(model_fn: ModelFn, sampler: Solver, cond_latents: list[torch.Tensor],
                      informed_latents: list[torch.Tensor | None], starts: list[int], n: int,
                      overlap: int, latent_channels: int, generators: list[torch.Generator],
                      use_informed: bool = True, pin: bool = True,
                      independent_windows: bool = False,
                      max_batch_windows: int | None = None,
                      context_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Generate one latent volume (c, d, h, w) per mask latent (c_m, d, h, w).

    ``model_fn(x_t: b c f h w, t: (b,) long, cond: b c' f h w) -> eps (b c f h w)``.
    ``informed_latents[v]``: (latent_channels, h, w) latent of the informed slice at
    ``starts[v]`` (may be None when ``use_informed=False``). ``generators[v]``: volume v's noise.
    ``max_batch_windows``: at most this many windows per model call (None: the whole round in one
    call). ``context_fn``: informed latents of a round's windows (b, c, h, w) -> a context per window (b, m, d), handed
    to ``model_fn(x_t, t, cond, context)`` (the cross-attention variant with a frozen encoder). Conventions: module
    docstring.
    """
    _validate(cond_latents, informed_latents, starts, latent_channels, use_informed)
    if len(generators) != len(cond_latents):
        raise ValueError(f"got {len(generators)} generators for {len(cond_latents)} volumes: give one per volume")
    if max_batch_windows is not None and max_batch_windows < 1:
        raise ValueError(f"max_batch_windows must be >= 1 or None, got {max_batch_windows}")
    if independent_windows:
        plans = [plan_independent_windows(m.shape[1], n) for m in cond_latents]
    else:
        plans = [plan_windows(m.shape[1], n, p, overlap) for m, p in zip(cond_latents, starts)]

    ref = cond_latents[0]
    device, dtype = ref.device, ref.dtype
    h, w = ref.shape[-2:]
    outputs = [torch.zeros(latent_channels, m.shape[1], h, w, device=device, dtype=dtype)
               for m in cond_latents]
    n_rounds = max(len(plan) for plan in plans)

    for r in range(n_rounds):
        tic = time.perf_counter()
        items: list[tuple[int, Window]] = [(v, win) for v, plan in enumerate(plans)
                                           if r < len(plan) for win in plan[r].windows]
        b = len(items)
        # conditions: per window (c_m + c, f, h, w), stacked to b c' f h w
        conds, window_informed = [], []
        for v, win in items:
            mask_win = cond_latents[v][:, win.start:win.stop]  # (c_m, f, h, w)
            if use_informed:
                if r == 0 or win.informed_slice is None:
                    inf = informed_latents[v].to(device, dtype)  # (c, h, w)
                else:
                    inf = outputs[v][:, win.informed_slice]  # clean boundary slice (c, h, w)
                window_informed.append(inf)
                inf = repeat(inf, "c h w -> c f h w", f=n)
                conds.append(torch.cat([mask_win, inf], dim=0))
            else:
                conds.append(mask_win)
        cond = torch.stack(conds, dim=0)  # b c' f h w
        # a context per window, from its informed slice (a frozen encoder's embedding), once per round
        context = context_fn(torch.stack(window_informed)).to(device) if context_fn is not None else None

        known = torch.zeros(b, latent_channels, n, h, w, device=device, dtype=dtype)
        known_mask = torch.zeros(b, n, dtype=torch.bool)  # on the CPU: the sampler reads it every step
        if pin:
            for i, (v, win) in enumerate(items):
                for s, pos in zip(win.pinned_slices, win.pinned_positions):
                    known[i, :, pos] = outputs[v][:, s]
                    known_mask[i, pos] = True

        chunk = b if max_batch_windows is None else max_batch_windows

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            parts = []
            for lo in range(0, b, chunk):
                hi = min(lo + chunk, b)
                t_vec = torch.full((hi - lo,), t, dtype=torch.long, device=device)  # (b,)
                if context is None:
                    parts.append(model_fn(x[lo:hi], t_vec, cond[lo:hi]))
                else:
                    parts.append(model_fn(x[lo:hi], t_vec, cond[lo:hi], context[lo:hi]))
            return torch.cat(parts, dim=0)  # b c f h w

        row_generators = [generators[v] for v, _ in items]  # each window draws from its volume's generator
        x_T = randn_tensor((b, latent_channels, n, h, w), row_generators, device, dtype)
        x0 = sampler.sample(eps_fn, x_T, row_generators, known_x0=known, known_mask=known_mask)

        for i, (v, win) in enumerate(items):
            for s in win.new_slices:
                outputs[v][:, s] = x0[i, :, s - win.start]
        n_vol = len({v for v, _ in items})
        logger.info("round %d/%d: %d windows of %d volumes, %d %s steps, pinned %d slices, "
                    "%.1fs", r + 1, n_rounds, b, n_vol, len(sampler.timesteps), sampler.name,
                    int(known_mask.sum()), time.perf_counter() - tic)
    return outputs
