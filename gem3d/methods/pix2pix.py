"""3D Pix2Pix (gem3d.models.pix2pix3d), the paper's whole-volume comparison method: training and sampling.

Training: every training case of the slice store, (d, s, s), is resampled once to
`pix2pix.volume_size` = (slices, rows, cols) and kept in memory (image trilinear, averaged over
the voxels it replaces on the axes it shrinks, so a 512 -> 128 shrink does not alias; label
nearest). One training item is one whole volume, as in the paper ("3D samples as the training
unit"); no augmentation (pix2pix's random jitter and flips have no stated 3D counterpart). The
generator sees the mask one-hot (labels 0..K and the outside-region label -1: K + 2 channels);
the loss is `pix2pix.l1_weight` (pix2pix: 100) x L1 + the generator's vanilla GAN term + the
discriminator's loss, in one backward through `Pix2Pix3D` (see its module for the detached parts).
Adam's lr 2e-4 and betas (0.5, 0.999) come from `pix2pix.train` (the shared loop's AdamW, which
with `weight_decay: 0` is pix2pix's plain Adam), and so does pix2pix's schedule: the lr constant for the first
half of the steps, then falling linearly toward 0 (`lr_decay: 0.5`, its n_epochs = n_epochs_decay, per step).
pix2pix's only noise is dropout 0.5 on the inner decoder blocks (`pix2pix.model.dropout`, `dropout_blocks`).

Volume size: the paper shrank its 512 x 512 x Z volumes to train on whole volumes. The default
(64, 128, 128) is 1.0 M voxels; with the default network (generator 6.2 M parameters,
discriminator 11.1 M, 5 mask channels) one volume's step keeps ~ 0.33 GB of activations for the
backward in bf16 (~ 260 bytes per voxel, counted on the CPU: every stride-2 first layer keeps the
full-size tensors few) and costs ~ 0.56 TFLOP (forward and backward; the discriminator runs three
times). Both grow with the voxel count: at 160 x 256 x 256 (10.5 M voxels) ~ 2.8 GB and 5.6 TFLOP
a step, at BraTS's slice-store size 160 x 512 x 512 ~ 11 GB and 22 TFLOP: memory would allow
more than the default, the cost of 50 000 steps is what the shrink saves (and what keeps the
comparison at the paper's reduced resolution). Each axis must be divisible by 2**levels and at
least 3 x 2**disc_layers.

Sampling (`Pix2PixSampler`, the sample sets' interface of gem3d.sampling.generate.VolumeSampler):
a job's (d, s, s) mask is resampled to the training size (nearest), the generator runs in eval
mode, and its output is resampled back to (d, s, s), clipped to [-1, 1], with -1 outside the body
region. As pix2pix ("we apply dropout at test time"), the generator's dropout stays on, drawn from the
job's seed (torch's global generator forked per volume), so a volume depends on its seed only. There is no
informed slice: the method cannot decouple the conditions, so `pin` is ignored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gem3d.config import Config
from gem3d.data.slice_store import OUTSIDE, SliceStore
from gem3d.device import compute_device
from gem3d.fingerprint import check_model_config, stage_fingerprint, store_digest
from gem3d.io import InputError
from gem3d.models import build_model, meta_parameters, model_args
from gem3d.models.pix2pix3d import Pix2Pix3D, Pix2Pix3DConfig, gan_loss, mask_channels
from gem3d.methods.registry import Budget
from gem3d.models.specs import train_config
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeJob, format_duration
from gem3d.training.checkpoint import inference_state_dict, load_checkpoint, seeded, sha256_of
from gem3d.training import loop
from gem3d.training.vae_training import check_store_matches

log = logging.getLogger("gem3d.pix2pix")

KIND = "pix2pix3d"


def pix2pix_config(cfg: Config) -> Pix2Pix3DConfig:
    """The network of `cfg.pix2pix.model`, with K + 2 mask channels in and one image channel out."""
    try:
        return Pix2Pix3DConfig(in_channels=cfg.max_label + 2, out_channels=1, **cfg.pix2pix.model)
    except (TypeError, ValueError) as err:
        raise InputError(f"{cfg.source}: config key pix2pix.model: {err}") from None


def volume_size(cfg: Config, net: Pix2Pix3DConfig) -> tuple[int, int, int]:
    """`pix2pix.volume_size`, checked against what the generator and the discriminator need."""
    size = tuple(int(n) for n in cfg.pix2pix.volume_size)
    multiple = net.size_multiple()
    if len(size) != 3 or any(n % multiple for n in size):
        raise InputError(f"{cfg.source}: config key pix2pix.volume_size: {list(size)} must be 3 sizes divisible by "
                         f"2**levels = {multiple}")
    if min(size) < net.min_disc_size():
        raise InputError(f"{cfg.source}: config key pix2pix.model.disc_layers: {net.disc_layers} layers need every "
                         f"axis of pix2pix.volume_size to be at least {net.min_disc_size()}, got {list(size)}")
    return size


def resample(volume: torch.Tensor, size: tuple[int, int, int], is_label: bool) -> torch.Tensor:
    """(d, h, w) -> `size`: labels nearest; images averaged over the voxels each output voxel replaces on the axes
    that shrink, then trilinear (align_corners=False) to the exact size."""
    x = volume[None, None].float()
    if is_label:
        return F.interpolate(x, size=size, mode="nearest-exact")[0, 0].to(volume.dtype)
    shrunk = tuple(min(a, b) for a, b in zip(x.shape[-3:], size))
    if shrunk != tuple(x.shape[-3:]):
        x = F.adaptive_avg_pool3d(x, shrunk)
    if shrunk != tuple(size):
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x[0, 0]


def training_volumes(store: SliceStore, case_ids: list[str],
                     size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, *size) float16 images and (n, *size) int8 labels of the cases, resampled once into tensors allocated
    once (no stacked copy: the whole training set is in memory, `host_memory_mb`)."""
    if not case_ids:
        raise InputError(f"{store.root}: no training cases for 3D Pix2Pix")
    images = labels = None
    for i, case_id in enumerate(case_ids):
        case = store.load(case_id)
        image = resample(torch.from_numpy(case.image), size, is_label=False).clamp(-1, 1).half()
        label = resample(torch.from_numpy(np.ascontiguousarray(case.label)), size, is_label=True)
        if images is None:
            images = torch.empty((len(case_ids), 1, *image.shape), dtype=image.dtype)
            labels = torch.empty((len(case_ids), *label.shape), dtype=label.dtype)
        images[i, 0], labels[i] = image, label
    return images, labels


