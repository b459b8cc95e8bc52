"""Diffusion training tasks: the slice model (IG), the volume model stages 1-2, and the baseline.

All read the latent cache (never the VAE) and predict the noise (epsilon, MSE loss). Batches,
timesteps and noise are drawn on the CPU from the loop's generator, so a resumed run is exact.

- slice model: x0 = one latent slice (b c h w); context = sinusoidal embedding of p = z / (d - 1).
- volume stage 1: x0 = a window of n consecutive latent slices (b c f h w), one timestep per
  slice; input = concat(x_t, mask latents, informed latent) where the informed slice is one random
  slice of the same window repeated over f. Baseline (Make-A-Volume): concat(x_t, mask latents).
- volume stage 2: the stage-1 network with slice-axis layers inserted (identity at init); only
  those layers train; one timestep per window ("linear_decay": weight ~ 2T - t, or "uniform").
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from gem3d.config import Config
from gem3d.data.latents import LatentStore
from gem3d.diffusion import NoiseSchedule
from gem3d.io import InputError, file_sha256
from gem3d.models import UNet, build_model, model_args, position_embedding
from gem3d.methods import registry
from gem3d.models.specs import slice_unet_config, train_config, variant_injection, variant_unet_config
from gem3d.fingerprint import stage_fingerprint, store_digest
from gem3d.training.checkpoint import inference_state_dict, load_checkpoint, seeded, sha256_of
from gem3d.training.loop import export_result, train

log = logging.getLogger("gem3d.diffusion_training")


def noise_schedule(cfg: Config) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def eps_loss(model, x0, cond, t, noise, schedule: NoiseSchedule, context=None):
    """MSE between the true and predicted noise of x_t = q(x_t | x0)."""
    x_t = schedule.add_noise(x0, noise, t)
    inp = x_t if cond is None else torch.cat([x_t, cond], dim=1)
    pred = model(inp, t, context=context)
    loss = F.mse_loss(pred.float(), noise)
    return loss, {"mse": loss.detach()}


def _fingerprint(cfg: Config, stage: str, latents: LatentStore, variant: str | None = None,
                 **file_digests: str) -> dict:
    """What defines a diffusion training: its config keys (a volume variant's own beside its stage's: its registry
    training's `keys`), the latent cache and the digests of any files it starts from or reads."""
    extra: tuple[str, ...] = ()
    if variant is not None:
        extra = next(t.keys for t in registry.get(variant).trainings if t.rule == stage)
        if variant_injection(cfg, variant) == "crossattn_frozen":
            file_digests["crossattn_encoder"] = file_sha256(cfg.volume_model.crossattn_encoder["weights"])
    return stage_fingerprint(cfg, stage, {"latents": store_digest(latents.index), **file_digests}, extra)


# ---- slice model (generated informed slice, IG) ------------------------------------------------


def train_slice_model(cfg: Config, latents: LatentStore, checkpoint: Path, out: Path) -> None:
    tcfg = train_config(cfg.slice_model.train, cfg.seed)
    schedule = noise_schedule(cfg)
    with seeded(cfg.seed):
        model = UNet(slice_unet_config(cfg))
    rows = [(i, z) for i in range(len(latents.case_ids)) for z in range(latents.depth(i))]
    dim = cfg.slice_model.position_dim

    def batch_source(step: int, g: torch.Generator, items: range) -> dict:
        size = len(items)
        pick = torch.randint(len(rows), (size,), generator=g).tolist()
        x0 = torch.stack([latents.image[rows[k][0]][:, rows[k][1]] for k in pick]).float()  # (b, c, h, w)
        p = torch.tensor([rows[k][1] / max(latents.depth(rows[k][0]) - 1, 1) for k in pick])
        t = schedule.sample_timesteps(size, g)
        return {"x0": x0, "context": position_embedding(p, dim), "t": t, "noise": torch.randn(x0.shape, generator=g)}

    def loss_fn(net, b: dict, g: torch.Generator):
        return eps_loss(net, b["x0"], None, b["t"], b["noise"], schedule, context=b["context"])

    result = train(model, loss_fn, batch_source, tcfg, checkpoint, kind="unet", model_args=model_args(model),
                   extra={"role": "slice_model", "position_dim": dim, "schedule": schedule.to_config()},
                   fingerprint=_fingerprint(cfg, "train_slice_model", latents), model_path=out)
    export_result(result, checkpoint, out, {"latents_vae_sha256": latents.index["vae_sha256"]})


# ---- volume model (GEM-3D) and baseline --------------------------------------------------------


def window_starts_check(latents: LatentStore, n: int) -> None:
    short = [(c, latents.depth(i)) for i, c in enumerate(latents.case_ids) if latents.depth(i) < n]
    if short:
        raise InputError(f"{latents.root}: cases shorter than the {n}-slice window: {short[:5]} "
                         f"(lower volume_model.window)")


def window_batch(latents: LatentStore, n: int, batch_size: int, informed: bool, g: torch.Generator,
                 picks: list | None = None):
    """(x0 (b c f h w), cond (b c' f h w)) windows of n consecutive slices from random cases; with `picks` (a list),
    the (case index, slice index) of each window's informed slice is appended to it."""
    x0s, conds = [], []
    for _ in range(batch_size):
        i = int(torch.randint(len(latents.case_ids), (1,), generator=g))
        start = int(torch.randint(latents.depth(i) - n + 1, (1,), generator=g))
        x0 = latents.image[i][:, start: start + n].float()  # (c, f, h, w)
        parts = [latents.mask[i][:, start: start + n].float()]
        if informed:
            k = int(torch.randint(n, (1,), generator=g))
            parts.append(x0[:, k: k + 1].expand_as(x0))  # informed slice repeated over the window
            if picks is not None:
                picks.append((i, start + k))
        x0s.append(x0)
        conds.append(torch.cat(parts, dim=0))
    return torch.stack(x0s), torch.stack(conds)


def slice_embeddings(cfg: Config, latents: LatentStore) -> tuple[list[torch.Tensor], dict]:
    """Every training slice's frozen-encoder embedding ((d, 1, 2048) per case) and the encoder's record, for the
    cross-attention variant with volume_model.crossattn_encoder (computed once: the encoder is frozen)."""
    from gem3d.data.latents import load_vae
    from gem3d.device import compute_device
    from gem3d.models.frozen_encoder import FrozenSliceEncoder
    from gem3d.paths import Paths

    vae_path = Paths(cfg).model("vae")
    vae = load_vae(vae_path, compute_device(), cfg)
    if vae.sha != latents.index["vae_sha256"]:
        raise InputError(f"{latents.root}: made with another VAE than {vae_path}; rerun gem3d encode")
    encoder = FrozenSliceEncoder(cfg.volume_model.crossattn_encoder, vae, compute_device())
    table = [encoder(z.float().permute(1, 0, 2, 3)).cpu() for z in latents.image]  # (c, d, h, w) -> (d, 1, D)
    log.info("frozen encoder %s: %d training slices embedded", encoder.description, sum(len(t) for t in table))
    return table, encoder.record()


def _volume_loop(cfg: Config, latents: LatentStore, model: UNet, tcfg, variant: str, stage: int,
                 checkpoint: Path, out: Path, fingerprint: dict, trainable=None, extra: dict | None = None) -> None:
    n = cfg.volume_model.window
    informed = registry.get(variant).informed
    window_starts_check(latents, n)
    schedule = noise_schedule(cfg)
    mode = cfg.volume_model.stage2_timesteps if stage == 2 else "uniform"
    injection = variant_injection(cfg, variant)
    embeddings = None
    if injection == "crossattn_frozen":  # the informed slices' frozen embeddings are the context
        embeddings, encoder = slice_embeddings(cfg, latents)
        extra = {**(extra or {}), "crossattn_encoder": encoder}

    def batch_source(step: int, g: torch.Generator, items: range) -> dict:
        size = len(items)
        picks: list = []
        x0, cond = window_batch(latents, n, size, informed, g, picks)
        frames = None if stage == 2 else n  # stage 1: each slice its own timestep; stage 2: one per window
        t = schedule.sample_timesteps(size, g, mode=mode, frames=frames)
        batch = {"x0": x0, "cond": cond, "t": t, "noise": torch.randn(x0.shape, generator=g)}
        if embeddings is not None:
            batch["context"] = torch.stack([embeddings[i][k] for i, k in picks])  # (b, 1, D)
        return batch

    def loss_fn(net, b: dict, g: torch.Generator):
        return eps_loss(net, b["x0"], b["cond"], b["t"], b["noise"], schedule, context=b.get("context"))

    role = {"gem3d": "volume_model", "baseline": "baseline"}.get(variant, f"{variant}_volume_model") + f"_stage{stage}"
    result = train(model, loss_fn, batch_source, tcfg, checkpoint, kind="unet", model_args=model_args(model),
                   trainable_parameters=trainable, fingerprint=fingerprint, model_path=out,
                   extra={"role": role, "window": n, "informed": informed, "variant": variant,
                          "injection": injection, "schedule": schedule.to_config(), **(extra or {})})
    export_result(result, checkpoint, out, {"latents_vae_sha256": latents.index["vae_sha256"]})


def train_volume_stage1(cfg: Config, latents: LatentStore, variant: str, checkpoint: Path, out: Path) -> None:
    """Stage 1 of a volume-model variant (gem3d, baseline, controlnet, crossattn): 2D layers on windows."""
    with seeded(cfg.seed):
        model = UNet(variant_unet_config(cfg, variant, slice_axis=False))
    _volume_loop(cfg, latents, model, train_config(cfg.volume_model.stage1, cfg.seed), variant, 1, checkpoint, out,
                 _fingerprint(cfg, "train_volume_stage1", latents, variant))


def train_volume_stage2(cfg: Config, latents: LatentStore, variant: str, stage1: Path, checkpoint: Path,
                        out: Path) -> None:
    """Insert slice-axis layers into the trained stage-1 network (EMA weights) and train only them."""
    payload = load_checkpoint(stage1, expect_kind="unet")  # first: a missing or corrupt file gets its own message
    stage1_sha = sha256_of(stage1)  # hashed once: the fingerprint and the model's provenance both record it
    stage1_net = build_model("unet", payload["model_args"])
    stage1_net.load_state_dict(inference_state_dict(payload, use_ema=True))
    want = variant_unet_config(cfg, variant, slice_axis=True)
    if stage1_net.config.in_channels != want.in_channels:
        raise InputError(f"{stage1}: stage-1 model has {stage1_net.config.in_channels} input channels, the config "
                         f"asks for {want.in_channels} (wrong checkpoint?)")
    if getattr(stage1_net.config, "injection", "concat") != getattr(want, "injection", "concat"):
        raise InputError(f"{stage1}: stage-1 model injects the conditions by {stage1_net.config.injection}, the "
                         f"{variant} model by {want.injection} (wrong checkpoint?)")
    with seeded(cfg.seed):
        model = UNet(want).load_stage1(stage1_net)
    del stage1_net
    _volume_loop(cfg, latents, model, train_config(cfg.volume_model.stage2, cfg.seed), variant, 2, checkpoint, out,
                 _fingerprint(cfg, "train_volume_stage2", latents, variant, stage1=stage1_sha),
                 trainable=list(model.slice_axis_parameters()), extra={"stage1_sha256": stage1_sha})
