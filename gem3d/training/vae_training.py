"""Train the KL autoencoder on training-split slices (grey images and masks-as-images), or import one.

The authors used latent diffusion's frozen KL-f8 autoencoder (trained on natural images with L1,
LPIPS and a patch discriminator). gem3d either imports such a file (`vae.pretrained`, see
gem3d.models.vae_import) or trains its own on the data with latent diffusion's terms:

- always L1 + a small KL term, weighted as in latent diffusion's autoencoder (there the L1 is summed
  over pixels beside kl_weight x KL; we divide both by the pixel count, so kl_weight = 1e-6 means the
  same at every slice size);
- `vae.perceptual_weight` > 0: + weight x VGG-LPIPS (VGG-16 weights from `vae.perceptual_vgg_weights`,
  torchmetrics' linear heads), as latent diffusion trains it: never the evaluation's own LPIPS network
  (AlexNet by default, Table 2), so the VAE is not trained on the metric that scores it;
- `vae.adversarial.weight` > 0: a patch discriminator (hinge loss) trained from step
  `vae.adversarial.start` on, and the generator term -mean(D(recon)) weighted adaptively: the norm of
  the reconstruction loss's (L1 + LPIPS) gradient at the decoder's last layer over the norm of the
  generator term's gradient there, clamped to [0, max_adaptive_weight / pixels per slice], times the weight
  (latent diffusion clamps at 1e4 a ratio computed on its loss summed over pixels; our loss is the pixel
  mean, whose ratio is smaller by the pixel count, so the same clamp in our units is 1e4 / (c h w): 4.3 at
  48 x 48, 0.038 at 512 x 512). The loop
  trains `AdversarialVAE` (autoencoder + discriminator) in its own state file; the model file holds
  the autoencoder alone (kind "vae"), so every reader is the same for all three ways.
Defaults: L1 + KL only (both extra terms off, no pretrained file).

Then the latent scale factor (1 / std of the posterior means of training image slices) is measured
and stored in the model file, and the reconstruction PSNR/SSIM and sharpness on test slices are
logged and written next to it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gem3d.config import Config
from gem3d.data.slice_store import SliceStore, mask_to_grey
from gem3d.fingerprint import stage_fingerprint, store_digest
from gem3d.io import InputError, read_json, write_json
from gem3d.models import AdversarialVAE, AdversarialVAEConfig, AutoencoderKL, build_model, model_args
from gem3d.models.discriminator import DiscriminatorConfig
from gem3d.models.specs import train_config, vae_config
from gem3d.training.checkpoint import (exported_marker, inference_state_dict, load_checkpoint, save_checkpoint,
                                       seeded, sha256_of)
from gem3d.training.distributed import distributed_env, unwrap_model
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


def global_batch_items(seed: int, step: int, global_batch: int, mask_fraction: float,
                       n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, is_mask) of the `global_batch` items of optimizer step `step`: a slice (row of
    SliceSampler.index) per item and whether it goes in as its mask or its image. Drawn from (seed, step)
    alone, so every split of the global batch over processes and micro-batches draws the same items. The
    masks are floor(global_batch x mask_fraction) items at random positions, plus one more with
    probability equal to the fractional part: exactly that share of every step when it is whole (8 x 0.5:
    4), that share on average otherwise, never none by rounding."""
    rng = np.random.default_rng([seed, step])
    rows = rng.integers(n_rows, size=global_batch)
    share = round(global_batch * mask_fraction, 9)
    n_masks = int(np.floor(share)) + int(rng.random() < share - np.floor(share))
    is_mask = np.zeros(global_batch, dtype=bool)
    is_mask[rng.permutation(global_batch)[:n_masks]] = True
    return rows, is_mask


def vae_batch_source(sampler: SliceSampler, seed: int, global_batch: int, mask_fraction: float):
    """The training loop's batch_source: the micro-batch of global items `items` of the step's global
    batch (`global_batch_items`), masks as grey images and images in item order."""

    def batch_source(step: int, g: torch.Generator, items: range) -> dict:
        rows, is_mask = global_batch_items(seed, step, global_batch, mask_fraction, len(sampler))
        rows, is_mask = rows[items.start: items.stop], is_mask[items.start: items.stop]
        size = sampler.store.slice_size
        x = torch.empty((len(rows), 1, size, size), dtype=torch.float32)
        for chosen, read in ((is_mask, sampler.masks), (~is_mask, sampler.images)):
            if chosen.any():  # index_copy_: a boolean or indexed assignment is 500x slower here
                x.index_copy_(0, torch.from_numpy(np.flatnonzero(chosen)), read(rows[chosen]))
        return {"x": x, "step": step}

    return batch_source