def host_memory_mb(cfg: Config, n_train: int) -> float:
    """The training set held in memory (`training_volumes`): a float16 image and an int8 label per voxel."""
    return n_train * float(np.prod(cfg.pix2pix.volume_size)) * 3 / 1e6


def make_loss(l1_weight: float, max_label: int):
    """loss_fn(net, {"label" (b, d, h, w), "image" (b, 1, d, h, w)}, generator) of the loop:
    l1_weight x L1 + the generator's GAN term + the discriminator's loss."""

    def loss_fn(net, batch: dict, g: torch.Generator):
        fake, logits_for_generator, d_loss = net(mask_channels(batch["label"], max_label), batch["image"])
        l1 = F.l1_loss(fake.float(), batch["image"])
        g_loss = gan_loss(logits_for_generator, True)
        loss = l1_weight * l1 + g_loss + d_loss
        return loss, {"l1": l1.detach(), "g_loss": g_loss.detach(), "d_loss": d_loss.detach()}

    return loss_fn


def train_pix2pix(cfg: Config, store: SliceStore, checkpoint: Path, out: Path) -> None:
    """Train (or resume) 3D Pix2Pix on the training cases; write `out` (kind "pix2pix3d": generator and
    discriminator; the sampler uses the generator)."""
    check_store_matches(store, cfg)
    settings = cfg.pix2pix
    net = pix2pix_config(cfg)
    size = volume_size(cfg, net)
    tcfg = train_config(settings.train, cfg.seed)
    cases = store.case_ids("train")
    if not cases:
        raise InputError(f"{store.root}: no training cases to train 3D Pix2Pix on")
    images, labels = training_volumes(store, cases, size)
    log.info("3D Pix2Pix: %d training volumes resampled to %s", len(cases), "x".join(map(str, size)))
    with seeded(cfg.seed):
        model = Pix2Pix3D(net)

    def batch_source(step: int, g: torch.Generator, items: range) -> dict:
        pick = torch.randint(len(cases), (len(items),), generator=g)
        return {"label": labels[pick], "image": images[pick].float()}

    fingerprint = stage_fingerprint(cfg, "train_pix2pix", {"slices": store_digest(store.index)})
    result = loop.train(model, make_loss(settings.l1_weight, cfg.max_label), batch_source, tcfg, checkpoint,
                        kind=KIND, model_args=model_args(model), fingerprint=fingerprint, model_path=out,
                        extra={"role": "pix2pix", "volume_size": list(size), "max_label": cfg.max_label,
                               "l1_weight": float(settings.l1_weight), "gan_loss": "vanilla"})
    loop.export_result(result, checkpoint, out)


