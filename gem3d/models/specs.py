"""Network and training configurations derived from a pipeline `Config` (one place for the wiring).

Channel counts follow the paper: the volume model sees concat(noisy latent, mask latent,
informed-slice latent) = 3 x latent channels; the baseline (Make-A-Volume) 2 x; the slice model
the noisy latent with cross-attention to the position embedding.
"""

from __future__ import annotations

from gem3d.config import Config
from gem3d.models.unet import UNetConfig
from gem3d.models.vae import VAEConfig


def latent_channels(cfg: Config) -> int:
    return int(cfg.vae.model.get("latent_channels", VAEConfig.latent_channels))


def vae_config(cfg: Config) -> VAEConfig:
    return VAEConfig(in_channels=1, **cfg.vae.model)


def slice_unet_config(cfg: Config) -> UNetConfig:
    c = latent_channels(cfg)
    return UNetConfig(in_channels=c, out_channels=c, context_dim=cfg.slice_model.position_dim,
                      **cfg.slice_model.model)


# volume-model variants -> how the informed slice and the mask reach the network (Table 3); the baseline
# (Make-A-Volume) gets the mask alone by concatenation
VARIANT_INJECTION = {"gem3d": "concat", "baseline": "concat", "controlnet": "control", "crossattn": "crossattn"}


def volume_unet_config(cfg: Config, informed: bool, slice_axis: bool = False, injection: str = "concat") -> UNetConfig:
    """GEM-3D volume model (informed=True) or the mask-only baseline (informed=False); `injection` is how
    the conditions enter (concat: the paper's GEM-3D; control, crossattn: the Table 3 variants)."""
    c = latent_channels(cfg)
    extra = {} if injection == "concat" else {"injection": injection}  # concat: the field's default
    return UNetConfig(in_channels=c * (3 if informed else 2), out_channels=c, slice_axis=slice_axis,
                      **cfg.volume_model.model, **extra)


def variant_unet_config(cfg: Config, variant: str, slice_axis: bool = False) -> UNetConfig:
    """The volume U-Net of a variant (gem3d, baseline, controlnet, crossattn)."""
    return volume_unet_config(cfg, informed=variant != "baseline", slice_axis=slice_axis,
                              injection=VARIANT_INJECTION[variant])


def train_config(section: dict, seed: int = 0):
    from gem3d.training.loop import TrainConfig

    return TrainConfig.from_dict({"seed": seed, **section})
