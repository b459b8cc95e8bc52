"""Diffusion maths: noise schedules (DDPM) and the DDIM sampler with known-slice pinning."""

from gem3d.diffusion.ddim import DDIMSampler, randn_tensor
from gem3d.diffusion.schedules import (
    CLEAN,
    NoiseSchedule,
    linear_betas,
    scaled_linear_betas,
)

__all__ = ["CLEAN", "DDIMSampler", "NoiseSchedule", "linear_betas", "randn_tensor",
           "scaled_linear_betas"]