class Pix2PixSampler:
    """The trained 3D Pix2Pix generator, turning `VolumeJob`s into (d, s, s) images (module docstring)."""

    def __init__(self, cfg: Config, device: torch.device | None = None):
        self.device = device or compute_device()
        path = Paths(cfg).model("pix2pix")
        payload = load_checkpoint(path, expect_kind=KIND)
        check_model_config(payload, cfg, "pix2pix", path)
        model = build_model(KIND, payload["model_args"])
        self.max_label = model.config.in_channels - 2
        if self.max_label != cfg.max_label:
            raise InputError(f"{path}: trained for labels -1..{self.max_label}, the config has -1..{cfg.max_label} "
                             f"(retrain it: gem3d train-pix2pix)")
        model.load_state_dict(inference_state_dict(payload, use_ema=True))
        self.generator = model.generator.to(self.device).eval()
        for module in self.generator.modules():  # pix2pix's test-time noise: its dropout stays on
            if isinstance(module, torch.nn.Dropout):
                module.train()
        self.volume_size = tuple(payload["extra"]["volume_size"])
        self.checkpoints = {"pix2pix": sha256_of(path)}
        self.solver = None  # no diffusion solver

    @torch.no_grad()
    def generate(self, jobs: list[VolumeJob], pin: bool = True) -> list[np.ndarray]:
        """(d, s, s) float32 images in [-1, 1], one per job; -1 outside the non-zero region. The generator's dropout
        draws from the job's seed (torch's global generator, forked per volume); `pin` changes nothing."""
        results: list[np.ndarray] = []
        t_start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        for job in jobs:
            bad = [int(v) for v in np.unique(job.label) if v < OUTSIDE or v > self.max_label]
            if bad:
                raise InputError(f"{job.source_case}: mask labels {bad} outside the trained set -1..{self.max_label}")
            tic = time.perf_counter()
            label = resample(torch.from_numpy(np.ascontiguousarray(job.label)), self.volume_size, is_label=True)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(job.seed)
                fake = self.generator(mask_channels(label[None].to(self.device), self.max_label))[0, 0].float().cpu()
            image = resample(fake, tuple(job.label.shape), is_label=False).clamp(-1, 1).numpy()
            results.append(np.where(job.label == OUTSIDE, -1.0, image).astype(np.float32))
            now = time.perf_counter()
            per_volume = (now - t_start) / len(results)
            log.info("generated %d/%d volumes (pix2pix, %.2f s for this volume, eta %s)", len(results), len(jobs),
                     now - tic, format_duration(per_volume * (len(jobs) - len(results))))
        return results


# ---- the registry's interface (gem3d/methods/registry.py) ------------------------------------------------------


def check(cfg: Config, name: str) -> None:
    """pix2pix.model builds, pix2pix.volume_size fits it, pix2pix.train is a training section (without gradient
    checkpointing, which the 3D Pix2Pix networks do not have: the flag would be ignored)."""
    try:
        tcfg = train_config(cfg.pix2pix.train)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{cfg.source}: config key pix2pix.train: {exc}") from None
    if tcfg.grad_checkpointing:
        raise InputError(f"{cfg.source}: config key pix2pix.train.grad_checkpointing: 3D Pix2Pix has no gradient "
                         "checkpointing (its memory is set by pix2pix.volume_size and batch_size); set it false")
    volume_size(cfg, pix2pix_config(cfg))


def train(cfg: Config, name: str, model: str) -> None:
    paths = Paths(cfg)
    train_pix2pix(cfg, SliceStore(paths.slices), paths.train_state(model), paths.model(model))


def sampler(cfg: Config, name: str, spec) -> Pix2PixSampler:
    return Pix2PixSampler(cfg)


def budget(cfg: Config, name: str) -> Budget:
    """The generator's parameters (the discriminator's beside them), steps x volumes, the resampled volume size."""
    net = pix2pix_config(cfg)
    shape = volume_size(cfg, net)
    size = "x".join(map(str, shape))
    t = cfg.pix2pix.train
    disc = meta_parameters(lambda: Pix2Pix3D(net).discriminator)
    dropout = (f"dropout {net.dropout:g} on decoder blocks {list(net.dropout_levels())}" if net.dropout_levels()
               else "no dropout")
    return Budget(meta_parameters(lambda: Pix2Pix3D(net).generator), ((t["steps"], t["batch_size"]),), "whole volumes",
                  f"{size} voxels (slices x rows x cols), the mask one-hot", f"every slice-store volume resampled to "
                  f"{size} (area average where an axis shrinks, trilinear), the output back to its volume",
                  f"discriminator {disc / 1e6:.2f} M parameters (training only); {dropout}; lr decay over the last "
                  f"{train_config(t).lr_decay:.0%} of the steps", slices_per_item=shape[0])
