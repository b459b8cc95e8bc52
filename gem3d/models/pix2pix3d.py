"""3D Pix2Pix, the paper's whole-volume comparison method (Tables 1 and 2): mask volume -> image volume.

pix2pix (Isola et al. 2017) made 3D: every 2D convolution of its U-Net generator and PatchGAN
discriminator becomes a 3D one over (slices, rows, cols), and one training item is one whole
volume ("3D samples as the training unit").

`Pix2Pix3DGenerator`: pix2pix's `UnetGenerator` with `levels` stride-2 steps. Encoder: 4x4x4
stride-2 convolutions (widths base x 1, 2, 4, 8, 8, ...), each after a LeakyReLU(0.2) of the
previous level and followed by a norm (not the first, which sees the mask, nor the innermost);
decoder: ReLU, a 4x4x4 stride-2 transposed convolution, norm (and dropout, pix2pix's only noise, on the
`dropout_blocks` blocks next to the innermost, never the outermost; pix2pix drops out on its blocks of width
ngf*8 below the innermost, levels - 5 of them: 3 at its 8 levels, 2 at 7, so `dropout_blocks: levels - 5` is
pix2pix's placement), concatenated with the encoder feature of the same size; the outermost block maps to
`out_channels` with tanh, so images lie in [-1, 1]. Each axis must be divisible by 2**levels.

`Pix2Pix3DDiscriminator`: pix2pix's `NLayerDiscriminator` in 3D, conditioned on the mask: input
concat(mask one-hot, image), a 4x4x4 stride-2 convolution and LeakyReLU(0.2), `disc_layers - 1`
more stride-2 convolutions with norm and LeakyReLU (width doubling up to 8x), one stride-1
convolution with norm and LeakyReLU, and a stride-1 convolution to one logit per overlapping
patch: about size / 2**disc_layers - 2 per axis (each axis needs at least 3 x 2**disc_layers).

The norm is GroupNorm (`norm_groups`, or fewer where a width is not divisible), not pix2pix's
BatchNorm, for the reasons gem3d.models.discriminator gives: no running statistics, so scoring a
fake for the generator moves no buffer, and the result does not depend on how a batch is split over
processes. At pix2pix's batch size 1 its BatchNorm normalises one volume's channels, which
GroupNorm with one channel per group is; groups of several channels are a little smoother.

The loss is pix2pix's default "vanilla" GAN (binary cross-entropy on logits; the generator's term is
the non-saturating BCE(D(fake), real)), the discriminator's halved as in pix2pix: the comparison
should be the method as published, and its L1 weight (100) was tuned against this loss; the repo's
VAE uses latent diffusion's hinge loss, which belongs to that recipe, not to pix2pix's.

`Pix2Pix3D`: the module the shared training loop trains (it trains every parameter of the module it
is given with one optimizer, gem3d.training.loop). Its forward returns the fake, the
discriminator's logits on it for the GENERATOR term (detached discriminator parameters:
torch.func.functional_call, so no generator gradient reaches the discriminator) and the
discriminator's loss (on the detached fake, so no discriminator gradient reaches the generator),
exactly as `AdversarialVAE` does. One backward of l1_weight x L1 + generator term + discriminator
loss then trains both; as with pix2pix's two Adam optimizers the update of each network is its own
(Adam is per parameter), but both are computed on the same step's discriminator (pix2pix updates D
first and scores the fake for G with the updated D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class Pix2Pix3DConfig:
    in_channels: int  # mask one-hot channels: labels 0..K and the outside-region label (K + 2)
    out_channels: int = 1  # image channels
    base_channels: int = 32  # generator width at the first level (pix2pix: 64 in 2D)
    levels: int = 4  # generator stride-2 steps; each volume axis must be divisible by 2**levels
    disc_base_channels: int = 64  # discriminator's first width (pix2pix: 64)
    disc_layers: int = 3  # discriminator stride-2 convolutions (pix2pix: 3)
    norm_groups: int = 8  # GroupNorm groups (fewer where a width is not divisible by it)
    dropout: float = 0.0  # dropout rate on the generator's inner decoder blocks (pix2pix: 0.5, its only noise)
    dropout_blocks: int = 3  # decoder blocks next to the innermost that have it (pix2pix: levels - 5)

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "base_channels", "levels", "disc_base_channels", "disc_layers",
                     "norm_groups", "dropout_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Pix2Pix3DConfig.{name} must be a positive integer, got {value!r}")
        if self.levels < 2:
            raise ValueError(f"Pix2Pix3DConfig.levels must be at least 2 (an outermost and an innermost block), "
                             f"got {self.levels}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"Pix2Pix3DConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def dropout_levels(self) -> range:
        """The decoder blocks up[k] with dropout: the `dropout_blocks` next to the innermost (k = levels - 1, which
        has none, as in pix2pix), never the outermost (k = 0); none while dropout is 0."""
        if self.dropout == 0:
            return range(0)
        return range(max(1, self.levels - 1 - self.dropout_blocks), self.levels - 1)

    def size_multiple(self) -> int:
        """Every volume axis must be a multiple of this (the generator halves it `levels` times)."""
        return 2 ** self.levels

    def min_disc_size(self) -> int:
        """Smallest axis with a patch map of at least 1: 3 x 2**disc_layers."""
        return 3 * 2 ** self.disc_layers


def mask_channels(label: torch.Tensor, max_label: int) -> torch.Tensor:
    """(b, d, h, w) integer labels -1..max_label -> (b, max_label + 2, d, h, w) float one-hot; channel 0 is
    the outside-region label -1, channel k + 1 label k."""
    return F.one_hot(label.long() + 1, max_label + 2).movedim(-1, 1).float()


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)


def _init(module: nn.Module) -> None:
    """pix2pix's initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Pix2Pix3DGenerator(nn.Module):
    """(b, in_channels, d, h, w) mask one-hot -> (b, out_channels, d, h, w) image in [-1, 1]."""

    def __init__(self, config: Pix2Pix3DConfig):
        super().__init__()
        self.config = config
        groups, levels = config.norm_groups, config.levels
        widths = [config.base_channels * min(2 ** k, 8) for k in range(levels)]
        self.down = nn.ModuleList()
        for k in range(levels):
            cin = config.in_channels if k == 0 else widths[k - 1]
            layers: list[nn.Module] = [] if k == 0 else [nn.LeakyReLU(0.2)]
            layers.append(nn.Conv3d(cin, widths[k], 4, stride=2, padding=1, bias=k in (0, levels - 1)))
            if 0 < k < levels - 1:
                layers.append(_norm(widths[k], groups))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()  # up[k] produces level k - 1's size from level k (innermost first in forward)
        for k in range(levels):
            cin = widths[k] * (1 if k == levels - 1 else 2)  # inner blocks see concat(up feature, skip)
            if k == 0:
                layers = [nn.ReLU(), nn.ConvTranspose3d(cin, config.out_channels, 4, stride=2, padding=1), nn.Tanh()]
            else:
                layers = [nn.ReLU(), nn.ConvTranspose3d(cin, widths[k - 1], 4, stride=2, padding=1, bias=False),
                          _norm(widths[k - 1], groups)]
                if k in config.dropout_levels():
                    layers.append(nn.Dropout(config.dropout))
            self.up.append(nn.Sequential(*layers))
        _init(self)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        m = self.config.size_multiple()
        if any(n % m for n in mask.shape[-3:]):
            raise ValueError(f"3D Pix2Pix with {self.config.levels} levels needs every volume axis divisible by {m}, "
                             f"got {tuple(mask.shape[-3:])}")
        skips = []
        h = mask
        for block in self.down:
            h = block(h)
            skips.append(h)
        h = self.up[-1](skips[-1])
        for k in range(self.config.levels - 2, -1, -1):
            h = self.up[k](torch.cat([h, skips[k]], dim=1))
        return h


