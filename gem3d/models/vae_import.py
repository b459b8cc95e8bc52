"""Import an existing KL autoencoder (latent diffusion's KL-f8, or a diffusers AutoencoderKL) into gem3d's VAE.

Two file layouts hold the same network (gem3d's `AutoencoderKL` computes what both compute):

- latent diffusion (CompVis): a torch checkpoint whose `state_dict` has `encoder.down.0.block.0.norm1.weight`
  ... keys, under `first_stage_model.` in a whole latent-diffusion model (the other parts are ignored;
  so are an autoencoder checkpoint's own `loss.*` entries: its LPIPS and discriminator); residual
  shortcuts `nin_shortcut`; mid attention as separate `q`/`k`/`v`/`proj_out` 1x1 convolutions;
  `down.{i}.downsample.conv` (zero pad right/bottom by one, 3x3 stride 2, no padding: gem3d's
  Downsample); `up.{i}.upsample.conv` (nearest x2, 3x3 conv: gem3d's Upsample); `up.{i}` is level i,
  run from the deepest level up, as gem3d's decoder does;
- diffusers `AutoencoderKL` (`.safetensors` or a torch file): `encoder.down_blocks.0.resnets.0.norm1.weight`
  ..., `conv_shortcut`, `downsamplers.0.conv`, `up_blocks.{j}` = level L-1-j with `upsamplers.0.conv`,
  `mid_block.resnets.{0,1}` and `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` as
  Linear layers (older files: `query`/`key`/`value`/`proj_attn`), `conv_norm_out`.
Both attentions are single-head softmax(q k^T / sqrt(c)) v over the pixels with a residual, as
gem3d's AttnBlock (one 1x1 convolution computing q, k and v stacked).

Colour: a file trained on n-channel images (RGB: n = 3) gets grey slices as n equal channels and
returns the mean of its n output channels. Both are linear, so they are folded into the weights:
conv_in's weights summed over its input channels, conv_out's weights and bias averaged over its
output channels; the imported model has in_channels 1 and computes exactly that.

A file of another layout or architecture is refused with one line naming the first key that does
not fit (missing, of another shape, or not part of the network `vae.model` describes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from gem3d.io import InputError
from gem3d.models import weights_file
from gem3d.models.vae import AutoencoderKL, VAEConfig

LAYOUTS = ("latent-diffusion", "diffusers")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or of a torch file (a state dict, or a checkpoint with one, such as
    a latent-diffusion or Lightning `.ckpt`); nothing but tensors and containers is unpickled."""
    return weights_file.read_state_dict(path, "autoencoder file")


