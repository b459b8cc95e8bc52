"""The GEM-3D authors' released networks (latent-diffusion PyTorch Lightning runs) as gem3d networks.

A release run is a folder `<run>/checkpoints/last.ckpt` + `<run>/configs/<timestamp>-project.yaml`. The yaml
holds the network hyper-parameters (`model.params.unet_config.params`), the noise schedule and
`scale_factor` (not in the state dict); the checkpoint's `state_dict` holds the whole LatentDiffusion module:
`model.diffusion_model.*` (the UNet), `model_ema.*` (its moving average, when the yaml has `use_ema: true`;
names with the dots removed), `first_stage_model.*` (the KL autoencoder), `cond_stage_model.*` and the schedule
buffers. The checkpoint is read through `weights_file` (tensors and containers only; Lightning's pickled
callbacks are never imported).

The UNet is built from the yaml alone (UNetConfig.attention "ldm": latent diffusion's attention blocks; the
`openaimodel_pseudo3D` target adds the authors' slice-axis layers) and every one of its tensors is mapped by
module from the file's key (`release_names`); a missing, extra or misshaped key is one `InputError` line naming
it. Nothing is guessed from shapes. Which weights: the authors' inference scripts build the model, load the
checkpoint and sample without switching to the moving average, so `live` (model.diffusion_model.*) is what they
sampled with; `ema` (model_ema.*) is the other choice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from gem3d.io import InputError
from gem3d.models import weights_file
from gem3d.models.ldm_blocks import QKVAttentionBlock, SpatialTransformer, TransformerBlock
from gem3d.models.unet import Downsample, InputConv, OutputHead, ResBlock, UNet, UNetConfig, Upsample
from gem3d.pretrained import ReleaseRun

PSEUDO3D_FRAMES = 16  # slices per window of the authors' pseudo-3D layers (a constant of their code)
WEIGHTS = ("live", "ema")
LIVE, EMA = "model.diffusion_model.", "model_ema."


def _refuse(run: ReleaseRun, key: str, value: Any, why: str) -> None:
    raise InputError(f"{run.project_yaml}: {key} {value!r}: {why}")


def schedule_args(run: ReleaseRun) -> dict:
    """The noise schedule of the yaml as gem3d's NoiseSchedule arguments (latent diffusion's "linear" schedule is
    linspace(sqrt(start), sqrt(end)) ** 2, gem3d's scaled_linear)."""
    p = run.params
    if p.get("beta_schedule", "linear") != "linear":
        _refuse(run, "model.params.beta_schedule", p.get("beta_schedule"), "only latent diffusion's 'linear' "
                "(sqrt-spaced) schedule is supported")
    if p.get("parameterization", "eps") != "eps":
        _refuse(run, "model.params.parameterization", p.get("parameterization"), "only eps prediction is supported")
    return {"num_train_timesteps": int(p.get("timesteps", 1000)), "beta_start": float(p.get("linear_start", 1e-4)),
            "beta_end": float(p.get("linear_end", 2e-2)), "beta_schedule": "scaled_linear"}


def unet_config(run: ReleaseRun) -> UNetConfig:
    """gem3d's UNetConfig of the network the yaml describes (refusing what latent diffusion's code would build
    differently from gem3d's UNet, naming the key)."""
    u = run.unet_params
    key = "model.params.unet_config.params."
    unsupported = {"dims": (2, None), "resblock_updown": (False, None), "conv_resample": (True, None),
                   "num_classes": (None,), "n_embed": (None,), "use_fp16": (False, None)}
    for name, allowed in unsupported.items():
        if u.get(name) not in allowed:
            _refuse(run, key + name, u.get(name), "not supported by gem3d's UNet")
    levels = len(u["channel_mult"])
    attention_levels = sorted({int(round(math.log2(ds))) for ds in u.get("attention_resolutions", [])
                               if ds >= 1 and 2 ** int(round(math.log2(ds))) == ds and math.log2(ds) < levels})
    head_channels, heads = int(u.get("num_head_channels", -1)), int(u.get("num_heads", -1))
    heads_up = int(u.get("num_heads_upsample", -1))
    if head_channels == -1 and heads == -1:
        _refuse(run, key + "num_heads", heads, "either num_heads or num_head_channels must be set")
    if head_channels == -1 and heads_up not in (-1, heads):
        _refuse(run, key + "num_heads_upsample", heads_up, "differs from num_heads (not supported)")
    transformer = bool(u.get("use_spatial_transformer", False))
    context_dim = u.get("context_dim") if transformer else None
    if transformer and not isinstance(context_dim, int):
        _refuse(run, key + "context_dim", context_dim, "a spatial transformer needs one integer context width")
    args = dict(in_channels=int(u["in_channels"]), out_channels=int(u["out_channels"]),
                model_channels=int(u["model_channels"]), channel_mult=tuple(int(m) for m in u["channel_mult"]),
                num_res_blocks=int(u["num_res_blocks"]), attention_levels=tuple(attention_levels),
                head_dim=head_channels if head_channels != -1 else 32,
                num_heads=heads if head_channels == -1 else None, context_dim=context_dim, norm_groups=32,
                slice_axis=run.pseudo3d, scale_shift_norm=bool(u.get("use_scale_shift_norm", False)),
                ff_mult=4 if transformer else 0, dropout=float(u.get("dropout", 0.0)), attention="ldm",
                transformer_depth=int(u.get("transformer_depth", 1)),
                qkv_order="new" if u.get("use_new_attention_order", False) else "legacy")
    try:
        return UNetConfig(**args)
    except ValueError as exc:
        raise InputError(f"{run.project_yaml}: the network of {key[:-1]} cannot be built ({exc})") from None


