"""Patch discriminator (PatchGAN) and the KL autoencoder trained against it.

`PatchDiscriminator`: latent diffusion's autoencoder discriminator (pix2pix's NLayerDiscriminator):
a 4x4 stride-2 convolution and LeakyReLU(0.2), `layers - 1` more stride-2 convolutions with norm
and LeakyReLU (width doubling up to 8x), one stride-1 convolution with norm and LeakyReLU, and a
stride-1 convolution to one logit per patch: `b c h w -> b 1 h' w'`. The norm is GroupNorm, not
latent diffusion's BatchNorm: no running statistics, so scoring reconstructions for the generator
moves no buffer, and the result does not depend on how a batch is split over processes.

`AdversarialVAE`: the module the shared training loop trains when the adversarial term is on (the
loop trains every parameter of the module it is given with one optimizer). Its forward returns
the reconstruction, the posterior, the discriminator's logits for the GENERATOR term (computed
with detached discriminator parameters: torch.func.functional_call, so no generator gradient
reaches the discriminator) and the discriminator's hinge loss (on detached reconstructions, so no
discriminator gradient reaches the autoencoder). One backward of their weighted sum trains both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gem3d.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 1  # image channels (grey slices and masks-as-images)
    base_channels: int = 64  # width of the first convolution (latent diffusion: 64)
    layers: int = 3  # stride-2 convolutions (latent diffusion: 3); the patch map is ~ size / 2**layers - 2

    def __post_init__(self):
        for name in ("in_channels", "base_channels", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be a positive integer, got {value!r}")

    def min_input_size(self) -> int:
        """Smallest square input with a patch map of at least 1x1: (m + 2) * 2**layers (m = 1)."""
        return 3 * 2 ** self.layers


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class PatchDiscriminator(nn.Module):
    """`b c h w` -> `b 1 h' w'` logits, one per overlapping patch."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        width = config.base_channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, width, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        for n in range(1, config.layers + 1):
            cin, width = width, config.base_channels * min(2 ** n, 8)
            stride = 2 if n < config.layers else 1
            layers += [nn.Conv2d(cin, width, 4, stride=stride, padding=1, bias=False), _norm(width),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for module in self.net:  # latent diffusion's (pix2pix's) initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.min_input_size()
        if x.shape[-1] < size or x.shape[-2] < size:
            raise ValueError(f"PatchDiscriminator with {self.config.layers} layers needs slices of at least "
                             f"{size}x{size}, got {tuple(x.shape[-2:])}")
        return self.net(x)


def hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: (mean relu(1 - real) + mean relu(1 + fake)) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


@dataclass(frozen=True)
class AdversarialVAEConfig:
    vae: dict = field(default_factory=dict)  # VAEConfig fields
    discriminator: dict = field(default_factory=dict)  # DiscriminatorConfig fields

    def __post_init__(self):  # validate, and store plain values (lists, not tuples) for the checkpoint
        plain = lambda cfg: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}  # noqa: E731
        object.__setattr__(self, "vae", plain(VAEConfig(**self.vae)))
        object.__setattr__(self, "discriminator", plain(DiscriminatorConfig(**self.discriminator)))


class AdversarialVAE(nn.Module):
    """The autoencoder (`.vae`) and its patch discriminator (`.discriminator`), trained together."""

    def __init__(self, config: AdversarialVAEConfig):
        super().__init__()
        self.config = config
        self.vae = AutoencoderKL(VAEConfig(**config.vae))  # built first: the same seed gives the plain VAE's init
        self.discriminator = PatchDiscriminator(DiscriminatorConfig(**config.discriminator))

    def set_grad_checkpointing(self, flag: bool) -> None:
        self.vae.set_grad_checkpointing(flag)

    def last_layer(self) -> nn.Parameter:
        """The decoder's output convolution weight (where the adaptive weight compares gradients)."""
        return self.vae.decoder.conv_out.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor, torch.Tensor]:
        """x (b, c, h, w) -> (reconstruction, posterior, generator logits on it, discriminator hinge loss)."""
        recon, posterior = self.vae(x, sample=True, generator=None)
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        logits_for_generator = functional_call(self.discriminator, frozen, (recon,))
        d_loss = hinge_loss(self.discriminator(x), self.discriminator(recon.detach()))
        return recon, posterior, logits_for_generator, d_loss