def detect_layout(state: Mapping[str, torch.Tensor], path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, the autoencoder's own entries) of a state dict."""
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        return "diffusers", state
    if any(k.startswith("encoder.down.") for k in state):
        return "latent-diffusion", state
    first = next(iter(state), "<none>")
    raise InputError(f"{path}: neither the latent-diffusion (encoder.down.0...) nor the diffusers "
                     f"(encoder.down_blocks.0...) autoencoder layout (first key: {first})")


def _module_pairs(cfg: VAEConfig, layout: str) -> list[tuple[str, str, str]]:
    """(gem3d module, the file's module, kind) for every module holding weights; kind: conv|norm|resnet|attn."""
    ld = layout == "latent-diffusion"
    levels = len(cfg.channel_mult)
    pairs: list[tuple[str, str, str]] = []
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.conv_in", f"{part}.conv_in", "conv"))
        mid = ["block_1", "attn_1", "block_2"] if cfg.mid_attention else ["block_1", "block_2"]
        mid_diffusers = ["resnets.0", "attentions.0", "resnets.1"] if cfg.mid_attention else ["resnets.0", "resnets.1"]
        mids = [(f"{part}.mid.{i}", f"{part}.mid.{a}" if ld else f"{part}.mid_block.{b}",
                 "attn" if a.startswith("attn") else "resnet") for i, (a, b) in enumerate(zip(mid, mid_diffusers))]
        blocks, index = [], 0
        if part == "encoder":
            for level in range(levels):
                for j in range(cfg.num_res_blocks):
                    other = f"encoder.down.{level}.block.{j}" if ld else f"encoder.down_blocks.{level}.resnets.{j}"
                    blocks.append((f"encoder.blocks.{index}", other, "resnet"))
                    index += 1
                if level != levels - 1:
                    other = f"encoder.down.{level}.downsample.conv" if ld else \
                        f"encoder.down_blocks.{level}.downsamplers.0.conv"
                    blocks.append((f"encoder.blocks.{index}.conv", other, "conv"))
                    index += 1
            pairs += blocks + mids
        else:
            for level in reversed(range(levels)):
                up = f"decoder.up.{level}" if ld else f"decoder.up_blocks.{levels - 1 - level}"
                for j in range(cfg.num_res_blocks + 1):
                    blocks.append((f"decoder.blocks.{index}", f"{up}.block.{j}" if ld else f"{up}.resnets.{j}",
                                   "resnet"))
                    index += 1
                if level != 0:
                    blocks.append((f"decoder.blocks.{index}.conv",
                                   f"{up}.upsample.conv" if ld else f"{up}.upsamplers.0.conv", "conv"))
                    index += 1
            pairs += mids + blocks
        pairs.append((f"{part}.norm_out", f"{part}.norm_out" if ld else f"{part}.conv_norm_out", "norm"))
        pairs.append((f"{part}.conv_out", f"{part}.conv_out", "conv"))
    pairs += [("quant_conv", "quant_conv", "conv"), ("post_quant_conv", "post_quant_conv", "conv")]
    return pairs


def _param_sources(pairs, layout: str, state: Mapping[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    """(gem3d parameter, the file's parameter(s) it is made of); q, k, v stack into gem3d's qkv."""
    out: list[tuple[str, list[str]]] = []
    for mine, other, kind in pairs:
        names: list[tuple[str, list[str]]]
        if kind == "resnet":
            shortcut = "nin_shortcut" if layout == "latent-diffusion" else "conv_shortcut"
            names = [(n, [n]) for n in ("norm1", "conv1", "norm2", "conv2")]
            if any(k.startswith(f"{other}.{shortcut}.") for k in state):
                names.append(("skip", [shortcut]))
        elif kind == "attn":
            if layout == "latent-diffusion":
                norm, qkv, proj = "norm", ["q", "k", "v"], "proj_out"
            elif f"{other}.query.weight" in state:  # diffusers before 0.15
                norm, qkv, proj = "group_norm", ["query", "key", "value"], "proj_attn"
            else:
                norm, qkv, proj = "group_norm", ["to_q", "to_k", "to_v"], "to_out.0"
            names = [("norm", [norm]), ("qkv", qkv), ("proj_out", [proj])]
        else:
            names = [("", [""])]
        for sub, theirs in names:
            for p in ("weight", "bias"):
                join = lambda a, b: ".".join(x for x in (a, b, p) if x)  # noqa: E731
                out.append((join(mine, sub), [join(other, t) for t in theirs]))
    return out


def _fit(value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`value` as `shape` (a diffusers Linear (c, c) as a 1x1 convolution (c, c, 1, 1)); None if it cannot be."""
    if value.shape == shape:
        return value
    if value.dim() == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1) and value.shape == shape[:2]:
        return value[:, :, None, None]
    return None


def import_autoencoder(path: str | Path, config: VAEConfig) -> tuple[AutoencoderKL, dict]:
    """Build gem3d's VAE (in_channels 1) from the autoencoder file `path`; `config` (vae.model) must be its
    architecture. Returns (model, {"layout", "file_channels"})."""
    path = Path(path)
    layout, state = detect_layout(read_state_dict(path), path)
    return autoencoder_from_state(state, layout, config, path)


def autoencoder_from_state(state: Mapping[str, torch.Tensor], layout: str, config: VAEConfig,
                           path: str | Path) -> tuple[AutoencoderKL, dict]:
    """`import_autoencoder` on the autoencoder's own entries of a state dict (`detect_layout`); `path` names
    the file in errors."""
    conv_in = state.get("encoder.conv_in.weight")
    if conv_in is None or conv_in.dim() != 4:
        raise InputError(f"{path}: key encoder.conv_in.weight missing or not a convolution ({layout} layout)")
    n = int(conv_in.shape[1])  # the file's image channels (3: RGB)
    with torch.device("meta"):  # shapes only, nothing allocated
        expected = {k: v.shape for k, v in AutoencoderKL(replace(config, in_channels=n)).state_dict().items()}
    pairs = _module_pairs(config, layout)
    loaded, used = {}, set()
    arch = (f"vae.model {config.base_channels} x {list(config.channel_mult)}, {config.num_res_blocks} residual "
            f"blocks, {config.latent_channels} latent channels")
    for mine, theirs in _param_sources(pairs, layout, state):
        if mine not in expected:  # e.g. a shortcut where gem3d's block has none (same width in and out)
            raise InputError(f"{path}: key {theirs[0]} is not part of the {layout} autoencoder {arch}")
        parts = []
        want = expected[mine]
        part_shape = torch.Size([want[0] // len(theirs), *want[1:]])
        for key in theirs:
            if key not in state:
                raise InputError(f"{path}: key {key} missing ({layout} layout of {arch})")
            fitted = _fit(state[key], part_shape)
            if fitted is None:
                raise InputError(f"{path}: key {key} has shape {tuple(state[key].shape)}, {arch} needs "
                                 f"{tuple(part_shape)}")
            parts.append(fitted.float())
            used.add(key)
        loaded[mine] = torch.cat(parts) if len(parts) > 1 else parts[0]
    missing = [k for k in expected if k not in loaded]
    if missing:  # a residual block that needs a shortcut the file lacks
        raise InputError(f"{path}: no weights for gem3d's {missing[0]} ({layout} layout of {arch})")
    extra = [k for k in state if k not in used]
    if extra:
        raise InputError(f"{path}: key {extra[0]} is not part of the {layout} autoencoder {arch}")
    grey = {**loaded,
            "encoder.conv_in.weight": loaded["encoder.conv_in.weight"].sum(dim=1, keepdim=True),  # n equal inputs
            "decoder.conv_out.weight": loaded["decoder.conv_out.weight"].mean(dim=0, keepdim=True),  # mean output
            "decoder.conv_out.bias": loaded["decoder.conv_out.bias"].mean(dim=0, keepdim=True)}
    model = AutoencoderKL(replace(config, in_channels=1))
    model.load_state_dict(grey)
    return model, {"layout": layout, "file_channels": n}
