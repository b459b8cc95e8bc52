"""The paper's "conditional 3D LDM" comparison (Tables 1-2): one diffusion model over whole-volume latents.

Where GEM-3D generates a volume window by window from an informed slice, this method denoises the
whole volume's latents at once with a 3D U-Net (gem3d/models/unet3d.py), conditioned on the mask
by concatenating the mask latents on the channels (in 2c channels, out c, epsilon prediction,
the same noise schedule and the same sampler settings as GEM-3D: sampling.solver / steps / eta).

Latents are those of the latent cache: the 2D VAE applied per slice and the slices stacked
(c, d, h, w); there is no 3D autoencoder. A 3D network (stride-2 downsampling on every axis, one
batch of volumes) needs one depth, `ldm3d.depth`: a volume of d <= depth slices is padded to it,
half before and half after, with the latents of the outside region (the VAE's encoding of an
all-outside image slice and of an all-outside mask slice: what padding the scan with background and
encoding it would give), so the network sees the whole volume unresampled; only a deeper volume is
resampled along the slice axis to `depth` by linear interpolation with the end slices kept
(`resample_slices`), and the count of such volumes is logged. Sampling encodes the mask slices with the
VAE, fits them to the depth the same way, denoises (sampling.volumes_per_batch volumes together, each
from its own seed's noise), decodes the depth slices one by one with the VAE and takes the volume's own
slices back (the padded ones dropped, or the decoded image resampled back to d). A model file trained
before the padding (no "fit" in its extras) resampled every volume, and is sampled so.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gem3d.config import Config
from gem3d.data.latents import LatentStore, LoadedVAE, load_vae
from gem3d.data.slice_store import OUTSIDE
from gem3d.device import compute_device
from gem3d.diffusion import randn_tensor
from gem3d.fingerprint import check_model_config, stage_fingerprint, store_digest
from gem3d.io import InputError
from gem3d.models import build_model, meta_parameters, model_args
from gem3d.methods.registry import Budget
from gem3d.models.specs import latent_channels, train_config, vae_config
from gem3d.models.unet3d import UNet3D, UNet3DConfig
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeJob, build_sampler, format_duration, seeded_batches
from gem3d.training.checkpoint import inference_state_dict, load_checkpoint, seeded, sha256_of
from gem3d.training.diffusion_training import eps_loss, noise_schedule
from gem3d.training import loop

log = logging.getLogger("gem3d.ldm3d")


def resample_slices(x: torch.Tensor, depth: int) -> torch.Tensor:
    """x (..., d, h, w) -> (..., depth, h, w) float32, linear along the slice axis (-3), end slices kept."""
    *lead, d, h, w = x.shape
    lines = x.float().movedim(-3, -1).reshape(1, -1, d)  # one line of d values per (..., h, w) position
    lines = F.interpolate(lines, size=depth, mode="linear", align_corners=True)
    return lines.reshape(*lead, h, w, depth).movedim(-1, -3).contiguous()


def fit_depth(z: torch.Tensor, depth: int, pad: torch.Tensor) -> torch.Tensor:
    """(c, d, h, w) latents -> (c, depth, h, w): padded with `pad` (c, h, w) to depth, half before and half after,
    when d <= depth; resampled to depth otherwise."""
    d = z.shape[1]
    if d > depth:
        return resample_slices(z, depth)
    before = (depth - d) // 2
    fill = pad.to(z.dtype)[:, None].expand(-1, depth - d, -1, -1)
    return torch.cat([fill[:, :before], z, fill[:, before:]], dim=1)


def unfit_depth(x: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of `fit_depth` on (depth, ...) decoded slices: the volume's d slices (centre) or resampled back."""
    depth = x.shape[0]
    if d > depth:
        return resample_slices(x, d)
    before = (depth - d) // 2
    return x[before: before + d]


