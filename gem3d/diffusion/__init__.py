"""Diffusion maths: noise schedules and the samplers (DDIM, DPM-Solver++(2M)) with known-slice pinning.

Every sampler offers the API of ``gem3d.diffusion.solver.Solver``; ``build_solver`` picks one by
name (config key ``sampling.solver``).
"""

from gem3d.diffusion.ddim import DDIMSampler
from gem3d.diffusion.dpm_solver import DPMSolverPP
from gem3d.diffusion.schedules import (
    CLEAN,
    NoiseSchedule,
    linear_betas,
    scaled_linear_betas,
)
from gem3d.diffusion.solver import Solver, randn_tensor

SOLVERS = {"ddim": DDIMSampler, "dpmpp_2m": DPMSolverPP}


def build_solver(name: str, schedule: NoiseSchedule, steps: int, eta: float, ddim_spacing: str = "leading") -> Solver:
    """The sampler ``name`` (one of SOLVERS) with ``steps`` network calls and ``eta`` in [0, 1] (DDIM: 0
    deterministic, 1 DDPM-like; dpmpp_2m: 0 the ODE, 1 the SDE); ValueError naming a value outside. DDIM also
    takes its timestep grid ``ddim_spacing`` (ddim.SPACINGS)."""
    if name not in SOLVERS:
        raise ValueError(f"solver {name!r} is not one of {sorted(SOLVERS)}")
    if not 0 <= eta <= 1:  # DDIM's variance term turns negative above 1 (clamped: outside its defined range)
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if name == "ddim":
        return DDIMSampler(schedule, num_inference_steps=steps, eta=eta, spacing=ddim_spacing)
    return SOLVERS[name](schedule, num_inference_steps=steps, eta=eta)


__all__ = ["CLEAN", "DDIMSampler", "DPMSolverPP", "NoiseSchedule", "SOLVERS", "Solver", "build_solver",
           "linear_betas", "randn_tensor", "scaled_linear_betas"]
