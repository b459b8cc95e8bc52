"""A frozen image encoder of the informed slice: the cross-attention variant's context (`volume_model.crossattn_encoder`).

The paper's cross-attention row (Table 3) embeds the informed slice with a pretrained CLIP image encoder and lets
the volume model attend to that embedding. gem3d cannot download CLIP; by default its cross-attention variant
learns a spatial tokenizer of the informed latent instead (gem3d.models.injection.InformedEncoder: 256 tokens
(16x16) per slice of a 64x64 latent, trained with the network: more information than one CLIP vector). With
`volume_model.crossattn_encoder: {extractor, weights}` it uses a frozen encoder of the user's own instead, as the
paper does: the informed latent is decoded by the run's VAE to its slice, the slice goes through the encoder
(RadImageNet's ResNet-50 or torchvision's Inception-v3 from a local weights file, the FID extractors of
gem3d.evaluation.extractors), and its pooled 2048-d feature is the one token the U-Net's cross-attention reads
(UNetConfig.injection "crossattn_frozen"). The encoder is never trained; its weights file's SHA-256 goes into
the model file, and sampling refuses another one.
"""

from __future__ import annotations

import torch

from gem3d.data.latents import LoadedVAE
from gem3d.evaluation.extractors import checked_extractor
from gem3d.io import InputError, file_sha256

KEY = "volume_model.crossattn_encoder"
EXTRACTORS = ("radimagenet_resnet50", "inception_v3")


def check_settings(settings: dict, source: str) -> None:
    """The section names a known encoder and a weights file (whether the file exists: gem3d.config)."""
    if settings.get("extractor") not in EXTRACTORS:
        raise InputError(f"{source}: config key {KEY}.extractor: {settings.get('extractor')!r} is not one of "
                         f"{list(EXTRACTORS)}")
    if not settings.get("weights"):
        raise InputError(f"{source}: config key {KEY}.weights: the encoder's local weights file is not set")


class FrozenSliceEncoder:
    """Informed latents (n, c, h, w) -> their slices' pooled embeddings (n, 1, 2048): VAE decoder, then the
    frozen encoder, in chunks, without gradients."""

    def __init__(self, settings: dict, vae: LoadedVAE, device: torch.device | str = "cpu", batch: int = 32):
        self.device, self.batch, self.vae = torch.device(device), batch, vae
        self.extractor, self.description = checked_extractor(settings["extractor"], settings["weights"], self.device,
                                                             weights_key=f"{KEY}.weights", extractor_key=f"{KEY}.extractor")
        self.sha = file_sha256(settings["weights"])

    def record(self) -> dict:
        """What a model file keeps of the encoder it was trained with."""
        return {"description": self.description, "sha256": self.sha}

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, len(latents), self.batch):
            images = self.vae.decode(latents[lo: lo + self.batch])  # (n, 1, s, s) in [-1, 1], on the CPU
            out.append(self.extractor(images.to(self.device)).float())
        return torch.cat(out)[:, None]  # (n, 1, 2048): one token per slice
