"""Diffusion UNet for latent slices `b c h w` and windows of slices `b c f h w`.

One class serves the slice model (2D, cross-attention to the position embedding), the volume
model's stage 1 (2D weights applied to every slice of a window independently) and stage 2
(the same net plus pseudo-3D slice-axis layers, see pseudo3d.py).

The volume model's conditions (mask and informed-slice latents) come concatenated to the noisy
latent on the channels; config.injection chooses how the network uses them (paper Table 3):
concatenation at the input, a ControlNet branch, or cross-attention to the informed slice
(see injection.py). The call is model(x, t) in every case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from gem3d.models.attention import Attention, FeedForward
from gem3d.models.embeddings import timestep_embedding
from gem3d.models.injection import ControlBranch, InformedEncoder
from gem3d.models.ldm_blocks import QKVAttentionBlock, SpatialTransformer
from gem3d.models.pseudo3d import SliceAxisAttention, SliceAxisConv, check_stage1_keys, is_slice_axis_name


INJECTIONS = ("concat", "control", "crossattn", "crossattn_frozen")
ATTENTIONS = ("gem3d", "ldm")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int  # noisy latent (+ condition latents concatenated on channels)
    out_channels: int  # predicted noise channels
    model_channels: int = 224  # width of level 0 (paper 224)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # width of level i = model_channels * channel_mult[i]
    num_res_blocks: int = 2  # res blocks per level (decoder has one more)
    attention_levels: tuple[int, ...] = (1, 2, 3)  # levels with attention blocks (0 = full latent size)
    head_dim: int = 32  # channels per attention head
    context_dim: int | None = None  # width of the cross-attention context (None: no cross-attention)
    norm_groups: int = 32  # GroupNorm groups
    slice_axis: bool = False  # pseudo-3D slice-axis conv + attention (volume model stage 2)
    use_checkpoint: bool = False  # gradient checkpointing of every block while training
    mid_attention: bool = True  # attention block between the middle res blocks
    scale_shift_norm: bool = False  # timestep as scale/shift of the 2nd norm (else additive)
    ff_mult: int = 4  # GEGLU feed-forward width multiplier in attention blocks (0: no feed-forward)
    dropout: float = 0.0  # dropout in res blocks and feed-forwards
    # How the conditions in the input channels reach the network (the last two need in_channels = 3 x out_channels:
    # noisy, mask, informed-slice latents):
    #   "concat":    the UNet reads all input channels (the paper's GEM-3D);
    #   "control":   the UNet reads the noisy latent; a ControlNet branch (a trainable copy of its encoder) reads it
    #                plus the mask and informed latents and adds to its skip and middle features through zero convs;
    #   "crossattn": the UNet reads noisy + mask latents; the informed latent, encoded to tokens of width
    #                context_dim (default model_channels), is attended to by the attention blocks' cross-attention;
    #   "crossattn_frozen": as "crossattn", but the tokens are the caller's `context` (b, m, context_dim): a frozen
    #                image encoder's pooled embedding of the informed slice (the paper's CLIP image embedding); the
    #                informed latent's channels are not read.
    injection: str = "concat"
    # The attention blocks: "gem3d" (AttentionBlock below) or "ldm", latent diffusion's own (its openaimodel UNet;
    # ldm_blocks.py): a fused-qkv attention block, a SpatialTransformer where there is a context, and the GEM-3D
    # authors' slice-axis attention in stage 2. Networks from latent-diffusion checkpoints (the authors' release) use it.
    attention: str = "gem3d"
    num_heads: int | None = None  # a fixed number of heads per attention block (head width = width / num_heads);
    # None: heads of head_dim channels
    transformer_depth: int = 1  # "ldm": transformer blocks per SpatialTransformer
    qkv_order: str = "legacy"  # "ldm": channel order of the fused qkv ("legacy": per head; "new": q, k, v first)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "head_dim",
                     "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if self.model_channels % 2:  # the sinusoidal timestep embedding has this width
            raise ValueError(f"UNetConfig.model_channels must be even (the timestep embedding's width), got "
                             f"{self.model_channels}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"UNetConfig.attention must be one of {list(ATTENTIONS)}, got {self.attention!r}")
        if self.attention == "ldm":
            self._check_ldm()
        if self.num_heads is not None and (not isinstance(self.num_heads, int) or self.num_heads < 1):
            raise ValueError(f"UNetConfig.num_heads must be None or a positive integer, got {self.num_heads!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"UNetConfig.injection must be one of {list(INJECTIONS)}, got {self.injection!r}")
        if self.injection != "concat" and self.in_channels != 3 * self.out_channels:
            raise ValueError(f"UNetConfig.injection={self.injection!r} needs in_channels == 3 * out_channels (noisy, "
                             f"mask and informed-slice latents), got in_channels={self.in_channels}, "
                             f"out_channels={self.out_channels}")
        if self.injection == "crossattn_frozen" and (not self.attention_levels or self.context_dim is None):
            raise ValueError("UNetConfig.injection='crossattn_frozen' needs attention_levels and the context_dim of "
                             f"its embedding, got {self.attention_levels} and {self.context_dim}")
        if self.injection == "crossattn":
            if not self.attention_levels:
                raise ValueError("UNetConfig.injection='crossattn' needs non-empty attention_levels (the informed "
                                 "slice is attended to in the attention blocks), got ()")
            if self.context_dim is None:
                object.__setattr__(self, "context_dim", self.model_channels)
            if isinstance(self.context_dim, int) and self.context_dim % 4:
                raise ValueError(f"UNetConfig.context_dim must be a multiple of 4 with injection='crossattn' (2D "
                                 f"position code of the informed-slice tokens), got {self.context_dim}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig.channel_mult must be non-empty positive integers, got {self.channel_mult}")
        levels = range(len(self.channel_mult))
        bad = [a for a in self.attention_levels if a not in levels]
        if bad:
            raise ValueError(f"UNetConfig.attention_levels {bad} not in allowed levels {list(levels)}")
        if not isinstance(self.ff_mult, int) or isinstance(self.ff_mult, bool) or self.ff_mult < 0:
            raise ValueError(f"UNetConfig.ff_mult must be a non-negative integer, got {self.ff_mult!r}")
        if self.context_dim is not None and (not isinstance(self.context_dim, int) or self.context_dim < 1):
            raise ValueError(f"UNetConfig.context_dim must be None or a positive integer, got {self.context_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        for level, mult in enumerate(self.channel_mult):
            width = self.model_channels * mult
            if width % self.norm_groups:
                raise ValueError(f"UNet width {width} (level {level}) not divisible by norm_groups {self.norm_groups}")
            attends = level in self.attention_levels or (self.mid_attention and level == len(self.channel_mult) - 1)
            if attends and self.num_heads is not None and width % self.num_heads:
                raise ValueError(f"UNet width {width} (level {level}) not divisible by num_heads {self.num_heads}")
            if attends and self.num_heads is None and width % self.head_dim:
                raise ValueError(f"UNet width {width} (level {level}) not divisible by head_dim {self.head_dim}")

    def _check_ldm(self) -> None:
        """What latent diffusion's UNet has (and the "ldm" blocks therefore build)."""
        problems = []
        if self.injection != "concat":
            problems.append(f"injection {self.injection!r} (only 'concat')")
        if not self.mid_attention:
            problems.append("mid_attention False (its middle block always attends)")
        if self.context_dim is not None and self.slice_axis:
            problems.append("slice_axis with a context (the authors' pseudo-3D UNet has no SpatialTransformer)")
        if self.context_dim is None and self.ff_mult:
            problems.append(f"ff_mult {self.ff_mult} without a context (its attention block has no feed-forward)")
        if self.context_dim is not None and not self.ff_mult:
            problems.append("ff_mult 0 with a context (its transformer blocks have a GEGLU feed-forward)")
        if self.qkv_order not in ("legacy", "new"):
            problems.append(f"qkv_order {self.qkv_order!r} (legacy or new)")
        if not isinstance(self.transformer_depth, int) or self.transformer_depth < 1:
            problems.append(f"transformer_depth {self.transformer_depth!r} (a positive integer)")
        if problems:
            raise ValueError("UNetConfig.attention='ldm' cannot have " + "; ".join(problems))

    def heads(self, width: int) -> int:
        """Attention heads of a block of `width` channels."""
        return self.num_heads if self.num_heads is not None else width // self.head_dim

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def main_in_channels(self) -> int:
        """Input channels of the main UNet: all (concat), noisy only (control), noisy + mask (crossattn)."""
        c = self.out_channels
        return {"concat": self.in_channels, "control": c, "crossattn": 2 * c, "crossattn_frozen": 2 * c}[self.injection]

    @classmethod
    def paper_volume(cls, in_channels: int = 12, slice_axis: bool = False, **overrides) -> UNetConfig:
        """Volume model: 224 x [1,2,3,4], self-attention at latent 32/16/8 of 64 (levels 1,2,3),
        no feed-forward in attention blocks (gives the authors' 368M / 93.8M slice-axis parameters).
        in_channels 12 = noisy + mask + informed-slice latents; the baseline uses 8."""
        args = dict(in_channels=in_channels, out_channels=4, model_channels=224, channel_mult=(1, 2, 3, 4),
                    num_res_blocks=2, attention_levels=(1, 2, 3), head_dim=32, ff_mult=0, slice_axis=slice_axis)
        return cls(**{**args, **overrides})

    @classmethod
    def paper_baseline(cls, slice_axis: bool = False, **overrides) -> UNetConfig:
        """Make-A-Volume baseline: the volume model conditioned on the mask latent only."""
        return cls.paper_volume(in_channels=8, slice_axis=slice_axis, **overrides)

    @classmethod
    def paper_slice(cls, **overrides) -> UNetConfig:
        """Slice model (IG): 224 x [1,2,4,4], cross-attention at latent 64/32/16 (levels 0,1,2)
        on the 128-d position embedding."""
        args = dict(in_channels=4, out_channels=4, model_channels=224, channel_mult=(1, 2, 4, 4),
                    num_res_blocks=2, attention_levels=(0, 1, 2), head_dim=32, context_dim=128)
        return cls(**{**args, **overrides})


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _slice_conv(channels: int, on: bool) -> SliceAxisConv | None:
    return SliceAxisConv(channels) if on else None


