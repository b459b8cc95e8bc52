"""Latent diffusion's attention blocks, for networks trained with its `openaimodel` UNet (UNetConfig.attention "ldm").

The residual blocks, convolutions, up/down-sampling and timestep embedding of latent diffusion's UNet compute
what gem3d's own do; its attention blocks differ, so a network from a latent-diffusion checkpoint (the GEM-3D
authors' release among them) uses these:

- `QKVAttentionBlock` (no context): x + proj_out(attention(qkv(GroupNorm(x)))) over the pixels of a slice, with
  one 1x1 convolution making q, k and v (biases included). Its output channels are laid out per head
  ("legacy" order, latent diffusion's default: [q_1 k_1 v_1 q_2 k_2 v_2 ...]) or per tensor ("new" order:
  [q_1 q_2 ... k_1 ... v_1 ...], their `use_new_attention_order`). Pseudo-3D (the GEM-3D authors' stage 2):
  then x + slice_axis_proj_out(attention(slice_axis_qkv(GroupNorm(x)))) over the f slices of each pixel, with
  the SAME GroupNorm module applied to the `(b h w) c f` layout (statistics over the channels of a group and
  the f slices), heads as above, and no position code; its output projection starts at zero.
- `SpatialTransformer` (a context, the slice model): GroupNorm (eps 1e-6) -> 1x1 conv -> `depth` transformer
  blocks (x + self-attn(LN x); x + cross-attn(LN x, context); x + GEGLU(LN x)) -> zero-initialised 1x1 conv,
  plus the block's input.
Attention is softmax(q k^T / sqrt(d)) v with d the head width, as latent diffusion's q * d^-1/4, k * d^-1/4.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from gem3d.models.attention import Attention, FeedForward, sdpa

QKV_ORDERS = ("legacy", "new")


def _split_qkv(qkv: torch.Tensor, heads: int, order: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3C, T) from the qkv convolution -> q, k, v as (B, heads, T, d)."""
    if order == "legacy":
        q, k, v = rearrange(qkv, "b (h three d) t -> three b h t d", h=heads, three=3)
    else:
        q, k, v = rearrange(qkv, "b (three h d) t -> three b h t d", h=heads, three=3)
    return q, k, v


def _attend(qkv: torch.Tensor, heads: int, order: str) -> torch.Tensor:
    """(B, 3C, T) -> (B, C, T): multi-head softmax attention over the T positions."""
    q, k, v = _split_qkv(qkv, heads, order)
    out = sdpa(q, k, v)  # (B, heads, T, d)
    return rearrange(out, "b h t d -> b (h d) t")


def _zero(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class QKVAttentionBlock(nn.Module):
    """latent diffusion's AttentionBlock; with `slice_axis`, the GEM-3D authors' slice-axis attention after it."""

    def __init__(self, channels: int, heads: int, norm_groups: int, order: str = "legacy", slice_axis: bool = False):
        super().__init__()
        if order not in QKV_ORDERS:
            raise ValueError(f"qkv order must be one of {list(QKV_ORDERS)}, got {order!r}")
        self.heads, self.order = heads, order
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))
        self.slice_axis_qkv = self.slice_axis_proj_out = None
        if slice_axis:
            self.slice_axis_qkv = nn.Conv1d(channels, 3 * channels, 1)
            self.slice_axis_proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x, emb, context, f):
        _, _, h, w = x.shape
        t = rearrange(x, "bf c h w -> bf c (h w)")  # the pixels of each slice
        t = t + self.proj_out(_attend(self.qkv(self.norm(t)), self.heads, self.order))
        if self.slice_axis_qkv is not None:
            t = rearrange(t, "(b f) c (h w) -> (b h w) c f", f=f, h=h)  # the slices of each pixel
            t = t + self.slice_axis_proj_out(_attend(self.slice_axis_qkv(self.norm(t)), self.heads, self.order))
            return rearrange(t, "(b h w) c f -> (b f) c h w", h=h, w=w)
        return rearrange(t, "bf c (h w) -> bf c h w", h=h)


class TransformerBlock(nn.Module):
    """x + attn1(LN x); x + attn2(LN x, context); x + GEGLU(LN x) (latent diffusion's BasicTransformerBlock)."""

    def __init__(self, dim: int, head_dim: int, context_dim: int, ff_mult: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, head_dim)
        self.attn2 = Attention(dim, head_dim, context_dim=context_dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """latent diffusion's SpatialTransformer with 1x1 convolutions in and out (2D only)."""

    def __init__(self, channels: int, head_dim: int, depth: int, context_dim: int, norm_groups: int, ff_mult: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, head_dim, context_dim, ff_mult) for _ in range(depth))
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))
        for block in self.transformer_blocks:  # a fresh block is the identity, as gem3d's own
            for out in (block.attn1.to_out, block.attn2.to_out, block.ff.proj_out):
                _zero(out)

    def forward(self, x, emb, context, f):
        _, _, h, w = x.shape
        t = rearrange(self.proj_in(self.norm(x)), "bf c h w -> bf (h w) c")
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + self.proj_out(rearrange(t, "bf (h w) c -> bf c h w", h=h, w=w))
