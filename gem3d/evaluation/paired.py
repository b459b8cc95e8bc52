"""Paired metrics on axial slices of (real, generated) volumes: MS-SSIM, SSIM, PSNR, LPIPS.

Volumes are ``(d, h, w)`` in [-1, 1], axis 0 axial (see ``fid.py``); both are clipped to [-1, 1]
(as saved images would be) and every metric uses data range 2.

Slices used: axial slices where the mask (if given) has a non-zero voxel and, with
``drop_empty``, where the REAL slice is not constant (SSIM of a constant image is degenerate).
Per slice: MS-SSIM, SSIM and LPIPS; the reported value is their mean over the slices used. PSNR is
computed from the MSE pooled over all slices used (``inf`` when they are identical).

MS-SSIM (torchmetrics, Gaussian kernel 11, sigma 1.5, ``normalize="relu"``): the number of scales
is the largest ``s <= 5`` such that ``min(H, W) > (11 - 1) * 2**(s - 1)`` and torchmetrics' own size
check passes (``min(H, W) // max(1, s - 1)**2 > 10`` and ``>= 2**s``); the weights are the first
``s`` standard betas (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) renormalised to sum 1. 176+ px: 5
scales; 99+: 4; 44+: 3 (64 x 64 -> 3); 21+: 2 (32 x 32 -> 2); 16-20: 1 (plain SSIM); < 16 px:
InputError. The scales used are reported as ``ms_ssim_scales``.

LPIPS (Zhang et al. 2018, the ``lpips`` package's v0.1 model): built by ``load_lpips`` from a LOCAL
torchvision AlexNet/VGG-16 checkpoint and the linear heads (``alex.pth``/``vgg.pth`` with keys
``lin0.model.1.weight`` ...; by default the copies shipped inside torchmetrics). Grey slices are
repeated to 3 channels. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from gem3d.evaluation.extractors import file_sha256, load_into, load_state_dict_file, strip_known_prefixes
from gem3d.io import InputError

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIZE = 16
DATA_RANGE = 2.0


def ms_ssim_scales(height: int, width: int, kernel_size: int = 11, max_scales: int = 5) -> int:
    """Largest number of MS-SSIM scales that fits ``height x width`` (see module doc)."""
    side = min(height, width)
    if side < MS_SSIM_MIN_SIZE:
        raise InputError(f"slices {height}x{width} too small for MS-SSIM (need >= {MS_SSIM_MIN_SIZE} px)")
    for scales in range(max_scales, 0, -1):
        fits_scale = side > (kernel_size - 1) * 2 ** (scales - 1)
        fits_torchmetrics = side >= 2**scales and side // max(1, scales - 1) ** 2 > kernel_size - 1
        if fits_scale and fits_torchmetrics:
            return scales
    raise InputError(f"slices {height}x{width} too small for MS-SSIM with kernel {kernel_size}")


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    prefix = MS_SSIM_BETAS[:scales]
    total = sum(prefix)
    return tuple(float(b / total) for b in prefix)


# ----------------------------------------------------------------------------- LPIPS
_LPIPS_SPLITS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
_LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def default_lpips_lin_path(net: str) -> Path:
    import torchmetrics

    return Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / f"{net}.pth"


class LPIPS(nn.Module):
    """LPIPS v0.1: ``forward(x, y)`` on ``(N, 1|3, H, W)`` in [-1, 1] -> ``(N,)`` distances."""

    def __init__(self, net: str):
        super().__init__()
        if net not in _LPIPS_SPLITS:
            raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_SPLITS)}, got {net!r}")
        self.net_name = net
        if net == "alex":
            from torchvision.models import alexnet

            self.features = alexnet(weights=None).features
        else:  # torchvision's VGG-16 feature stack without building the 100M-parameter classifier
            from torchvision.models.vgg import cfgs, make_layers

            self.features = make_layers(cfgs["D"], batch_norm=False)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.description = f"lpips-{net}"
        self.requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for stop in _LPIPS_SPLITS[self.net_name]:
            for layer in self.features[start:stop]:
                x = layer(x)
            out.append(x)
            start = stop
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)  # (n 3 h w)
        x = (x.float() - self.shift) / self.scale
        y = (y.float() - self.shift) / self.scale
        try:
            taps = zip(self._taps(x), self._taps(y))
            total = 0.0
            for lin, (fx, fy) in zip(self.lins, taps):
                fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                total = total + lin((fx - fy) ** 2).mean(dim=(2, 3))  # (n 1)
        except RuntimeError as exc:
            if "too small" in str(exc):
                h, w = x.shape[-2:]
                raise InputError(f"slices {h}x{w} too small for LPIPS-{self.net_name}") from exc
            raise
        return total[:, 0]


def _lin_state(path: Path) -> dict[str, torch.Tensor]:
    raw = strip_known_prefixes(load_state_dict_file(path, "LPIPS linear heads"))
    out = {}
    for key, value in raw.items():
        parts = key.split(".")  # lin{k}.model.{1|0}.weight (with / without dropout)
        if len(parts) == 4 and parts[0].startswith("lin") and parts[1] == "model" and parts[3] == "weight":
            out[f"lins.{parts[0][3:]}.weight"] = value
    return out


def load_lpips(
    net: str,
    backbone_weights: str | Path,
    lin_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> LPIPS:
    """Build LPIPS from a local torchvision AlexNet/VGG-16 checkpoint and local linear heads.

    ``backbone_weights``: the torchvision ``alexnet``/``vgg16`` state_dict (``features.*`` used,
    ``classifier.*`` ignored) or a features-only one (``0.weight`` ...), wrappers/prefixes as in
    ``extractors``. ``lin_weights``: ``None`` uses torchmetrics' shipped ``{net}.pth``.
    """
    model = LPIPS(net)
    backbone = strip_known_prefixes(load_state_dict_file(backbone_weights, f"LPIPS {net} backbone"))
    if any(k.startswith("features.") for k in backbone):
        backbone = {k[len("features.") :]: v for k, v in backbone.items() if k.startswith("features.")}
    load_into(model.features, backbone, backbone_weights)
    lin_path = Path(lin_weights) if lin_weights is not None else default_lpips_lin_path(net)
    lins = _lin_state(lin_path)
    load_into(model.lins, {k[len("lins.") :]: v for k, v in lins.items()}, lin_path)
    model.description = (
        f"lpips-{net} (backbone: {backbone_weights}, sha256 {file_sha256(backbone_weights)[:12]}; "
        f"lin: {lin_path}, sha256 {file_sha256(lin_path)[:12]})"
    )
    return model.eval().to(device)


# ----------------------------------------------------------------------------- paired metrics
def _axial_pairs(real, fake, mask, drop_empty) -> tuple[torch.Tensor, torch.Tensor]:
    real, fake = np.asarray(real), np.asarray(fake)
    if real.shape != fake.shape:
        raise InputError(f"real and generated volumes differ in shape: real {real.shape} vs generated {fake.shape}")
    if real.ndim != 3:
        raise InputError(f"volumes must be 3D (d, h, w), got shape {real.shape}")
    keep = np.ones(real.shape[0], dtype=bool)
    if mask is not None:
        if np.shape(mask) != real.shape:
            raise InputError(f"mask shape {np.shape(mask)} differs from volume shape {real.shape}")
        keep &= (np.asarray(mask) != 0).reshape(real.shape[0], -1).any(axis=1)
    if drop_empty:
        flat = real.reshape(real.shape[0], -1)
        keep &= (flat.max(axis=1) - flat.min(axis=1)) > 1e-6
    if not keep.any():
        raise InputError(f"no non-empty axial slices to compare (volume shape {real.shape})")
    r = torch.from_numpy(np.clip(real[keep], -1, 1).astype(np.float32))[:, None]  # (n 1 h w)
    f = torch.from_numpy(np.clip(fake[keep], -1, 1).astype(np.float32))[:, None]  # (n 1 h w)
    return r, f


@torch.no_grad()
def paired_metrics(
    real: np.ndarray,
    fake: np.ndarray,
    mask: np.ndarray | None = None,
    lpips: LPIPS | None = None,
    drop_empty: bool = True,
    batch_size: int = 32,
) -> dict:
    """MS-SSIM, SSIM, PSNR (and LPIPS when a model is given) over axial slice pairs.

    Returns ``{"n_slices", "ms_ssim", "ms_ssim_scales", "ssim", "psnr", "lpips", "lpips_model"}``;
    ``lpips``/``lpips_model`` are ``None`` (not computed) without an LPIPS model.
    """
    r, f = _axial_pairs(real, fake, mask, drop_empty)
    h, w = r.shape[-2:]
    scales = ms_ssim_scales(h, w)
    betas = ms_ssim_betas(scales)
    ms, ss, lp = [], [], []
    for i in range(0, len(r), batch_size):
        rb, fb = r[i : i + batch_size], f[i : i + batch_size]
        ms.append(
            multiscale_structural_similarity_index_measure(
                fb, rb, data_range=DATA_RANGE, kernel_size=11, betas=betas, reduction="none"
            ).reshape(-1)
        )
        ss.append(structural_similarity_index_measure(fb, rb, data_range=DATA_RANGE, reduction="none").reshape(-1))
        if lpips is not None:
            device = lpips.shift.device
            lp.append(lpips(fb.to(device), rb.to(device)).cpu())
    mse = float(F.mse_loss(f.double(), r.double()))
    psnr = float("inf") if mse == 0 else float(10.0 * np.log10(DATA_RANGE**2 / mse))
    return {
        "n_slices": int(len(r)),
        "ms_ssim": float(torch.cat(ms).double().mean()),
        "ms_ssim_scales": scales,
        "ssim": float(torch.cat(ss).double().mean()),
        "psnr": psnr,
        "lpips": float(torch.cat(lp).double().mean()) if lpips is not None else None,
        "lpips_model": lpips.description if lpips is not None else None,
    }
