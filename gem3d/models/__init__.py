"""Networks: KL autoencoder, diffusion UNet (2D / pseudo-3D), and the build_model registry.

A checkpoint stores `kind` and `model_args = dataclasses.asdict(config)`; build_model(kind,
model_args) rebuilds the network from those alone (JSON lists are accepted for tuples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gem3d.models.discriminator import AdversarialVAE, AdversarialVAEConfig
from gem3d.models.embeddings import position_embedding, timestep_embedding
from gem3d.models.pix2pix3d import Pix2Pix3D, Pix2Pix3DConfig
from gem3d.models.unet import UNet, UNetConfig, from_stage1
from gem3d.models.unet3d import UNet3D, UNet3DConfig
from gem3d.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

REGISTRY: dict[str, tuple[type, type[nn.Module]]] = {
    "vae": (VAEConfig, AutoencoderKL),
    "vae_adversarial": (AdversarialVAEConfig, AdversarialVAE),  # training state of a VAE with its discriminator
    "unet": (UNetConfig, UNet),
    "pix2pix3d": (Pix2Pix3DConfig, Pix2Pix3D),
    "unet3d": (UNet3DConfig, UNet3D),
}


def build_model(kind: str, model_args: Mapping[str, Any]) -> nn.Module:
    """Build a registered network from its config fields, e.g. build_model("unet", asdict(cfg))."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown model kind {kind!r}; allowed: {sorted(REGISTRY)}")
    config_cls, model_cls = REGISTRY[kind]
    allowed = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(model_args) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {kind} model_args {unknown}; allowed: {allowed}")
    try:
        config = config_cls(**model_args)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"bad {kind} model_args: {err}") from None
    return model_cls(config)


def model_args(model: nn.Module) -> dict[str, Any]:
    """The JSON-able model_args of a registered network (tuples as lists)."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise ValueError(f"{type(model).__name__} has no dataclass config")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def model_kind(model: nn.Module) -> str:
    """The registry kind of a network instance."""
    for kind, (_, model_cls) in REGISTRY.items():
        if type(model) is model_cls:
            return kind
    raise ValueError(f"{type(model).__name__} is not a registered model; allowed: {sorted(REGISTRY)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def meta_parameters(build: Callable[[], nn.Module]) -> int:
    """The parameter count of the network `build()` makes, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return count_parameters(build())


__all__ = [
    "REGISTRY", "AdversarialVAE", "AdversarialVAEConfig", "AutoencoderKL", "DiagonalGaussian", "UNet", "UNetConfig",
    "VAEConfig", "build_model", "count_parameters", "meta_parameters", "from_stage1", "model_args", "model_kind", "position_embedding", "timestep_embedding",
]