# Every block has forward(x, emb, context, f): x ((b f), c, h, w); emb ((b f), d); context
# ((b f), m, d) or None; f = slices per window (1 for 2D input).

class InputConv(nn.Module):
    def __init__(self, cin: int, cout: int, slice_axis: bool):
        super().__init__()
        self.conv = _conv3(cin, cout)
        self.slice_axis_conv = _slice_conv(cout, slice_axis)

    def forward(self, x, emb, context, f):
        x = self.conv(x)
        return x if self.slice_axis_conv is None else self.slice_axis_conv(x, f)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.scale_shift = cfg.scale_shift_norm
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin)
        self.conv1 = _conv3(cin, cout)
        self.slice_axis_conv1 = _slice_conv(cout, cfg.slice_axis)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout if self.scale_shift else cout)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = _conv3(cout, cout)
        nn.init.zeros_(self.conv2.weight)  # the block starts as its skip path
        nn.init.zeros_(self.conv2.bias)
        self.slice_axis_conv2 = _slice_conv(cout, cfg.slice_axis)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb, context, f):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.slice_axis_conv1 is not None:
            h = self.slice_axis_conv1(h, f)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # ((b f), c, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        if self.slice_axis_conv2 is not None:
            h = self.slice_axis_conv2(h, f)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Pre-norm residual attention over the pixels of each slice: self-attention,
    [slice-axis attention], [cross-attention to the context], [GEGLU feed-forward if ff_mult > 0].
    Output projections start at zero, so a fresh block is the identity."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels)
        head_dim = channels // cfg.heads(channels)
        self.attn1 = Attention(channels, head_dim)
        self.slice_axis_attn = SliceAxisAttention(channels, head_dim) if cfg.slice_axis else None
        self.norm2 = self.attn2 = self.norm3 = self.ff = None
        if cfg.context_dim is not None:
            self.norm2 = nn.LayerNorm(channels)
            self.attn2 = Attention(channels, head_dim, context_dim=cfg.context_dim)
        if cfg.ff_mult > 0:
            self.norm3 = nn.LayerNorm(channels)
            self.ff = FeedForward(channels, cfg.ff_mult, cfg.dropout)
        for out in (self.attn1.to_out, self.attn2 and self.attn2.to_out, self.ff and self.ff.proj_out):
            if out is not None:
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def forward(self, x, emb, context, f):
        _, _, h, w = x.shape
        t = rearrange(x, "bf c h w -> bf (h w) c")  # tokens of each slice
        t = t + self.attn1(rearrange(self.norm(x), "bf c h w -> bf (h w) c"))
        if self.slice_axis_attn is not None:
            t = self.slice_axis_attn(t, f)
        if self.attn2 is not None:
            t = t + self.attn2(self.norm2(t), context)
        if self.ff is not None:
            t = t + self.ff(self.norm3(t))
        return rearrange(t, "bf (h w) c -> bf c h w", h=h, w=w)