def _leaf_names(net: UNet) -> dict[str, str]:
    """{gem3d module path: the release's module path under diffusion_model.} for every module holding weights."""
    out: dict[str, str] = {"time_embed.0": "time_embed.0", "time_embed.2": "time_embed.2"}
    for name, module in net.named_modules():
        if isinstance(module, InputConv):  # the release's input_blocks.0 = [conv, temporal conv]
            base = name.rsplit(".", 1)[0]
            out[f"{name}.conv"] = f"{base}.0"
            out[f"{name}.slice_axis_conv.conv"] = f"{base}.1.temporal_conv"
        elif isinstance(module, ResBlock):
            for mine, theirs in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("emb_proj", "emb_layers.1"),
                                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("skip", "skip_connection"),
                                 ("slice_axis_conv1.conv", "in_layers_tem.temporal_conv"),
                                 ("slice_axis_conv2.conv", "out_layers_tem.temporal_conv")):
                out[f"{name}.{mine}"] = f"{name}.{theirs}"
        elif isinstance(module, Downsample):
            out[f"{name}.conv"] = f"{name}.op"
            out[f"{name}.slice_axis_conv.conv"] = f"{name}.op_tem.temporal_conv"
        elif isinstance(module, Upsample):
            out[f"{name}.conv"] = f"{name}.conv"
            out[f"{name}.slice_axis_conv.conv"] = f"{name}.conv_tem.temporal_conv"
        elif isinstance(module, QKVAttentionBlock):
            for mine, theirs in (("norm", "norm"), ("qkv", "qkv"), ("proj_out", "proj_out"),
                                 ("slice_axis_qkv", "qkv_tem"), ("slice_axis_proj_out", "proj_out_tem")):
                out[f"{name}.{mine}"] = f"{name}.{theirs}"
        elif isinstance(module, SpatialTransformer):
            for part in ("norm", "proj_in", "proj_out"):
                out[f"{name}.{part}"] = f"{name}.{part}"
        elif isinstance(module, TransformerBlock):
            for mine, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("norm3", "norm3"),
                                 ("attn1.to_q", "attn1.to_q"), ("attn1.to_k", "attn1.to_k"),
                                 ("attn1.to_v", "attn1.to_v"), ("attn1.to_out", "attn1.to_out.0"),
                                 ("attn2.to_q", "attn2.to_q"), ("attn2.to_k", "attn2.to_k"),
                                 ("attn2.to_v", "attn2.to_v"), ("attn2.to_out", "attn2.to_out.0"),
                                 ("ff.proj_in", "ff.net.0.proj"), ("ff.proj_out", "ff.net.2")):
                out[f"{name}.{mine}"] = f"{name}.{theirs}"
        elif isinstance(module, OutputHead):
            out.update({f"{name}.norm": "out.0", f"{name}.conv": "out.2",
                        f"{name}.slice_axis_conv.conv": "out_tem.temporal_conv"})
    return out


def release_names(net: UNet) -> dict[str, str]:
    """{gem3d state-dict key: the release's key under diffusion_model.} for every tensor of `net`."""
    leaves = _leaf_names(net)
    names = {}
    for key in net.state_dict():
        module, _, leaf = key.rpartition(".")
        if module not in leaves:
            raise ValueError(f"no release name for gem3d's {key} (a module this importer does not know)")
        names[key] = f"{leaves[module]}.{leaf}"
    return names


def _ema_key(release_key: str) -> str:
    """LitEma's buffer name of a parameter: the dots of `diffusion_model.<key>` removed."""
    return EMA + ("diffusion_model." + release_key).replace(".", "")