class Pix2Pix3DDiscriminator(nn.Module):
    """(b, in_channels + out_channels, d, h, w) concat(mask one-hot, image) -> (b, 1, d', h', w') patch logits."""

    def __init__(self, config: Pix2Pix3DConfig):
        super().__init__()
        self.config = config
        base, groups = config.disc_base_channels, config.norm_groups
        width = base
        layers: list[nn.Module] = [nn.Conv3d(config.in_channels + config.out_channels, width, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        for n in range(1, config.disc_layers + 1):
            cin, width = width, base * min(2 ** n, 8)
            stride = 2 if n < config.disc_layers else 1
            layers += [nn.Conv3d(cin, width, 4, stride=stride, padding=1, bias=False), _norm(width, groups),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv3d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        least = self.config.min_disc_size()
        if min(x.shape[-3:]) < least:
            raise ValueError(f"3D PatchGAN with {self.config.disc_layers} layers needs every volume axis of at least "
                             f"{least}, got {tuple(x.shape[-3:])}")
        return self.net(x)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """pix2pix's vanilla GAN loss: binary cross-entropy of the logits against all-real or all-fake targets."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


class Pix2Pix3D(nn.Module):
    """The generator (`.generator`) and its mask-conditioned patch discriminator (`.discriminator`), trained
    together."""

    def __init__(self, config: Pix2Pix3DConfig):
        super().__init__()
        self.config = config
        self.generator = Pix2Pix3DGenerator(config)
        self.discriminator = Pix2Pix3DDiscriminator(config)

    def forward(self, mask: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mask (b, in_channels, d, h, w) one-hot, image (b, out_channels, d, h, w) ->
        (fake, discriminator logits on it for the generator term, discriminator loss)."""
        fake = self.generator(mask)
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        logits_for_generator = functional_call(self.discriminator, frozen, (torch.cat([mask, fake], dim=1),))
        d_real = self.discriminator(torch.cat([mask, image], dim=1))
        d_fake = self.discriminator(torch.cat([mask, fake.detach()], dim=1))
        d_loss = 0.5 * (gan_loss(d_real, True) + gan_loss(d_fake, False))
        return fake, logits_for_generator, d_loss

    @torch.no_grad()
    def generate(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (b, in_channels, d, h, w) one-hot -> image (b, out_channels, d, h, w) in [-1, 1] (generator only)."""
        return self.generator(mask)