def outside_latents(vae: LoadedVAE, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) latents (c, h, w) of an all-outside slice: the image at -1, the mask at the outside label."""
    image = vae.encode(torch.full((1, 1, size, size), -1.0))[0]
    mask = vae.encode_labels(np.full((1, size, size), OUTSIDE, dtype=np.int8))[:, 0]
    return image, mask


def ldm3d_unet_config(cfg: Config, channels: int) -> UNet3DConfig:
    """The network of `ldm3d.model` for latents of `channels` channels: noisy + mask latents in, noise out."""
    return UNet3DConfig(in_channels=2 * channels, out_channels=channels, **cfg.ldm3d.model)


def train_ldm3d(cfg: Config, latents: LatentStore, vae_path: Path, checkpoint: Path, out: Path) -> None:
    """Train the conditional 3D LDM on `latents` (the training cases, as the pipeline passes them to every
    diffusion training) and export it to `out`; nothing runs when `out` is up to date. `vae_path`: the VAE that
    made the latent cache (the outside region's latents pad the volumes)."""
    depth = cfg.ldm3d.depth
    tcfg = train_config(cfg.ldm3d.train, cfg.seed)
    schedule = noise_schedule(cfg)
    with seeded(cfg.seed):
        model = UNet3D(ldm3d_unet_config(cfg, latents.channels))
    factor = model.config.downsampling_factor
    if depth % factor:
        raise InputError(f"ldm3d.depth {depth} must be a multiple of {factor} (the 3D network's downsampling factor)")
    vae = load_vae(vae_path, "cpu", cfg)
    if vae.sha != latents.index["vae_sha256"]:
        raise InputError(f"{latents.root}: made with another VAE than {vae_path}; rerun gem3d encode")
    pad_image, pad_mask = outside_latents(vae, cfg.preprocess.slice_size)
    deeper = [c for i, c in enumerate(latents.case_ids) if latents.depth(i) > depth]
    log.info("3D LDM: %d training volumes at depth %d: %d padded with the outside region, %d deeper ones resampled%s",
             len(latents.case_ids), depth, len(latents.case_ids) - len(deeper), len(deeper),
             f" ({', '.join(deeper[:5])}{', ...' if len(deeper) > 5 else ''})" if deeper else "")
    # every case fitted once to the fixed depth, kept as float16 like the cache (cast per batch)
    images = torch.stack([fit_depth(z, depth, pad_image).half() for z in latents.image])  # (n, c, D, h, w)
    masks = torch.stack([fit_depth(z, depth, pad_mask).half() for z in latents.mask])

    def batch_source(step: int, g: torch.Generator, items: range) -> dict:
        size = len(items)
        pick = torch.randint(len(images), (size,), generator=g)
        x0 = images[pick].float()
        t = schedule.sample_timesteps(size, g)  # one timestep per volume
        return {"x0": x0, "cond": masks[pick].float(), "t": t, "noise": torch.randn(x0.shape, generator=g)}

    def loss_fn(net, b: dict, g: torch.Generator):
        return eps_loss(net, b["x0"], b["cond"], b["t"], b["noise"], schedule)

    result = loop.train(model, loss_fn, batch_source, tcfg, checkpoint, kind="unet3d", model_args=model_args(model),
                        fingerprint=stage_fingerprint(cfg, "train_ldm3d", {"latents": store_digest(latents.index)}),
                        model_path=out, extra={"role": "ldm3d", "depth": depth, "fit": "pad", "resampled_cases": deeper,
                                               "schedule": schedule.to_config()})
    loop.export_result(result, checkpoint, out, {"latents_vae_sha256": latents.index["vae_sha256"]})


class LDM3DSampler:
    """The trained conditional 3D LDM and the VAE; turns `VolumeJob`s into (d, s, s) images."""

    def __init__(self, cfg: Config, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or compute_device()
        paths = Paths(cfg)
        self.vae: LoadedVAE = load_vae(paths.model("vae"), self.device, cfg)
        path = paths.model("ldm3d")
        payload = load_checkpoint(path, expect_kind="unet3d")
        extra = payload.get("extra") or {}
        check_model_config(payload, cfg, "ldm3d", path)
        self.net = build_model("unet3d", payload["model_args"])
        self.depth = int(extra.get("depth", cfg.ldm3d.depth))
        self.fit = extra.get("fit", "resample")  # a model file from before the padding resampled every volume
        self.net.load_state_dict(inference_state_dict(payload, use_ema=True))
        self.net.to(self.device).eval()
        trained_on = extra.get("latents_vae_sha256")
        if trained_on is not None and trained_on != self.vae.sha:
            raise InputError(f"{path}: made with another VAE than {paths.model('vae')} "
                             f"(sha256 {trained_on[:12]} != {self.vae.sha[:12]}); rerun the stages after the VAE")
        self.solver = build_sampler(cfg, extra)
        self.checkpoints = {"vae": self.vae.sha, "ldm3d": sha256_of(path)}
        self.slice_size, self.pad_mask = cfg.preprocess.slice_size, None

    def fitted(self, mask_latents: torch.Tensor) -> torch.Tensor:
        """(c, d, h, w) mask latents at the network's depth, as its training fitted them (padded or resampled)."""
        if self.fit == "resample":
            return resample_slices(mask_latents, self.depth)
        if self.pad_mask is None:
            self.pad_mask = outside_latents(self.vae, self.slice_size)[1]
        return fit_depth(mask_latents, self.depth, self.pad_mask)

    def unfitted(self, image: torch.Tensor, d: int) -> torch.Tensor:
        """(depth, s, s) decoded slices -> the volume's d slices."""
        return resample_slices(image, d) if self.fit == "resample" else unfit_depth(image, d)

    def autocast(self):
        """The network's forward passes under bf16 autocast when sampling.precision is bf16 (the VAE runs fp32)."""
        if self.cfg.sampling.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def check_job(self, job: VolumeJob) -> None:
        bad = [int(v) for v in np.unique(job.label) if v < OUTSIDE or v > self.vae.max_label]
        if bad:
            raise InputError(f"{job.source_case}: mask labels {bad} outside the trained set -1..{self.vae.max_label}")

    @torch.no_grad()
    def generate(self, jobs: list[VolumeJob], pin: bool = True) -> list[np.ndarray]:
        """(d, s, s) float32 images in [-1, 1], one per job; -1 outside the non-zero region. Volume i's
        noise comes from a generator seeded with its job's seed only. `pin` is ignored: no informed slice."""
        for job in jobs:
            self.check_job(job)
        results: list[np.ndarray] = []
        t_start = time.perf_counter()
        for batch, generators in seeded_batches(jobs, self.cfg.sampling.volumes_per_batch):
            tic = time.perf_counter()
            cond = torch.stack([self.fitted(self.vae.encode_labels(j.label)) for j in batch])
            cond = cond.to(self.device)  # (b, c, D, h, w)

            def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
                t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=self.device)
                with self.autocast():
                    return self.net(torch.cat([x, cond], dim=1), t_vec).float()

            x_T = randn_tensor((len(batch), self.net.config.out_channels, *cond.shape[2:]), generators,
                               self.device, torch.float32)
            z = self.solver.sample(eps_fn, x_T, generators)  # (b, c, D, h, w)
            for job, latent in zip(batch, z):
                image = self.vae.decode(latent.permute(1, 0, 2, 3))[:, 0]  # (D, c, h, w) -> (D, s, s)
                image = self.unfitted(image, job.label.shape[0]).clamp(-1, 1).numpy()  # (d, s, s)
                results.append(np.where(job.label == OUTSIDE, -1.0, image).astype(np.float32))
            now = time.perf_counter()
            seconds = (now - tic) / len(batch)
            eta = format_duration((now - t_start) / len(results) * (len(jobs) - len(results)))
            for k, job in enumerate(batch):
                log.info("generated %d/%d volumes (ldm3d, %s: %.1f s, eta %s)", len(results) - len(batch) + k + 1,
                         len(jobs), job.sample_id, seconds, eta)
        return results


# ---- the registry's interface (gem3d/methods/registry.py) ------------------------------------------------------


def check(cfg: Config, name: str) -> None:
    """ldm3d.model builds, ldm3d.depth and the latent slices divide by its downsampling, ldm3d.train is one."""
    try:
        net = ldm3d_unet_config(cfg, latent_channels(cfg))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{cfg.source}: config key ldm3d.model: {exc}") from None
    latent = cfg.preprocess.slice_size // vae_config(cfg).downsampling_factor
    if cfg.ldm3d.depth % net.downsampling_factor or latent % net.downsampling_factor:
        raise InputError(f"{cfg.source}: config key ldm3d.depth: {cfg.ldm3d.depth} slices of {latent}x{latent} "
                         f"latents: both must be divisible by the 3D U-Net's downsampling factor "
                         f"{net.downsampling_factor}")
    try:
        train_config(cfg.ldm3d.train)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{cfg.source}: config key ldm3d.train: {exc}") from None


def train(cfg: Config, name: str, model: str) -> None:
    from gem3d.io import read_json

    paths = Paths(cfg)
    latents = LatentStore(paths.latents, read_json(paths.split)["train"])
    train_ldm3d(cfg, latents, paths.model("vae"), paths.train_state(model), paths.model(model))


def sampler(cfg: Config, name: str, spec) -> LDM3DSampler:
    return LDM3DSampler(cfg)


def budget(cfg: Config, name: str) -> Budget:
    """The 3D U-Net's parameters, steps x volumes, the latent volume it sees and when it resamples."""
    c = latent_channels(cfg)
    net = ldm3d_unet_config(cfg, c)
    size, depth = cfg.preprocess.slice_size, cfg.ldm3d.depth
    latent = size // vae_config(cfg).downsampling_factor
    t = cfg.ldm3d.train
    return Budget(meta_parameters(lambda: UNet3D(net)), ((t["steps"], t["batch_size"]),), "whole volumes",
                  f"{depth} x {latent}x{latent} latents ({c} ch) of {size}x{size} slices",
                  f"none for volumes of up to {depth} slices (padded with the outside region's latents); a deeper "
                  f"one resampled to {depth} slices (linear) and back", slices_per_item=depth)

