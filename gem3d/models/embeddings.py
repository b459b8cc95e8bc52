"""Sinusoidal embeddings: diffusion timesteps and the normalised slice position p in [0, 1]."""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Map values x (n,) to (n, dim) features [cos(x w_k), sin(x w_k)], w_k = max_period^(-k/half)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"embedding dim must be an even integer >= 2, got {dim}")
    if x.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of values, got shape {tuple(x.shape)}")
    half = dim // 2
    k = torch.arange(half, device=x.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = x.float()[:, None] * freqs[None, :]  # (n, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (n, dim)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Diffusion timesteps t (n,) (integers 0..T-1 or floats) -> (n, dim) float32."""
    return sinusoidal_embedding(t, dim, max_period)


def position_embedding(p: torch.Tensor | float, dim: int = 128, scale: float = 1000.0) -> torch.Tensor:
    """Normalised slice position p in [0, 1] (n,) -> (n, dim) float32.

    p is stretched to [0, scale] first so the sinusoid's frequencies span the whole range
    (the same spread a diffusion timestep in [0, 1000) gets). The slice model uses the result as
    its cross-attention context (a single token per sample).
    """
    p = torch.as_tensor(p, dtype=torch.float32)
    if p.dim() == 0:
        p = p[None]
    # Checked on the CPU only (on a GPU the check would stall on a device-to-host copy); training
    # calls this on the CPU batch and the sampler on CPU positions.
    if p.numel() and p.device.type == "cpu" and (p.min() < -1e-6 or p.max() > 1 + 1e-6):
        raise ValueError(
            f"slice position must lie in [0, 1], got values in [{p.min().item():.4g}, {p.max().item():.4g}]"
        )
    return sinusoidal_embedding(p.clamp(0.0, 1.0) * scale, dim)