def vae_loss(recon: torch.Tensor, x: torch.Tensor, posterior, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """Latent diffusion's autoencoder objective (L1 summed over a sample's pixels + kl_weight x KL,
    averaged over the batch), divided by the pixels per sample: L1 mean + kl_weight x KL / pixels."""
    l1 = F.l1_loss(recon.float(), x)  # mean over pixels
    kl = posterior.kl().float().mean()  # summed over latent elements, mean over the batch
    return l1 + kl_weight * kl / x[0].numel(), {"l1": l1.detach(), "kl": kl.detach()}


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float) -> torch.Tensor:
    """|d nll / d last_layer| / (|d g_loss / d last_layer| + 1e-4), clamped to [0, max_weight], detached."""
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def max_adaptive_weight(adv, x: torch.Tensor) -> float:
    """vae.adversarial.max_adaptive_weight (latent diffusion's units: a loss summed over a slice's pixels) in the
    units of our pixel-mean loss: divided by the pixels per slice, c x h x w of `x` (module docstring)."""
    return adv.max_adaptive_weight / x[0].numel()


def make_loss(cfg: Config, lpips=None):
    """loss_fn(net, {"x", "step"}, generator) of the configured terms (module docstring)."""
    settings, adv = cfg.vae, cfg.vae.adversarial

    def loss_fn(net, batch: dict, g: torch.Generator):
        x, step = batch["x"], int(batch["step"])
        if adv.weight > 0:
            recon, posterior, g_logits, d_loss = net(x)
        else:
            recon, posterior = net(x, sample=True, generator=None)
        loss, metrics = vae_loss(recon, x, posterior, settings.kl_weight)
        nll = None
        if settings.perceptual_weight > 0:
            if next(lpips.parameters()).device != x.device:
                lpips.to(x.device)
            p_loss = lpips(recon.float(), x).mean()
            loss = loss + settings.perceptual_weight * p_loss
            metrics["lpips"] = p_loss.detach()
            nll = F.l1_loss(recon.float(), x) + settings.perceptual_weight * p_loss
        if adv.weight > 0:
            g_loss = -g_logits.float().mean()
            metrics.update(g_loss=g_loss.detach(), d_loss=d_loss.detach())
            if step >= adv.start:
                nll = F.l1_loss(recon.float(), x) if nll is None else nll
                w = adaptive_weight(nll, g_loss, unwrap_model(net).last_layer(), max_adaptive_weight(adv, x))
                loss = loss + adv.weight * w * g_loss + d_loss
                metrics["adaptive_weight"] = w
            else:  # zero-weighted: every parameter is in the graph each step (DDP), the loss is L1 + KL (+ LPIPS)
                loss = loss + 0.0 * g_loss + 0.0 * d_loss
        return loss, metrics

    return loss_fn


def check_store_matches(store: SliceStore, cfg: Config) -> None:
    """The slice store must be the one this config describes (size and labels)."""
    if store.slice_size != cfg.preprocess.slice_size:
        raise InputError(f"{store.root}: slice store has {store.slice_size}x{store.slice_size} slices but the config "
                         f"asks for {cfg.preprocess.slice_size} (rebuild it: gem3d slices)")
    if store.index["labels"] != cfg.data.labels:
        raise InputError(f"{store.root}: slice store labels {store.index['labels']} differ from data.labels "
                         f"{cfg.data.labels}")


PERCEPTUAL_NET = "vgg"  # the LPIPS network of the training term (latent diffusion's); Table 2 reports AlexNet's


def _lpips(cfg: Config):
    """(VGG-LPIPS model, fingerprint input) when vae.perceptual_weight > 0, else (None, None)."""
    if cfg.vae.perceptual_weight <= 0:
        return None, None
    from gem3d.evaluation.paired import default_lpips_lin_path, load_lpips

    path = cfg.vae.perceptual_vgg_weights
    if path is None or not Path(path).is_file():
        raise InputError(f"{cfg.source}: config key vae.perceptual_weight: {cfg.vae.perceptual_weight} needs VGG-16 "
                         f"weights for its VGG-LPIPS: vae.perceptual_vgg_weights is {path or 'unset'}")
    lin = default_lpips_lin_path(PERCEPTUAL_NET)
    return load_lpips(PERCEPTUAL_NET, path, lin), f"{PERCEPTUAL_NET}:{sha256_of(path)}:{sha256_of(lin)}"


def _check_adversarial(cfg: Config, tcfg, slice_size: int) -> None:
    adv = cfg.vae.adversarial
    if adv.weight <= 0:
        return
    if adv.start >= tcfg.steps:
        raise InputError(f"{cfg.source}: config key vae.adversarial.start: {adv.start} is not below vae.train.steps "
                         f"{tcfg.steps}, so the adversarial term would never switch on")
    least = DiscriminatorConfig(layers=adv.layers).min_input_size()
    if slice_size < least:
        raise InputError(f"{cfg.source}: config key vae.adversarial.layers: {adv.layers} layers need slices of at "
                         f"least {least} pixels, the slice store has {slice_size}")


