"""The two alternative ways of giving the volume model its conditions (paper Table 3).

The volume model's input is concat(x_t, mask latent, informed-slice latent), c channels each.
By default (injection "concat") the UNet reads all 3c channels. The alternatives split them:

- "control": ControlBranch, after ControlNet (Zhang et al. 2023). The main UNet reads x_t only.
  A trainable copy of its encoder (input conv, down stages, middle block; started from the main
  encoder's weights) reads x_t, with a zero-initialised conv of the hint concat(mask, informed)
  added to its input-conv features; each of its skip features and its middle output goes
  through a zero-initialised 1x1 conv and is added to the main network's skip / middle features.
  With the zero convs at zero the network computes exactly the main UNet on x_t; the output zero
  convs open at the first optimizer step, the hint conv (behind them) at the second.
- "crossattn": InformedEncoder. The main UNet reads concat(x_t, mask); the informed latent is
  turned into tokens by a few convolutions (4x downsampling) and attended to by the
  cross-attention of the UNet's attention blocks.

Both are 2D and applied to every slice of a window independently (`(b f)` in the batch); stage 2
(pseudo-3D) adds no slice-axis layer to them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from gem3d.models.embeddings import sinusoidal_embedding
from gem3d.models.pseudo3d import is_slice_axis_name


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlBranch(nn.Module):
    """ControlNet branch: (x_t, hint) -> one residual per skip connection of the main UNet, then one
    for its middle output.

    input_blocks / middle_block: a 2D encoder built like the main UNet's (same stages, same
    widths); widths: the channels of each stage's output (= the main UNet's skip widths).
    """

    def __init__(self, input_blocks: nn.ModuleList, middle_block: nn.Module, hint_channels: int,
                 widths: list[int]):
        super().__init__()
        self.input_blocks = input_blocks
        self.middle_block = middle_block
        self.hint_conv = _zero(nn.Conv2d(hint_channels, widths[0], 3, padding=1))
        self.zero_convs = nn.ModuleList(_zero(nn.Conv2d(w, w, 1)) for w in widths)
        self.middle_zero_conv = _zero(nn.Conv2d(widths[-1], widths[-1], 1))

    def copy_encoder(self, input_blocks: nn.ModuleList, middle_block: nn.Module) -> None:
        """Start as a copy of the main encoder (its 2D weights; slice-axis layers are not copied)."""
        for mine, main in ((self.input_blocks, input_blocks), (self.middle_block, middle_block)):
            mine.load_state_dict({k: v for k, v in main.state_dict().items() if not is_slice_axis_name(k)})

    def forward(self, x: torch.Tensor, hint: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                f: int, run: Callable) -> list[torch.Tensor]:
        """x ((b f), c, h, w) noisy latent; hint ((b f), 2c, h, w); run(stage, x, emb, context, f)
        applies a stage (the UNet's, with its gradient checkpointing)."""
        residuals = []
        h = x
        for i, (stage, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = run(stage, h, emb, context, f)
            if i == 0:
                h = h + self.hint_conv(hint)
            residuals.append(zero_conv(h))
        h = run(self.middle_block, h, emb, context, f)
        residuals.append(self.middle_zero_conv(h))
        return residuals


def grid_position_code(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sinusoidal code (height * width, dim): [code of the row (dim/2), code of the column (dim/2)]."""
    rows = sinusoidal_embedding(torch.arange(height, device=device), dim // 2)  # (height, dim/2)
    cols = sinusoidal_embedding(torch.arange(width, device=device), dim // 2)  # (width, dim/2)
    return torch.cat([rows[:, None].expand(-1, width, -1), cols[None].expand(height, -1, -1)], dim=-1).flatten(0, 1)


class InformedEncoder(nn.Module):
    """Informed-slice latent ((b f), c, h, w) -> cross-attention tokens ((b f), (h/4)(w/4), dim).

    conv stem, two stride-2 convs, one token per pixel of the result, LayerNorm, plus a fixed 2D
    sinusoidal position code (any latent size works; the latent size is not part of the config).
    """

    def __init__(self, channels: int, width: int, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"informed-slice token width must be a multiple of 4, got {dim}")
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down1 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(width, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.down2(F.silu(self.down1(F.silu(self.stem(z)))))  # ((b f), dim, h/4, w/4)
        _, dim, gh, gw = h.shape
        tokens = self.norm(rearrange(h, "n d h w -> n (h w) d"))
        return tokens + grid_position_code(gh, gw, dim, device=z.device).to(tokens.dtype)[None]