def attention_block(channels: int, cfg: UNetConfig) -> nn.Module:
    """The attention block of a level of `channels` width: gem3d's own, or latent diffusion's (cfg.attention)."""
    if cfg.attention == "gem3d":
        return AttentionBlock(channels, cfg)
    heads = cfg.heads(channels)
    if cfg.context_dim is None:
        return QKVAttentionBlock(channels, heads, cfg.norm_groups, cfg.qkv_order, cfg.slice_axis)
    return SpatialTransformer(channels, channels // heads, cfg.transformer_depth, cfg.context_dim, cfg.norm_groups,
                              cfg.ff_mult)


class Downsample(nn.Module):
    def __init__(self, channels: int, slice_axis: bool):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2)
        self.slice_axis_conv = _slice_conv(channels, slice_axis)

    def forward(self, x, emb, context, f):
        x = self.conv(x)
        return x if self.slice_axis_conv is None else self.slice_axis_conv(x, f)


class Upsample(nn.Module):
    def __init__(self, channels: int, slice_axis: bool):
        super().__init__()
        self.conv = _conv3(channels, channels)
        self.slice_axis_conv = _slice_conv(channels, slice_axis)

    def forward(self, x, emb, context, f):
        x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x if self.slice_axis_conv is None else self.slice_axis_conv(x, f)


