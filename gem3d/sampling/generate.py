"""Generate volumes: mask latents + informed slice -> bi-directional propagation -> decoded slices.

`VolumeSampler` holds the trained networks of one run (VAE, volume model of a variant and stage,
slice model when IG is used) and turns `VolumeJob`s into (d, s, s) images in the slice store's
space. Several volumes go through the network together (their windows share one batch).
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gem3d.config import Config
from gem3d.device import compute_device
from gem3d.data.latents import LatentStore, LoadedVAE, load_vae
from gem3d.diffusion import NoiseSchedule, Solver, build_solver
from gem3d.io import InputError
from gem3d.models import UNet, build_model
from gem3d.methods import registry
from gem3d.models.specs import variant_injection
from gem3d.paths import Paths
from gem3d.sampling.informed import InformedSpec, generate_slices, latent_of
from gem3d.sampling.propagate import propagate_volumes
from gem3d.sampling.sets import model_name
from gem3d.training.checkpoint import inference_state_dict, load_checkpoint, sha256_of

log = logging.getLogger("gem3d.sampling")


def seeded_batches(jobs: list, per_batch: int):
    """The jobs in batches of `per_batch`, each with one torch.Generator per volume seeded with its job's seed only
    (a volume's noise does not depend on the batch it falls in)."""
    for lo in range(0, len(jobs), per_batch):
        batch = jobs[lo: lo + per_batch]
        yield batch, [torch.Generator().manual_seed(j.seed) for j in batch]


@dataclass
class VolumeJob:
    sample_id: str
    source_case: str  # whose mask (and geometry) this volume uses
    label: np.ndarray  # (d, s, s) int8 mask in slice space (-1 outside the non-zero region)
    start: int  # first window position p
    informed: InformedSpec
    seed: int
    copy: int = 0
    augmentation: dict | None = None
    label_native: np.ndarray | None = None  # augmented mask at nnU-Net resolution (None: the case's own)
    extra: dict = field(default_factory=dict)


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def stable_seed(*parts) -> int:
    """A seed that depends only on its parts (not on sharding or batching order). Each volume's noise
    comes from a generator seeded with its own job seed only (``VolumeSampler.generate``)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def load_unet(path: Path, device, cfg: Config | None = None, role: str = "volume") -> tuple[UNet, dict]:
    """A trained UNet (EMA weights) and its extras; with `cfg`, refuse one trained with another network config."""
    from gem3d.fingerprint import check_model_config

    payload = load_checkpoint(path, expect_kind="unet")
    if cfg is not None:
        check_model_config(payload, cfg, role, path)
    net = build_model("unet", payload["model_args"])
    net.load_state_dict(inference_state_dict(payload, use_ema=True))
    return net.to(device).eval(), payload.get("extra") or {}


def build_sampler(cfg: Config, extra: dict) -> Solver:
    """The config's solver (sampling.solver, steps, eta) on the noise schedule a network was trained with."""
    schedule = NoiseSchedule.from_config(extra["schedule"]) if "schedule" in extra else NoiseSchedule()
    return build_solver(cfg.sampling.solver, schedule, cfg.sampling.steps, cfg.sampling.eta, cfg.sampling.ddim_spacing)


class VolumeSampler:
    """Trained networks of one volume-model variant (gem3d, baseline, or the injection variants controlnet and
    crossattn) and stage (2, or 1 for the ablation)."""

    def __init__(self, cfg: Config, variant: str = "gem3d", stage: int = 2, need_slice_model: bool = False,
                 device: torch.device | None = None):
        self.cfg, self.variant, self.stage = cfg, variant, stage
        self.device = device or compute_device()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # few distinct window batch shapes per set
        paths = Paths(cfg)
        self.vae: LoadedVAE = load_vae(paths.model("vae"), self.device, cfg)
        name = model_name(variant, stage)
        self.net, extra = load_unet(paths.model(name), self.device, cfg, "volume")
        self.window = int(extra.get("window", cfg.volume_model.window))
        informed = registry.get(variant).informed
        self.informed = bool(extra.get("informed", informed))
        injection = variant_injection(cfg, variant)
        if (self.informed != informed or self.net.config.slice_axis != (stage == 2)
                or getattr(self.net.config, "injection", "concat") != injection):
            raise InputError(f"{paths.model(name)}: checkpoint is a {extra.get('role', 'different')} model, not the "
                             f"{name} this set needs (files swapped?)")
        self.solver = build_sampler(cfg, extra)
        # provenance of every volume: the model files' digests, and those of the files given networks came from
        self.checkpoints = {"vae": self.vae.sha, name: sha256_of(paths.model(name))}
        self.encoder = None  # the cross-attention variant's frozen encoder (volume_model.crossattn_encoder)
        if injection == "crossattn_frozen":
            from gem3d.models.frozen_encoder import FrozenSliceEncoder

            self.encoder = FrozenSliceEncoder(cfg.volume_model.crossattn_encoder, self.vae, self.device)
            trained_with = (extra.get("crossattn_encoder") or {}).get("sha256")
            if trained_with != self.encoder.sha:
                raise InputError(f"{paths.model(name)}: trained with another frozen encoder (sha256 "
                                 f"{str(trained_with)[:12]}) than volume_model.crossattn_encoder.weights "
                                 f"({self.encoder.sha[:12]})")
            self.checkpoints["crossattn_encoder"] = self.encoder.sha
        sources = {"vae": self.vae.source_sha, name: (extra.get("pretrained") or {}).get("sha256")}
        trained_on = {paths.model(name): extra.get("latents_vae_sha256")}
        self.slice_net = None
        if need_slice_model:
            self.slice_net, slice_extra = load_unet(paths.model("slice_model"), self.device, cfg, "slice_model")
            self.slice_solver = build_sampler(cfg, slice_extra)  # the slice model's own noise schedule
            self.position_dim = int(slice_extra.get("position_dim", cfg.slice_model.position_dim))
            self.checkpoints["slice_model"] = sha256_of(paths.model("slice_model"))
            sources["slice_model"] = (slice_extra.get("pretrained") or {}).get("sha256")
            trained_on[paths.model("slice_model")] = slice_extra.get("latents_vae_sha256")
        self.checkpoints.update({f"{k}.pretrained": v for k, v in sources.items() if v})
        # The latent cache (the dataset's informed slices: IC, true, fixed); a bundle (gem3d/bundle.py) has none
        # and generates with IG or a user's informed image.
        self.latents = LatentStore(paths.latents) if (paths.latents / "index.json").is_file() else None
        self.latent_channels = int(self.vae.model.config.latent_channels)
        self.latent_size = self.slice_size(paths) // self.vae.model.config.downsampling_factor
        if self.vae.max_label != self.latents_max_label(paths):
            raise InputError(f"{paths.model('vae')}: VAE was trained for another label set")
        if self.latents is not None:  # informed latents from the cache, mask latents from this VAE: one VAE's
            trained_on[paths.latents / "index.json"] = self.latents.index.get("vae_sha256")
        for path, sha in trained_on.items():
            if sha is not None and sha != self.vae.sha:
                raise InputError(f"{path}: made with another VAE than {paths.model('vae')} "
                                 f"(sha256 {sha[:12]} != {self.vae.sha[:12]}); rerun the stages after the VAE")

    @staticmethod
    def latents_max_label(paths: Paths) -> int:
        from gem3d.io import read_json

        return int(read_json(paths.slices / "index.json")["max_label"])

    @staticmethod
    def slice_size(paths: Paths) -> int:
        from gem3d.io import read_json

        return int(read_json(paths.slices / "index.json")["slice_size"])

    def autocast(self):
        """The diffusion networks' forward passes: bf16 autocast on the sampling device (CPU or GPU)
        when sampling.precision is bf16; fp32 otherwise. The VAE decodes in fp32."""
        if self.cfg.sampling.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  context: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            return self.net(torch.cat([x, cond], dim=1), t, context=context).float()  # b c f h w

    def check_job(self, job: VolumeJob) -> None:
        d = job.label.shape[0]
        if not 0 <= job.start < d:
            raise InputError(f"{job.sample_id}: start slice {job.start} is outside the volume (0..{d - 1})")
        max_label = self.vae.max_label
        found = np.unique(job.label)
        bad = [int(v) for v in found if v < -1 or v > max_label]
        if bad:
            raise InputError(f"{job.source_case}: mask labels {bad} outside the trained set -1..{max_label}")

    def _padded(self, label: np.ndarray) -> np.ndarray:
        """A volume shorter than the window gets outside-region (-1) slices after its last one, so one
        window covers it; they are generated with it and dropped after."""
        missing = self.window - label.shape[0]
        if missing <= 0:
            return label
        return np.concatenate([label, np.full((missing, *label.shape[1:]), -1, dtype=label.dtype)])

    @torch.no_grad()
    def informed_latents(self, jobs: list[VolumeJob], generators: list[torch.Generator]) -> list[torch.Tensor | None]:
        """(c, h, w) informed latent per job; IG ones generated together by the slice model, each
        with its job's generator."""
        if not self.informed:
            return [None] * len(jobs)
        out: list[torch.Tensor | None] = [None] * len(jobs)
        ig = [i for i, j in enumerate(jobs) if j.informed.source == "IG"]
        if ig:
            if self.slice_net is None:
                raise InputError("IG informed slices need the slice model (models/slice_model.pt)")
            z = generate_slices(self.slice_net, self.slice_solver, [jobs[i].informed.position for i in ig],
                                self.latent_channels, self.latent_size, self.position_dim, [generators[i] for i in ig],
                                self.device, self.autocast)
            for k, i in enumerate(ig):
                out[i] = z[k]
        for i, job in enumerate(jobs):
            if job.informed.source in ("IC", "true", "fixed"):
                if self.latents is None:
                    raise InputError(f"{job.sample_id}: a {job.informed.source} informed slice is a slice of the "
                                     "dataset's scans, which this run (a bundle?) does not hold; use IG or an "
                                     "informed image of your own")
                out[i] = latent_of(job.informed, self.latents).to(self.device)
            elif job.informed.source == "user":
                out[i] = job.extra["user_latent"].to(self.device)
        return out

    @torch.no_grad()
    def generate(self, jobs: list[VolumeJob], pin: bool = True, independent: bool | None = None) -> list[np.ndarray]:
        """(d, s, s) float32 images in [-1, 1], one per job; -1 outside the non-zero region."""
        for job in jobs:
            self.check_job(job)
        independent = (not self.informed) if independent is None else independent
        results: list[np.ndarray] = []
        t_start = time.perf_counter()
        for batch, generators in seeded_batches(jobs, self.cfg.sampling.volumes_per_batch):
            tic = time.perf_counter()
            masks = [self.vae.encode_labels(self._padded(j.label)).to(self.device) for j in batch]  # (c, d, h, w)
            informed = self.informed_latents(batch, generators)
            latents = propagate_volumes(self._model_fn, self.solver, masks, informed, [j.start for j in batch],
                                        self.window, self.cfg.sampling.overlap, self.latent_channels, generators,
                                        use_informed=self.informed, pin=pin, independent_windows=independent,
                                        max_batch_windows=self.cfg.sampling.max_batch_windows,
                                        context_fn=self.encoder)
            for job, z in zip(batch, latents):
                z = z[:, :job.label.shape[0]]  # drop the slices _padded added
                image = self.vae.decode(z.permute(1, 0, 2, 3))[:, 0].numpy()  # (d, c, h, w) -> (d, s, s)
                results.append(np.where(job.label < 0, -1.0, image).astype(np.float32))
            now = time.perf_counter()
            per_volume = (now - t_start) / len(results)
            log.info("generated %d/%d volumes (%s stage %d, %.1f s for this batch, %.2f s per volume, eta %s)",
                     len(results), len(jobs), self.variant, self.stage, now - tic, per_volume,
                     format_duration(per_volume * (len(jobs) - len(results))))
        return results
