"""Plain 3D diffusion U-Net for whole-volume latents `b c D h w` (the conditional 3D LDM comparison).

The paper's comparison method "conditional 3D LDM" (Tables 1-2) denoises a whole volume's latent
stack at once, with the mask latents concatenated on the channels. This network is the usual
DDPM/ADM U-Net with every 2D operation made 3D: Conv3d residual blocks (GroupNorm + SiLU, the
timestep embedding added between the two convolutions), stride-2 Conv3d downsampling (all three
axes), nearest upsampling + Conv3d, and self-attention over all D x h x w tokens of a level
(torch's scaled_dot_product_attention) at `attention_levels` and in the middle block. The residual
branches and the output convolution start at zero, so a fresh network predicts zero noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from gem3d.models.attention import Attention
from gem3d.models.embeddings import timestep_embedding


@dataclass(frozen=True)
class UNet3DConfig:
    in_channels: int  # noisy latent + mask latent concatenated on channels
    out_channels: int  # predicted noise channels
    model_channels: int = 64  # width of level 0
    channel_mult: tuple[int, ...] = (1, 2, 4)  # width of level i = model_channels * channel_mult[i]
    num_res_blocks: int = 2  # res blocks per level (decoder has one more)
    attention_levels: tuple[int, ...] = (2,)  # levels with self-attention over their 3D tokens (0 = full size)
    head_dim: int = 32  # channels per attention head
    norm_groups: int = 32  # GroupNorm groups (must divide every level's width)
    dropout: float = 0.0  # dropout in res blocks

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "head_dim", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNet3DConfig.{name} must be a positive integer, got {value!r}")
        if self.model_channels % 2:  # the sinusoidal timestep embedding has this width
            raise ValueError(f"UNet3DConfig.model_channels must be even (the timestep embedding's width), got "
                             f"{self.model_channels}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNet3DConfig.channel_mult must be non-empty positive integers, got {self.channel_mult}")
        levels = range(len(self.channel_mult))
        bad = [a for a in self.attention_levels if a not in levels]
        if bad:
            raise ValueError(f"UNet3DConfig.attention_levels {bad} not in allowed levels {list(levels)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNet3DConfig.dropout must be in [0, 1), got {self.dropout}")
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            width = self.model_channels * mult
            if width % self.norm_groups:
                raise ValueError(f"UNet3DConfig.norm_groups {self.norm_groups} does not divide the width {width} "
                                 f"of level {level}")
            if (level in self.attention_levels or level == last) and width % self.head_dim:
                raise ValueError(f"UNet3DConfig.head_dim {self.head_dim} does not divide the width {width} of "
                                 f"attention level {level}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Every block has forward(x, emb): x (b, c, D, h, w); emb (b, 4 model_channels).

class InputConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv3(cin, cout)

    def forward(self, x, emb):
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, cfg: UNet3DConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin)
        self.conv1 = _conv3(cin, cout)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = _zero(_conv3(cout, cout))  # the block starts as its skip path
        self.skip = nn.Identity() if cin == cout else nn.Conv3d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h + self.emb_proj(F.silu(emb))[:, :, None, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Pre-norm residual self-attention over the D x h x w tokens of each volume (starts as the identity)."""

    def __init__(self, channels: int, cfg: UNet3DConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels)
        self.attn = Attention(channels, cfg.head_dim)
        _zero(self.attn.to_out)

    def forward(self, x, emb):
        _, _, d, h, w = x.shape
        tokens = self.attn(rearrange(self.norm(x), "b c d h w -> b (d h w) c"))
        return x + rearrange(tokens, "b (d h w) c -> b c d h w", d=d, h=h, w=w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2)

    def forward(self, x, emb):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class OutputHead(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: UNet3DConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, cin)
        self.conv = _zero(_conv3(cin, cout))

    def forward(self, x, emb):
        return self.conv(F.silu(self.norm(x)))


class Stage(nn.ModuleList):
    """A few blocks applied in order, the unit of gradient checkpointing."""

    def forward(self, x, emb):
        for block in self:
            x = block(x, emb)
        return x


class UNet3D(nn.Module):
    def __init__(self, config: UNet3DConfig):
        super().__init__()
        self.config = cfg = config
        self.grad_checkpointing = False  # the training loop switches it (set_grad_checkpointing)
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        last = len(cfg.channel_mult) - 1
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([Stage([InputConv(cfg.in_channels, mc)])])
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(ch, mc * mult, emb_dim, cfg)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(ch, cfg))
                self.input_blocks.append(Stage(blocks))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skips.append(ch)

        self.middle_block = Stage([ResBlock(ch, ch, emb_dim, cfg), AttentionBlock(ch, cfg),
                                   ResBlock(ch, ch, emb_dim, cfg)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), mc * mult, emb_dim, cfg)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(ch, cfg))
                if level != 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                self.output_blocks.append(Stage(blocks))
        self.out = OutputHead(ch, cfg.out_channels, cfg)

    def set_grad_checkpointing(self, flag: bool) -> None:
        self.grad_checkpointing = bool(flag)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, context: None = None) -> torch.Tensor:
        """x: (b, in_channels, D, h, w); t: (b,) or one int timestep. Returns (b, out_channels, D, h, w).

        `context` exists for the shared diffusion loss (gem3d.training.diffusion_training.eps_loss),
        which passes context=None; this network has no cross-attention.
        """
        cfg = self.config
        if context is not None:
            raise ValueError("UNet3D has no cross-attention: context must be None")
        if x.dim() != 5:
            raise ValueError(f"UNet3D input must be (b, c, D, h, w), got shape {tuple(x.shape)}")
        b, c, *size = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"UNet3D expects {cfg.in_channels} input channels, got {c}")
        k = cfg.downsampling_factor
        if any(s % k for s in size):
            raise ValueError(f"UNet3D input size {'x'.join(map(str, size))} must be divisible by {k} on every axis")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t
        if t.shape != (b,):
            raise ValueError(f"UNet3D timesteps must be one int or shape ({b},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(x.dtype))  # (b, 4 mc)

        skips = []
        hidden = x
        for stage in self.input_blocks:
            hidden = self._run(stage, hidden, emb)
            skips.append(hidden)
        hidden = self._run(self.middle_block, hidden, emb)
        for stage in self.output_blocks:
            hidden = self._run(stage, torch.cat([hidden, skips.pop()], dim=1), emb)
        return self.out(hidden, emb)

    def _run(self, stage: Stage, x, emb):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, x, emb, use_reentrant=False)
        return stage(x, emb)
