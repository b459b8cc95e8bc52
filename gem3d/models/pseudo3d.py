"""Pseudo-3D slice-axis layers (stage 2 of the volume model) and stage-1 -> stage-2 loading.

Inside the UNet a window of slices travels as a batch of 2D slices `(b f) c h w`. The layers
here move it to "pixels in the batch" to mix information along the slice axis f, and back:
    conv:      '(b f) c h w -> (b h w) c f'
    attention: '(b f) (h w) c -> (b h w) f c'
Both start as the identity (dirac conv weights with zero bias; zero output projection), so a
stage-2 network built from stage-1 weights computes exactly what stage 1 computed.
Every module or parameter added for the slice axis has `slice_axis` in its name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from einops import rearrange
from torch import nn

from gem3d.models.attention import Attention
from gem3d.models.embeddings import sinusoidal_embedding

SLICE_AXIS_TAG = "slice_axis"


def is_slice_axis_name(name: str) -> bool:
    """True for the state-dict keys / parameter names of slice-axis layers."""
    return SLICE_AXIS_TAG in name


class SliceAxisConv(nn.Module):
    """Conv1d(C, C, 3, padding=1) along the slice axis, identity at initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        _, _, h, w = x.shape
        x = rearrange(x, "(b f) c h w -> (b h w) c f", f=f)  # one sequence of slices per pixel
        x = self.conv(x)
        return rearrange(x, "(b h w) c f -> (b f) c h w", h=h, w=w)  # back to slices in the batch


class SliceAxisAttention(nn.Module):
    """Residual multi-head self-attention over the f slices of each pixel (zero output at init).

    A fixed sinusoidal code of the slice index inside the window is added to the normalised
    input, so the attention knows which end of the window a slice is at.
    """

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, head_dim)
        nn.init.zeros_(self.attn.to_out.weight)
        nn.init.zeros_(self.attn.to_out.bias)

    def forward(self, x: torch.Tensor, f: int) -> torch.Tensor:
        # x: ((b f), n, c) tokens of each slice, n = h * w
        n = x.shape[1]
        x = rearrange(x, "(b f) n c -> (b n) f c", f=f)  # one sequence of slices per pixel
        pos = sinusoidal_embedding(torch.arange(f, device=x.device), x.shape[-1])  # (f, c)
        h = self.norm(x) + pos.to(x.dtype)[None]
        x = x + self.attn(h)
        return rearrange(x, "(b n) f c -> (b f) n c", n=n)


def check_stage1_keys(
    target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]
) -> None:
    """Raise ValueError unless `source` holds exactly the non-slice-axis entries of `target`,
    with the same shapes."""
    target_keys, source_keys = set(target), set(source)
    missing = sorted(k for k in target_keys - source_keys if not is_slice_axis_name(k))
    unexpected = sorted(source_keys - target_keys)
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    bad_shapes = sorted(
        f"{k}: {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
        for k in target_keys & source_keys
        if tuple(source[k].shape) != tuple(target[k].shape)
    )
    if bad_shapes:
        problems.append(f"shape mismatches (stage 1 vs stage 2) {_short(bad_shapes)}")
    if problems:
        raise ValueError("stage-1 weights do not fit this network: " + "; ".join(problems))


def _short(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more
