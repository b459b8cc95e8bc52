"""Which device gem3d computes on: the GPU when one is visible, unless GEM3D_DEVICE says otherwise.

    GEM3D_DEVICE=auto   (default) CUDA GPU if torch sees one, else the CPU
    GEM3D_DEVICE=cpu    always the CPU (the test suite sets this, so results do not depend on the card)
    GEM3D_DEVICE=cuda   the GPU; an error when none is visible

Under torchrun each process takes the GPU of its LOCAL_RANK. Every stage that runs a network
(training, latent encoding, sampling, evaluation, nnU-Net) asks here.
"""

from __future__ import annotations

import os

import torch

ENV = "GEM3D_DEVICE"
CHOICES = ("auto", "cpu", "cuda")


def compute_device(local_rank: int = 0) -> torch.device:
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if choice == "cuda":
        raise RuntimeError(f"{ENV}=cuda but torch sees no CUDA GPU")
    return torch.device("cpu")