def train_vae(cfg: Config, store: SliceStore, checkpoint: Path, out: Path, metrics_out: Path) -> dict:
    """Train (or resume) or import, measure the scale factor, evaluate, write `out` (the model) and metrics."""
    check_store_matches(store, cfg)
    settings = cfg.vae
    vcfg = vae_config(cfg)
    if store.slice_size % vcfg.downsampling_factor:
        raise InputError(f"{cfg.source}: slice_size {store.slice_size} not divisible by the VAE's downsampling "
                         f"factor {vcfg.downsampling_factor}")
    sampler = SliceSampler(store, store.case_ids("train"))
    inputs = {"slices": store_digest(store.index)}
    if settings.pretrained is not None:
        return _import_pretrained(cfg, vcfg, sampler, store, inputs, checkpoint, out, metrics_out)
    tcfg = train_config(settings.train, cfg.seed)
    _check_adversarial(cfg, tcfg, store.slice_size)
    lpips, lpips_input = _lpips(cfg)
    if lpips_input is not None:
        inputs["lpips"] = lpips_input
    adv = settings.adversarial
    with seeded(cfg.seed):
        if adv.weight > 0:  # the autoencoder is built first: its initialisation is the plain VAE's
            model = AdversarialVAE(AdversarialVAEConfig(vae=asdict(vcfg), discriminator=dict(
                layers=adv.layers, base_channels=adv.base_channels)))
        else:
            model = AutoencoderKL(vcfg)
    kind = "vae_adversarial" if adv.weight > 0 else "vae"
    state = checkpoint if kind == "vae" else adversarial_state(checkpoint)
    batch_source = vae_batch_source(sampler, cfg.seed, tcfg.batch_size, settings.mask_fraction)
    fingerprint = stage_fingerprint(cfg, "train_vae", inputs)
    result = train(model, make_loss(cfg, lpips), batch_source, tcfg, state, kind=kind, model_args=model_args(model),
                   fingerprint=fingerprint, model_path=out)
    if not distributed_env().is_main:  # under torchrun, rank 0 alone measures and writes the model
        return {}
    if result.already_done and metrics_out.exists():
        log.info("%s is up to date (trained on the same settings and data); nothing to do", out)
        return read_json(metrics_out)
    payload = vae_payload(load_checkpoint(state, expect_kind=kind))
    net = build_model("vae", payload["model_args"])
    net.load_state_dict(inference_state_dict(payload, use_ema=True))
    terms = {"l1": 1.0, "kl_weight": settings.kl_weight, "perceptual_weight": settings.perceptual_weight,
             "adversarial_weight": adv.weight, "adversarial_start": adv.start if adv.weight > 0 else None}
    metrics = _measure(net, sampler, store, cfg, {"source": "trained", "terms": terms, "steps": result.final_step,
                                                  "last_loss": result.last_loss, "steps_per_s": result.steps_per_s})
    write_json(metrics_out, metrics)
    save_checkpoint(out, {**payload, "extra": {**(payload.get("extra") or {}), **_model_extra(metrics, store)}})
    _exported_from(state, checkpoint, out)
    return metrics


def adversarial_state(checkpoint: Path) -> Path:
    """Where the VAE trained with its discriminator keeps its training state (beside the plain one)."""
    return checkpoint.with_name(f"{checkpoint.stem}_adversarial{checkpoint.suffix}")


def _exported_from(source: Path | None, checkpoint: Path, out: Path) -> None:
    """Mark the state `out` was exported from (None: an imported file); the other state no longer made it, so a
    later run with its settings exports it again instead of calling the model file up to date."""
    for state in (checkpoint, adversarial_state(checkpoint)):
        if state != source:
            exported_marker(state).unlink(missing_ok=True)
    if source is not None:
        exported_marker(source).write_text(f"{out}\n")


def vae_payload(payload: dict) -> dict:
    """The plain autoencoder's checkpoint (kind "vae") of a training state: an AdversarialVAE's state
    loses its discriminator (weights, EMA) and its optimizer and RNG state (they resume the pair)."""
    if payload["kind"] == "vae":
        return payload
    strip = lambda sd: None if sd is None else {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}  # noqa: E731
    plain = {k: v for k, v in payload.items() if k not in ("optimizer", "rng", "checksum")}
    return {**plain, "kind": "vae", "model_args": payload["model_args"]["vae"],
            "state_dict": strip(payload["state_dict"]), "ema_state_dict": strip(payload.get("ema_state_dict"))}


