"""Latent cache: every case's image and mask encoded once by the trained VAE.

Diffusion training and sampling read these and never run the VAE encoder per step. Per case
`<case>.pt` = {"image": (c, d, h, w), "mask": (c, d, h, w)} float16, already multiplied by the
VAE's scale factor (posterior means). `index.json` records the VAE file hash and scale factor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gem3d.data.slice_store import SliceStore, mask_to_grey
from gem3d.io import InputError, atomic_dir, read_json, write_json
from gem3d.models import AutoencoderKL, build_model
from gem3d.training.checkpoint import inference_state_dict, load_checkpoint, sha256_of

log = logging.getLogger("gem3d.latents")


@dataclass
class LoadedVAE:
    model: AutoencoderKL
    scale_factor: float
    sha: str
    max_label: int
    source_sha: str | None = None  # the file it was imported from (vae.pretrained), when it was

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
        """(n, 1, s, s) in [-1, 1] -> (n, c, s/f, s/f) scaled posterior means."""
        device = next(self.model.parameters()).device
        out = [self.model.encode(x[i: i + batch].to(device)).mean * self.scale_factor for i in range(0, len(x), batch)]
        return torch.cat(out).cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """(n, c, h, w) scaled latents -> (n, 1, s, s) images clamped to [-1, 1], decoded in chunks."""
        device = next(self.model.parameters()).device
        out = [self.model.decode(z[i: i + batch].to(device).float() / self.scale_factor).clamp(-1, 1).cpu()
               for i in range(0, len(z), batch)]
        return torch.cat(out)

    def encode_labels(self, label: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(d, s, s) integer mask -> (c, d, h, w) mask latents (the mask goes through the VAE as an image)."""
        grey = mask_to_grey(torch.as_tensor(np.asarray(label), dtype=torch.float32), self.max_label)
        return self.encode(grey[:, None]).permute(1, 0, 2, 3).contiguous()  # (d, c, h, w) -> (c, d, h, w)


def load_vae(path: Path, device: str | torch.device = "cpu", cfg=None) -> LoadedVAE:
    """The trained VAE; with `cfg` (a Config), refuse one trained with another vae.model."""
    from gem3d.fingerprint import check_model_config

    payload = load_checkpoint(path, expect_kind="vae")
    if cfg is not None:
        check_model_config(payload, cfg, "vae", path)
    extra = payload.get("extra") or {}
    if "scale_factor" not in extra:
        raise InputError(f"{path}: VAE file has no measured scale factor (is it a training checkpoint? use vae.pt)")
    model = build_model("vae", payload["model_args"])
    model.load_state_dict(inference_state_dict(payload, use_ema=True))
    model.to(device).eval()
    return LoadedVAE(model, float(extra["scale_factor"]), sha256_of(path), int(extra["max_label"]),
                     extra.get("pretrained_sha256"))


def encode_store(vae: LoadedVAE, store: SliceStore, out_dir: Path) -> dict:
    """Write the latent cache for every case of the slice store (train and test)."""
    if vae.max_label != store.max_label:
        raise InputError(f"{store.root}: slice store max label {store.max_label} != the VAE's {vae.max_label}")
    from gem3d.fingerprint import store_digest

    # what the cache was made from: the VAE file and the slice store's content (training fingerprints)
    index = {"vae_sha256": vae.sha, "scale_factor": vae.scale_factor, "slices_digest": store_digest(store.index),
             "cases": {}}
    with atomic_dir(out_dir) as tmp:
        for i, case_id in enumerate(store.case_ids()):
            case = store.load(case_id)
            image = vae.encode(torch.from_numpy(case.image)[:, None]).permute(1, 0, 2, 3)  # (c, d, h, w)
            mask = vae.encode_labels(case.label)
            torch.save({"image": image.half(), "mask": mask.half()}, tmp / f"{case_id}.pt")
            index["cases"][case_id] = {"shape": list(image.shape)}
            log.info("encoded %d/%d %s -> latents %s", i + 1, len(store.case_ids()), case_id, tuple(image.shape))
        write_json(tmp / "index.json", index)
    return index


def _read_latents(path: Path) -> dict:
    """One case's cached latents; a missing, truncated or foreign file is one InputError line."""
    try:
        z = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: missing from the latent cache (rerun gem3d encode)") from None
    except Exception as exc:  # zip/pickle/EOF errors of many types for damaged files
        raise InputError(f"{path}: unreadable latent-cache file ({type(exc).__name__}); rerun gem3d encode") from None
    if not isinstance(z, dict) or not all(isinstance(z.get(k), torch.Tensor) for k in ("image", "mask")):
        raise InputError(f"{path}: not a latent-cache file (expected image and mask tensors); rerun gem3d encode")
    return z


INDEX_KEYS = ("vae_sha256", "scale_factor", "cases")  # what encode_store writes into index.json


def read_index(path: Path) -> dict:
    """The latent cache's index.json; an emptied or foreign one is one InputError line naming it."""
    index = read_json(path)
    missing = [k for k in INDEX_KEYS if k not in index] if isinstance(index, dict) else list(INDEX_KEYS)
    if missing or not isinstance(index["cases"], dict):
        raise InputError(f"{path}: not a latent-cache index (no {', '.join(missing) or 'cases mapping'}); "
                         "rerun gem3d encode")
    return index


class LatentStore:
    """All latents of a set of cases in memory (float16; cast per batch)."""

    def __init__(self, root: Path, case_ids: list[str] | None = None):
        self.root = Path(root)
        self.index = read_index(self.root / "index.json")
        ids = sorted(self.index["cases"]) if case_ids is None else case_ids
        missing = [c for c in ids if c not in self.index["cases"]]
        if missing:
            raise InputError(f"{self.root}: no latents for cases {missing[:5]} (rerun gem3d encode)")
        self.case_ids = ids
        self.image, self.mask = [], []
        for c in ids:
            z = _read_latents(self.root / f"{c}.pt")
            self.image.append(z["image"])
            self.mask.append(z["mask"])

    def subset(self, case_ids: list[str]) -> "LatentStore":
        """A view on some of the cases (no reloading)."""
        missing = [c for c in case_ids if c not in self.case_ids]
        if missing:
            raise InputError(f"{self.root}: no latents for cases {missing[:5]}")
        view = object.__new__(LatentStore)
        view.root, view.index, view.case_ids = self.root, self.index, list(case_ids)
        pos = [self.case_ids.index(c) for c in case_ids]
        view.image, view.mask = [self.image[i] for i in pos], [self.mask[i] for i in pos]
        return view

    @property
    def channels(self) -> int:
        return int(self.image[0].shape[0])

    def depth(self, i: int) -> int:
        return int(self.image[i].shape[1])
