"""Multi-head attention on top of F.scaled_dot_product_attention, and a GEGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# The CUDA flash and memory-efficient SDPA kernels put the batch on a grid axis limited to
# 65535 blocks (pytorch/pytorch#146704, #142228). Slice-axis attention has one sequence per pixel
# (64 windows of 32x32 latents: 65536), so larger batches are split into equal chunks.
MAX_SDPA_BATCH = 65535


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, heads, N, d), k/v (B, heads, M, d) -> (B, heads, N, d), chunked over B if B > 65535."""
    n_chunks = -(-q.shape[0] // MAX_SDPA_BATCH)
    if n_chunks <= 1:
        return F.scaled_dot_product_attention(q, k, v)
    chunk = -(-q.shape[0] // n_chunks)
    parts = [
        F.scaled_dot_product_attention(qc, kc, vc)
        for qc, kc, vc in zip(q.split(chunk), k.split(chunk), v.split(chunk))
    ]
    return torch.cat(parts, dim=0)


class Attention(nn.Module):
    """Self-attention (context None) or cross-attention over tokens: x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim {head_dim}")
        self.heads = dim // head_dim
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, heads, N, d)
        k = rearrange(self.to_k(ctx), "b m (h d) -> b h m d", h=self.heads)  # (B, heads, M, d)
        v = rearrange(self.to_v(ctx), "b m (h d) -> b h m d", h=self.heads)
        out = sdpa(q, k, v)  # (B, heads, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, C)
        return self.to_out(out)


class FeedForward(nn.Module):
    """GEGLU feed-forward: (B, N, C) -> (B, N, C), hidden width mult * C."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(h * F.gelu(gate)))
