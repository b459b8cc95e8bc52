"""Train the KL autoencoder on training-split slices (grey images and masks-as-images).

The authors used a frozen natural-image VAE; it cannot be downloaded here, so ours is trained on
the data (L1 reconstruction + a small KL term, weighted as in latent diffusion's autoencoder: there
the L1 is summed over pixels beside kl_weight x KL; we divide both by the pixel count, so
kl_weight = 1e-6 means the same at every slice size). After training, the latent scale factor
(1 / std of the posterior means of training image slices) is measured and stored in the model
file, and the reconstruction PSNR/SSIM on test slices is logged and written next to it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gem3d.config import Config
from gem3d.data.slice_store import SliceStore, mask_to_grey
from gem3d.io import InputError, write_json
from gem3d.models import AutoencoderKL, build_model, model_args
from gem3d.models.specs import train_config, vae_config
from gem3d.fingerprint import stage_fingerprint, store_digest
from gem3d.io import read_json
from gem3d.training.checkpoint import export_model, inference_state_dict, load_checkpoint, seeded
from gem3d.training.distributed import distributed_env
from gem3d.training.loop import train

log = logging.getLogger("gem3d.vae")


class SliceSampler:
    """Random (case, slice) draws from memory-mapped slice-store cases."""

    def __init__(self, store: SliceStore, case_ids: list[str]):
        if not case_ids:
            raise InputError(f"{store.root}: no cases to draw slices from")
        self.store = store
        self.cases = [store.load(c, mmap=True) for c in case_ids]
        self.index = np.array([(i, z) for i, c in enumerate(self.cases) for z in range(c.image.shape[0])])

    def __len__(self) -> int:
        return len(self.index)

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """(b, 1, s, s) float32 grey slices for the given rows of `index`."""
        return torch.from_numpy(np.stack([self.cases[i].image[z] for i, z in self.index[rows]]).astype(np.float32))[:, None]

    def masks(self, rows: np.ndarray) -> torch.Tensor:
        """(b, 1, s, s) masks as grey images (same VAE input range as images)."""
        labels = np.stack([self.cases[i].label[z] for i, z in self.index[rows]]).astype(np.float32)
        return mask_to_grey(torch.from_numpy(labels), self.store.max_label)[:, None]


def vae_loss(recon: torch.Tensor, x: torch.Tensor, posterior, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """Latent diffusion's autoencoder objective (L1 summed over a sample's pixels + kl_weight x KL,
    averaged over the batch), divided by the pixels per sample: L1 mean + kl_weight x KL / pixels."""
    l1 = F.l1_loss(recon.float(), x)  # mean over pixels
    kl = posterior.kl().float().mean()  # summed over latent elements, mean over the batch
    return l1 + kl_weight * kl / x[0].numel(), {"l1": l1.detach(), "kl": kl.detach()}


def check_store_matches(store: SliceStore, cfg: Config) -> None:
    """The slice store must be the one this config describes (size and labels)."""
    if store.slice_size != cfg.preprocess.slice_size:
        raise InputError(f"{store.root}: slice store has {store.slice_size}x{store.slice_size} slices but the config "
                         f"asks for {cfg.preprocess.slice_size} (rebuild it: gem3d slices)")
    if store.index["labels"] != cfg.data.labels:
        raise InputError(f"{store.root}: slice store labels {store.index['labels']} differ from data.labels "
                         f"{cfg.data.labels}")


def train_vae(cfg: Config, store: SliceStore, checkpoint: Path, out: Path, metrics_out: Path) -> dict:
    """Train (or resume), measure the scale factor, evaluate, write `out` (the model) and metrics."""
    check_store_matches(store, cfg)
    settings = cfg.vae
    tcfg = train_config(settings.train, cfg.seed)
    vcfg = vae_config(cfg)
    if store.slice_size % vcfg.downsampling_factor:
        raise InputError(f"{cfg.source}: slice_size {store.slice_size} not divisible by the VAE's downsampling "
                         f"factor {vcfg.downsampling_factor}")
    with seeded(cfg.seed):
        model = AutoencoderKL(vcfg)
    sampler = SliceSampler(store, store.case_ids("train"))
    n_masks = int(round(tcfg.batch_size * settings.mask_fraction))

    def batch_source(step: int, g: torch.Generator) -> torch.Tensor:
        rows = torch.randint(len(sampler), (tcfg.batch_size,), generator=g).numpy()
        return torch.cat([sampler.masks(rows[:n_masks]), sampler.images(rows[n_masks:])])

    def loss_fn(net, x: torch.Tensor, g: torch.Generator):
        recon, posterior = net(x, sample=True, generator=None)
        return vae_loss(recon, x, posterior, settings.kl_weight)

    fingerprint = stage_fingerprint(cfg, "train_vae", {"slices": store_digest(store.index)})
    result = train(model, loss_fn, batch_source, tcfg, checkpoint, kind="vae", model_args=model_args(model),
                   fingerprint=fingerprint, model_path=out)
    if not distributed_env().is_main:  # under torchrun, rank 0 alone measures and writes the model
        return {}
    if result.already_done and metrics_out.exists():
        log.info("%s is up to date (trained on the same settings and data); nothing to do", out)
        return read_json(metrics_out)
    payload = load_checkpoint(checkpoint, expect_kind="vae")
    net = build_model("vae", payload["model_args"])
    net.load_state_dict(inference_state_dict(payload, use_ema=True))
    net.to(distributed_env().device).eval()  # thousands of slices: on the GPU when there is one
    scale = measure_scale_factor(net, sampler, settings.scale_slices, cfg.seed)
    metrics = evaluate_reconstruction(net, SliceSampler(store, store.case_ids("test")), settings.eval_slices, cfg.seed)
    metrics.update({"scale_factor": scale, "steps": result.final_step, "last_loss": result.last_loss,
                    "steps_per_s": result.steps_per_s})
    log.info("VAE: scale factor %.4f; test reconstruction PSNR %.2f dB, SSIM %.4f on %d slices",
             scale, metrics["psnr"], metrics["ssim"], metrics["n_slices"])
    write_json(metrics_out, metrics)
    export_model(checkpoint, out, {"scale_factor": scale, "test_psnr": metrics["psnr"], "test_ssim": metrics["ssim"],
                                   "slice_size": store.slice_size, "max_label": store.max_label})
    return metrics


def _rows(n_total: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


@torch.no_grad()
def measure_scale_factor(vae: AutoencoderKL, sampler: SliceSampler, n: int, seed: int, batch: int = 64) -> float:
    """1 / std of the posterior means of `n` training image slices (latents then have unit variance)."""
    rows = _rows(len(sampler), n, seed)
    device = next(vae.parameters()).device
    means = [vae.encode(sampler.images(rows[i: i + batch]).to(device)).mean for i in range(0, len(rows), batch)]
    std = float(torch.cat(means).float().std())
    if not np.isfinite(std) or std <= 0:
        raise InputError(f"VAE latents have std {std}: cannot measure a scale factor")
    return 1.0 / std


@torch.no_grad()
def evaluate_reconstruction(vae: AutoencoderKL, sampler: SliceSampler, n: int, seed: int, batch: int = 64) -> dict:
    """PSNR and SSIM (data range 2 for [-1, 1]) of posterior-mean reconstructions of test image slices."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    rows = _rows(len(sampler), n, seed)
    device = next(vae.parameters()).device
    se, count, ssims = 0.0, 0, []
    for i in range(0, len(rows), batch):
        x = sampler.images(rows[i: i + batch]).to(device)
        recon = vae.decode(vae.encode(x).mean).clamp(-1, 1)
        se += float(((recon - x) ** 2).sum())
        count += x.numel()
        ssims.append(ssim(recon, x, data_range=2.0, reduction="none"))
    mse = se / count
    return {"psnr": float(10 * np.log10(4.0 / max(mse, 1e-12))), "ssim": float(torch.cat(ssims).mean()),
            "n_slices": int(len(rows))}
