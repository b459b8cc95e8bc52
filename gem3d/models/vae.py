"""KL autoencoder (latent-diffusion style): slices `b c h w` <-> latents `b z h/f w/f`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from gem3d.models import attention


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 1  # image channels (grey slices and masks-as-images)
    base_channels: int = 128  # width of level 0
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of level i = base_channels * channel_mult[i]
    num_res_blocks: int = 2  # res blocks per level (decoder has one more)
    latent_channels: int = 4  # z channels
    mid_attention: bool = True  # single-head attention between the middle res blocks
    norm_groups: int = 32  # GroupNorm groups
    dropout: float = 0.0
    use_checkpoint: bool = False  # gradient checkpointing of res/attention blocks while training

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        for name in ("in_channels", "base_channels", "num_res_blocks", "latent_channels", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive integer, got {value!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"VAEConfig.channel_mult must be non-empty positive integers, got {self.channel_mult}")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"VAE width {self.base_channels * mult} not divisible by norm_groups {self.norm_groups}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def paper(cls, **overrides) -> VAEConfig:
        """128 x [1,2,4,4], 2 res blocks, 4 latent channels, f = 8."""
        args = dict(in_channels=1, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                    latent_channels=4)
        return cls(**{**args, **overrides})


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents (b, z, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample: (b,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w pixels."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        qkv = rearrange(self.qkv(self.norm(x)), "b (k c) h w -> k b 1 (h w) c", k=3)  # 3 x (b, 1, hw, c)
        out = attention.sdpa(qkv[0], qkv[1], qkv[2])  # (b, 1, hw, c)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: exact halving


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and module.training and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.use_checkpoint = cfg.use_checkpoint
        g, ch = cfg.norm_groups, cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResnetBlock(ch, cfg.base_channels * mult, g, cfg.dropout))
                ch = cfg.base_channels * mult
            if level != len(cfg.channel_mult) - 1:
                self.blocks.append(Downsample(ch))
        mid = [ResnetBlock(ch, ch, g, cfg.dropout)]
        if cfg.mid_attention:
            mid.append(AttnBlock(ch, g))
        mid.append(ResnetBlock(ch, ch, g, cfg.dropout))
        self.mid = nn.ModuleList(mid)
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in [*self.blocks, *self.mid]:
            h = _run(block, h, self.use_checkpoint)
        return self.conv_out(F.silu(self.norm_out(h)))  # (b, 2z, h/f, w/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.use_checkpoint = cfg.use_checkpoint
        g = cfg.norm_groups
        ch = cfg.base_channels * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        mid = [ResnetBlock(ch, ch, g, cfg.dropout)]
        if cfg.mid_attention:
            mid.append(AttnBlock(ch, g))
        mid.append(ResnetBlock(ch, ch, g, cfg.dropout))
        self.mid = nn.ModuleList(mid)
        self.blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.blocks.append(ResnetBlock(ch, cfg.base_channels * mult, g, cfg.dropout))
                ch = cfg.base_channels * mult
            if level != 0:
                self.blocks.append(Upsample(ch))
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in [*self.mid, *self.blocks]:
            h = _run(block, h, self.use_checkpoint)
        return self.conv_out(F.silu(self.norm_out(h)))  # (b, c, h, w)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(config)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def set_grad_checkpointing(self, flag: bool) -> None:
        """Switch gradient checkpointing of the encoder/decoder blocks (the training loop calls this)."""
        self.encoder.use_checkpoint = self.decoder.use_checkpoint = bool(flag)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (b, c, h, w), h and w divisible by f -> posterior over (b, z, h/f, w/f)."""
        cfg, k = self.config, self.config.downsampling_factor
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"VAE.encode expects (b, {cfg.in_channels}, h, w), got {tuple(x.shape)}")
        if x.shape[-2] % k or x.shape[-1] % k:
            raise ValueError(f"VAE input size {tuple(x.shape[-2:])} must be divisible by {k}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (b, z, h, w) -> (b, c, h*f, w*f)."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode expects (b, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