def import_unet(run: ReleaseRun, weights: str = "live",
                state: dict[str, torch.Tensor] | None = None) -> tuple[UNet, dict]:
    """gem3d's UNet holding the run's network (`weights`: live or ema); returns (net, info)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    config = unet_config(run)
    if state is None:
        state = weights_file.read_state_dict(run.checkpoint, "release checkpoint")
    if weights == "ema" and not any(k.startswith(EMA) for k in state):
        raise InputError(f"{run.checkpoint}: no model_ema.* weights (its yaml has use_ema "
                         f"{run.params.get('use_ema', False)}); use the live weights")
    with torch.device("meta"):  # names and shapes only
        skeleton = UNet(config)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    names = release_names(skeleton)
    loaded, used = {}, set()
    for key, release in names.items():
        source = LIVE + release if weights == "live" else _ema_key(release)
        if source not in state:
            raise InputError(f"{run.checkpoint}: key {source} missing (the network of {run.project_yaml.name} has "
                             f"it)")
        if tuple(state[source].shape) != tuple(shapes[key]):
            raise InputError(f"{run.checkpoint}: key {source} has shape {tuple(state[source].shape)}, the network of "
                             f"{run.project_yaml.name} needs {tuple(shapes[key])}")
        loaded[key] = state[source].float()
        used.add(source)
    prefix = LIVE if weights == "live" else EMA
    extra = sorted(k for k in state if k.startswith(prefix) and k not in used
                   and k not in (EMA + "decay", EMA + "num_updates"))
    if extra:
        raise InputError(f"{run.checkpoint}: key {extra[0]} is not part of the network its yaml describes "
                         f"({len(extra)} such key{'s' if len(extra) > 1 else ''})")
    net = UNet(config)
    net.load_state_dict(loaded)
    _check_schedule(run, state)
    info = {"source": str(run.checkpoint), "project_yaml": str(run.project_yaml), "weights": weights,
            "pseudo3d": run.pseudo3d, "frames": PSEUDO3D_FRAMES if run.pseudo3d else None,
            "scale_factor": run.scale_factor, "conditioning": run.conditioning,
            "schedule": schedule_args(run)}
    return net, info


def _check_schedule(run: ReleaseRun, state: dict[str, torch.Tensor]) -> None:
    """The file's own `betas` buffer equals the schedule its yaml describes (a yaml from another run differs)."""
    from gem3d.diffusion import NoiseSchedule

    if "betas" not in state:
        return
    ours = NoiseSchedule(**schedule_args(run)).betas.double()
    theirs = state["betas"].double()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-9):
        raise InputError(f"{run.checkpoint}: key betas: the file's noise schedule differs from the one its yaml "
                         f"{run.project_yaml.name} describes (timesteps, linear_start, linear_end)")


def first_stage_config(run: ReleaseRun) -> dict:
    """The first stage's architecture as vae.model keys (gem3d's VAEConfig fields)."""
    fs = (run.params.get("first_stage_config") or {}).get("params") or {}
    dd = fs.get("ddconfig") or {}
    key = "model.params.first_stage_config.params."
    if not dd:
        _refuse(run, key + "ddconfig", None, "missing (no first stage described)")
    if dd.get("attn_resolutions"):
        _refuse(run, key + "ddconfig.attn_resolutions", dd.get("attn_resolutions"),
                "gem3d's VAE has attention in its middle blocks only")
    if int(fs.get("embed_dim", dd.get("z_channels", 4))) != int(dd.get("z_channels", 4)):
        _refuse(run, key + "embed_dim", fs.get("embed_dim"), "differs from ddconfig.z_channels (not supported)")
    return {"base_channels": int(dd["ch"]), "channel_mult": [int(m) for m in dd["ch_mult"]],
            "num_res_blocks": int(dd["num_res_blocks"]), "latent_channels": int(dd["z_channels"])}


def ddim_latents(net: UNet, run: ReleaseRun, cond: torch.Tensor, x_t: torch.Tensor, steps: int = 10,
                 eta: float = 0.0) -> torch.Tensor:
    """The run's network sampled with DDIM at the authors' step spacing from noise `x_t`, conditioned on `cond`
    (both (16 slices, c, h, w), as their sampler feeds a window): a pseudo-3D network sees the 16 slices as one
    window, a 2D one as a batch of 16. Returns the latents (16, c, h, w)."""
    from einops import rearrange

    from gem3d.diffusion import DDIMSampler, NoiseSchedule

    solver = DDIMSampler(NoiseSchedule(**schedule_args(run)), steps, eta=eta, spacing="ldm")
    if not run.pseudo3d:
        return solver.sample(lambda x, t: net(torch.cat([x, cond], 1), torch.full((len(x),), t)), x_t)
    window = rearrange(cond, "(b f) c h w -> b c f h w", f=len(cond))
    z = solver.sample(lambda x, t: net(torch.cat([x, window], 1), torch.full((1,), t)),
                      rearrange(x_t, "(b f) c h w -> b c f h w", f=len(x_t)))
    return rearrange(z, "b c f h w -> (b f) c h w")