class OutputHead(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, cin)
        self.conv = _conv3(cin, cout)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.slice_axis_conv = _slice_conv(cout, cfg.slice_axis)

    def forward(self, x, emb, context, f):
        x = self.conv(F.silu(self.norm(x)))
        return x if self.slice_axis_conv is None else self.slice_axis_conv(x, f)


class Stage(nn.ModuleList):
    """A few blocks applied in order, the unit of gradient checkpointing."""

    def forward(self, x, emb, context, f):
        for block in self:
            x = block(x, emb, context, f)
        return x


def _encoder(cfg: UNetConfig, in_channels: int, emb_dim: int) -> tuple[nn.ModuleList, Stage, list[int]]:
    """Input conv + down stages, the middle block, and the output width of every input stage
    (the skip connections)."""
    mc, last = cfg.model_channels, len(cfg.channel_mult) - 1
    input_blocks = nn.ModuleList([Stage([InputConv(in_channels, mc, cfg.slice_axis)])])
    skips, ch = [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            blocks = [ResBlock(ch, mc * mult, emb_dim, cfg)]
            ch = mc * mult
            if level in cfg.attention_levels:
                blocks.append(attention_block(ch, cfg))
            input_blocks.append(Stage(blocks))
            skips.append(ch)
        if level != last:
            input_blocks.append(Stage([Downsample(ch, cfg.slice_axis)]))
            skips.append(ch)

    middle = [ResBlock(ch, ch, emb_dim, cfg)]
    if cfg.mid_attention:
        middle.append(attention_block(ch, cfg))
    middle.append(ResBlock(ch, ch, emb_dim, cfg))
    return input_blocks, Stage(middle), skips


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.grad_checkpointing = cfg.use_checkpoint  # the training loop may switch it on/off
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks, self.middle_block, skips = _encoder(cfg, cfg.main_in_channels, emb_dim)
        widths, ch = list(skips), skips[-1]

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), mc * mult, emb_dim, cfg)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    blocks.append(attention_block(ch, cfg))
                if level != 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch, cfg.slice_axis))
                self.output_blocks.append(Stage(blocks))
        self.out = OutputHead(ch, cfg.out_channels, cfg)

        # Built last, so a "concat" network draws the same initial weights as before these existed.
        self.control = self.informed_encoder = None
        c = cfg.out_channels
        if cfg.injection == "control":  # 2D even in stage 2: no slice-axis layers
            blocks, middle, _ = _encoder(replace(cfg, slice_axis=False), c, emb_dim)
            self.control = ControlBranch(blocks, middle, hint_channels=2 * c, widths=widths)
            self.control.copy_encoder(self.input_blocks, self.middle_block)
        elif cfg.injection == "crossattn":
            self.informed_encoder = InformedEncoder(c, mc, cfg.context_dim)

    # ---- pseudo-3D helpers -------------------------------------------------------------------
    def slice_axis_parameters(self) -> list[nn.Parameter]:
        """The parameters of the slice-axis layers only (what stage 2 trains)."""
        return [p for _, p in self.named_slice_axis_parameters()]

    def named_slice_axis_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if is_slice_axis_name(n)]

    def set_grad_checkpointing(self, flag: bool) -> None:
        self.grad_checkpointing = bool(flag)

    def load_stage1(self, stage1: UNet | Mapping[str, torch.Tensor]) -> UNet:
        """Copy 2D (stage-1) weights in; only slice-axis entries may be absent from them."""
        state = stage1.state_dict() if isinstance(stage1, nn.Module) else stage1
        check_stage1_keys(self.state_dict(), state)
        self.load_state_dict(state, strict=False)
        return self

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, c, h, w) slices or (b, c, f, h, w) windows; t: (b,) or, for windows, (b, f);
        context: (b, d) or (b, m, d) when config.context_dim is set (none with injection "crossattn",
        which makes its context from the informed-slice channels). Returns (b, out_channels, ...)."""
        cfg = self.config
        volume = x.dim() == 5
        if volume:
            b, c, f, h, w = x.shape
            x = rearrange(x, "b c f h w -> (b f) c h w")  # every slice of every window in the batch
        elif x.dim() == 4:
            if cfg.slice_axis:
                raise ValueError("a UNet with slice_axis=True needs windows (b, c, f, h, w), got (b, c, h, w)")
            (b, c, h, w), f = x.shape, 1
        else:
            raise ValueError(f"UNet input must be (b, c, h, w) or (b, c, f, h, w), got shape {tuple(x.shape)}")
        if c != cfg.in_channels:
            raise ValueError(f"UNet expects {cfg.in_channels} input channels, got {c}")
        k = cfg.downsampling_factor
        if h % k or w % k:
            raise ValueError(f"UNet input size {h}x{w} must be divisible by {k}")

        emb = self.time_embed(timestep_embedding(self._flat_timesteps(t, b, f, volume, x.device), cfg.model_channels)
                              .to(x.dtype))  # ((b f), 4 mc)
        latent = cfg.out_channels  # x = concat(x_t, mask, informed) in the control / crossattn modes
        if cfg.injection == "crossattn":
            if context is not None:
                raise ValueError("injection='crossattn': the context is the encoded informed slice; give none")
            context = self.informed_encoder(x[:, 2 * latent:])  # ((b f), m, d): tokens of each slice's informed latent
        else:
            if cfg.injection == "crossattn_frozen" and context is None:
                raise ValueError("injection='crossattn_frozen': give the informed slice's embedding as the context")
            context = self._flat_context(context, b, f, x.dtype)
        control = None
        if cfg.injection == "control":  # residuals for every skip, then for the middle output
            control = self.control(x[:, :latent], x[:, latent:], emb, context, f, self._run)

        skips = []
        hidden = x[:, :cfg.main_in_channels]
        for stage in self.input_blocks:
            hidden = self._run(stage, hidden, emb, context, f)
            skips.append(hidden)
        hidden = self._run(self.middle_block, hidden, emb, context, f)
        if control is not None:
            hidden = hidden + control.pop()
            skips = [s + r for s, r in zip(skips, control)]
        for stage in self.output_blocks:
            hidden = torch.cat([hidden, skips.pop()], dim=1)  # ((b f), c + c_skip, h, w)
            hidden = self._run(stage, hidden, emb, context, f)
        out = self.out(hidden, emb, context, f)
        if volume:
            out = rearrange(out, "(b f) c h w -> b c f h w", b=b)
        return out

    def _run(self, stage: Stage, x, emb, context, f):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, x, emb, context, f, use_reentrant=False)
        return stage(x, emb, context, f)

    @staticmethod
    def _flat_timesteps(t, b: int, f: int, volume: bool, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape == (b,):
            return repeat(t, "b -> (b f)", f=f) if volume else t  # one timestep per window
        if volume and t.shape == (b, f):
            return rearrange(t, "b f -> (b f)")  # one timestep per slice
        allowed = f"({b},) or ({b}, {f})" if volume else f"({b},)"
        raise ValueError(f"timesteps must have shape {allowed}, got {tuple(t.shape)}")

    def _flat_context(self, context, b: int, f: int, dtype) -> torch.Tensor | None:
        d = self.config.context_dim
        if d is None:
            if context is not None:
                raise ValueError("this UNet has no cross-attention (context_dim=None) but a context was given")
            return None
        if context is None:
            raise ValueError(f"this UNet needs a context of width {d} (cross-attention)")
        if context.dim() == 2:
            context = context[:, None]  # (b, 1, d): one token
        if context.dim() != 3 or context.shape[0] != b or context.shape[-1] != d:
            raise ValueError(f"context must be ({b}, {d}) or ({b}, m, {d}), got {tuple(context.shape)}")
        return repeat(context, "b m d -> (b f) m d", f=f).to(dtype)  # same context for every slice


def from_stage1(stage1: UNet | Mapping[str, torch.Tensor], config: UNetConfig | None = None) -> UNet:
    """Build the stage-2 (pseudo-3D) UNet from a stage-1 model or state dict.

    config defaults to the stage-1 model's config with slice_axis=True (required for a state dict).
    """
    if config is None:
        if not isinstance(stage1, UNet):
            raise ValueError("from_stage1 needs a config when given a state dict")
        config = replace(stage1.config, slice_axis=True)
    return UNet(config).load_stage1(stage1)
