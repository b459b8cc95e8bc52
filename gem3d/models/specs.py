"""Network and training configurations derived from a pipeline `Config` (one place for the wiring).

Channel counts follow the paper: the volume model sees concat(noisy latent, mask latent,
informed-slice latent) = 3 x latent channels; the baseline (Make-A-Volume) 2 x; the slice model
the noisy latent with cross-attention to the position embedding.
"""

from __future__ import annotations

from gem3d.config import Config
from gem3d.methods import registry
from gem3d.models.unet import UNetConfig
from gem3d.models.vae import VAEConfig


FROZEN_EMBEDDING_DIM = 2048  # the pooled features of the frozen encoders (RadImageNet ResNet-50, Inception-v3)


def latent_channels(cfg: Config) -> int:
    return int(cfg.vae.model.get("latent_channels", VAEConfig.latent_channels))


def vae_config(cfg: Config) -> VAEConfig:
    return VAEConfig(in_channels=1, **cfg.vae.model)


def slice_unet_config(cfg: Config) -> UNetConfig:
    c = latent_channels(cfg)
    return UNetConfig(in_channels=c, out_channels=c, context_dim=cfg.slice_model.position_dim,
                      **cfg.slice_model.model)


def variant_injection(cfg: Config, variant: str) -> str:
    """How a volume-model variant's conditions reach its U-Net (its registry entry's `injection`; Table 3): the
    cross-attention variant attends to a frozen image encoder's embedding ("crossattn_frozen") when
    volume_model.crossattn_encoder names one."""
    injection = registry.get(variant).injection
    if injection == "crossattn" and cfg.volume_model.crossattn_encoder is not None:
        return "crossattn_frozen"
    return injection


def volume_unet_config(cfg: Config, informed: bool, slice_axis: bool = False, injection: str = "concat") -> UNetConfig:
    """GEM-3D volume model (informed=True) or the mask-only baseline (informed=False); `injection` is how
    the conditions enter (concat: the paper's GEM-3D; control, crossattn, crossattn_frozen: the Table 3 variants)."""
    c = latent_channels(cfg)
    extra = {} if injection == "concat" else {"injection": injection}  # concat: the field's default
    if injection == "crossattn_frozen":
        extra["context_dim"] = FROZEN_EMBEDDING_DIM
    return UNetConfig(in_channels=c * (3 if informed else 2), out_channels=c, slice_axis=slice_axis,
                      **cfg.volume_model.model, **extra)


def variant_unet_config(cfg: Config, variant: str, slice_axis: bool = False) -> UNetConfig:
    """The volume U-Net of a variant (gem3d, baseline, controlnet, crossattn)."""
    return volume_unet_config(cfg, informed=registry.get(variant).informed, slice_axis=slice_axis,
                              injection=variant_injection(cfg, variant))


def train_config(section: dict, seed: int = 0):
    from gem3d.training.train_config import TrainConfig

    return TrainConfig.from_dict({"seed": seed, **section})
