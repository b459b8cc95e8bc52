"""The volume-model methods: GEM-3D, the Make-A-Volume baseline and the two injection variants of Table 3.

One module for the four registry entries whose `window` is set (gem3d/methods/registry.py): each is the
paper's two-stage volume LDM (stage 1: 2D layers on windows of `volume_model.window` slices; stage 2: the
slice-axis layers only), trained by gem3d.training.diffusion_training and sampled window by window with the
bi-directional propagation (gem3d.sampling.generate.VolumeSampler). They differ in what the network is given:
GEM-3D the mask and the informed slice concatenated, the baseline the mask alone, `controlnet` the conditions
through a control branch, `crossattn` the informed slice through cross-attention (a trained tokenizer of its
latent, or with `volume_model.crossattn_encoder` a frozen image encoder's embedding, as the paper's CLIP).

GEM-3D's check also covers what every method of the run shares: the VAE and the slice model (IG).
"""

from __future__ import annotations

from typing import Callable

from gem3d.config import Config
from gem3d.io import InputError
from gem3d.methods.registry import Budget, get
from gem3d.models import specs


def _refuse(cfg: Config, key: str, problem: str) -> None:
    raise InputError(f"{cfg.source}: config key {key}: {problem}")


def _build(cfg: Config, key: str, make: Callable) -> object:
    try:
        return make()
    except (ValueError, TypeError) as exc:
        _refuse(cfg, key, str(exc))


def check(cfg: Config, name: str) -> None:
    """The networks a variant needs can be built, and the latent slices divide by their downsampling; GEM-3D's
    check covers the shared VAE and slice model too."""
    if name == "gem3d":
        vae = _build(cfg, "vae.model", lambda: specs.vae_config(cfg))
        slice_unet = _build(cfg, "slice_model.model", lambda: specs.slice_unet_config(cfg))
        volume = _build(cfg, "volume_model.model", lambda: specs.volume_unet_config(cfg, informed=True))
        size, factor = cfg.preprocess.slice_size, vae.downsampling_factor
        if size % factor:
            _refuse(cfg, "preprocess.slice_size", f"{size} is not divisible by the VAE's downsampling factor {factor} "
                                                  "(2 ** (len(vae.model.channel_mult) - 1))")
        latent = size // factor
        for key, unet in (("slice_model.model.channel_mult", slice_unet), ("volume_model.model.channel_mult", volume)):
            if latent % unet.downsampling_factor:
                _refuse(cfg, key, f"the latent slices are {latent}x{latent} (preprocess.slice_size {size} / VAE factor "
                                  f"{factor}), not divisible by this U-Net's downsampling factor "
                                  f"{unet.downsampling_factor}")
    elif name != "baseline":
        _build(cfg, "volume_model.model", lambda: _variant_config(cfg, name))
        if name == "crossattn" and cfg.volume_model.crossattn_encoder is not None:
            from gem3d.models.frozen_encoder import check_settings

            check_settings(cfg.volume_model.crossattn_encoder, cfg.source)


def _variant_config(cfg: Config, name: str):
    try:
        return specs.variant_unet_config(cfg, name)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{exc} (needed by comparisons: {name})") from None


def train(cfg: Config, name: str, model: str) -> None:
    """Stage 1 (2D layers on windows) or stage 2 (slice-axis layers, from the stage-1 model file) of a variant."""
    from gem3d.data.latents import LatentStore
    from gem3d.io import read_json
    from gem3d.paths import Paths
    from gem3d.training import diffusion_training as dt

    paths = Paths(cfg)
    stage = next(t.stage for t in get(name).trainings if t.model == model)
    if cfg.pretrained(model):
        raise InputError(f"{cfg.source}: {model} is given as a file ({cfg.pretrained(model)}), not trained: "
                         f"gem3d import-network --model {model}")
    latents = LatentStore(paths.latents, read_json(paths.split)["train"])
    if stage == 1:
        dt.train_volume_stage1(cfg, latents, name, paths.train_state(model), paths.model(model))
    else:
        stage1 = get(name).models(1)[0]
        dt.train_volume_stage2(cfg, latents, name, paths.model(stage1), paths.train_state(model), paths.model(model))


def sampler(cfg: Config, name: str, spec):
    from gem3d.sampling.generate import VolumeSampler

    return VolumeSampler(cfg, name, spec.stage, need_slice_model=spec.informed == "IG")


def budget(cfg: Config, name: str) -> Budget:
    """The stage-2 network's parameters, both stages' steps x windows, the latent windows it sees."""
    from gem3d.models import UNet, meta_parameters

    unet = specs.variant_unet_config(cfg, name, slice_axis=True)
    size = cfg.preprocess.slice_size
    latent = size // specs.vae_config(cfg).downsampling_factor
    v = cfg.volume_model
    others = []
    if unet.injection == "crossattn_frozen":
        others.append(f"the informed slice as the pooled {specs.FROZEN_EMBEDDING_DIM}-d embedding of a frozen "
                      f"{cfg.volume_model.crossattn_encoder['extractor']} (not trained, not counted)")
    elif unet.injection == "crossattn":
        others.append("the informed slice as tokens of a trained tokenizer of its latent (the paper: a CLIP image "
                      "embedding)")
    steps = []
    for training, section in zip(get(name).trainings, (v.stage1, v.stage2)):
        source = cfg.pretrained(training.model)
        if source:  # given as a file: nothing trained here
            others.append(f"stage {training.stage} imported from {source} (its training not run here)")
        else:
            steps.append((section["steps"], section["batch_size"]))
    if name == "gem3d":  # its IG sets also sample with the slice model
        others.append(slice_model_budget(cfg))
    return Budget(meta_parameters(lambda: UNet(unet)), tuple(steps), f"windows of {v.window} slices",
                  f"{latent}x{latent} latents ({specs.latent_channels(cfg)} ch) of {size}x{size} slices",
                  "none (the slice store's slices, whole depth window by window)", "; ".join(others), v.window)


def slice_model_budget(cfg: Config) -> str:
    """The slice model's part of GEM-3D's budget: the IG sets' informed slices come from it."""
    from gem3d.models import UNet, meta_parameters

    parameters = meta_parameters(lambda: UNet(specs.slice_unet_config(cfg)))
    t = cfg.slice_model.train
    trained = (f"imported from {cfg.slice_model.pretrained}" if cfg.slice_model.pretrained else
               f"{t['steps']:,} x {t['batch_size']} optimizer steps x batch of 2D slices")
    return f"IG sets also use the slice model: {parameters / 1e6:.2f} M parameters, {trained}"