def _import_pretrained(cfg: Config, vcfg, sampler: SliceSampler, store: SliceStore, inputs: dict, checkpoint: Path,
                       out: Path, metrics_out: Path) -> dict:
    """vae.pretrained: import the file (gem3d/training/imported.py), take or measure the scale factor on the
    training slices, write the model file."""
    from gem3d.training.imported import pretrained_vae

    path = Path(cfg.vae.pretrained)
    if not path.exists():
        raise InputError(f"{cfg.source}: config key vae.pretrained: file not found at {path}")
    if not distributed_env().is_main:
        return {}
    net, scale, source = pretrained_vae(cfg)
    inputs["pretrained"] = source["sha256"]
    log.info("imported %s (%s layout)", source["file"], source["layout"])
    metrics = _measure(net, sampler, store, cfg, {"source": f"pretrained {source['file']} ({source['layout']} layout)"},
                       scale)
    write_json(metrics_out, metrics)
    save_checkpoint(out, {
        "kind": "vae", "model_args": model_args(net), "step": 0, "ema_state_dict": None, "train_config": None,
        "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
        "extra": {**_model_extra(metrics, store), "pretrained": source["file"], "pretrained_sha256": source["sha256"],
                  "pretrained_layout": source["layout"]},
        "fingerprint": stage_fingerprint(cfg, "train_vae", inputs), "history": {"losses": [], "last_loss": None}})
    _exported_from(None, checkpoint, out)
    return metrics


def _measure(net: AutoencoderKL, sampler: SliceSampler, store: SliceStore, cfg: Config, record: dict,
             scale: float | None = None) -> dict:
    """Test reconstruction metrics and the scale factor: `scale` when given (else `vae.scale_factor`), else
    measured on the training slices (both recorded)."""
    net.to(distributed_env().device).eval()  # thousands of slices: on the GPU when there is one
    measured = measure_scale_factor(net, sampler, cfg.vae.scale_slices, cfg.seed)
    scale = scale if scale is not None else cfg.vae.scale_factor if cfg.vae.scale_factor is not None else measured
    metrics = evaluate_reconstruction(net, SliceSampler(store, store.case_ids("test")), cfg.vae.eval_slices, cfg.seed)
    metrics.update({"scale_factor": scale, "measured_scale_factor": measured, **record})
    log.info("VAE: scale factor %.4f; test reconstruction PSNR %.2f dB, SSIM %.4f, high-frequency energy %.3f of "
             "the real slices, on %d slices", scale, metrics["psnr"], metrics["ssim"], metrics["hf_energy_ratio"],
             metrics["n_slices"])
    return metrics


def _model_extra(metrics: dict, store: SliceStore) -> dict:
    return {"scale_factor": metrics["scale_factor"], "test_psnr": metrics["psnr"], "test_ssim": metrics["ssim"],
            "test_hf_energy_ratio": metrics["hf_energy_ratio"], "slice_size": store.slice_size,
            "max_label": store.max_label}


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


def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    """Energy of the spatial frequencies above half the Nyquist frequency (|f| > 1/4 cycle per pixel),
    summed over `b c h w` slices: what blurring removes first."""
    spectrum = torch.fft.fft2(x.float()).abs().pow(2)  # (b, c, h, w)
    fy = torch.fft.fftfreq(x.shape[-2], device=x.device)[:, None]
    fx = torch.fft.fftfreq(x.shape[-1], device=x.device)[None, :]
    return spectrum[..., (fy ** 2 + fx ** 2).sqrt() > 0.25].sum()


@torch.no_grad()
def evaluate_reconstruction(vae: AutoencoderKL, sampler: SliceSampler, n: int, seed: int, batch: int = 64) -> dict:
    """PSNR and SSIM (data range 2 for [-1, 1]) of posterior-mean reconstructions of test image slices,
    and their sharpness: high-frequency energy of the reconstructions over that of the real slices
    (1: as sharp as the real ones; below 1: blurrier)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    rows = _rows(len(sampler), n, seed)
    device = next(vae.parameters()).device
    se, count, ssims, hf_recon, hf_real = 0.0, 0, [], 0.0, 0.0
    for i in range(0, len(rows), batch):
        x = sampler.images(rows[i: i + batch]).to(device)
        recon = vae.decode(vae.encode(x).mean).clamp(-1, 1)
        se += float(((recon - x) ** 2).sum())
        count += x.numel()
        ssims.append(ssim(recon, x, data_range=2.0, reduction="none"))
        hf_recon += float(high_frequency_energy(recon))
        hf_real += float(high_frequency_energy(x))
    mse = se / count
    return {"psnr": float(10 * np.log10(4.0 / max(mse, 1e-12))), "ssim": float(torch.cat(ssims).mean()),
            "hf_energy_ratio": hf_recon / max(hf_real, 1e-12), "n_slices": int(len(rows))}
