"""Which device gem3d computes on: the GPU when one is visible, unless GEM3D_DEVICE says otherwise.

    GEM3D_DEVICE=auto   (default) CUDA GPU if torch sees one, else the CPU
    GEM3D_DEVICE=cpu    always the CPU (the test suite sets this, so results do not depend on the card)
    GEM3D_DEVICE=cuda   the GPU; an error when none is visible

Under torchrun each process takes the GPU of its LOCAL_RANK. Every stage that runs a network
(training, latent encoding, sampling, evaluation, nnU-Net) asks here. A bad value is the user's
input, so it raises `InputError` (one line); the CLI checks it before a stage starts.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gem3d.io import InputError

if TYPE_CHECKING:
    import torch

ENV = "GEM3D_DEVICE"
CHOICES = ("auto", "cpu", "cuda")


def device_choice() -> str:
    """GEM3D_DEVICE as one of CHOICES (unset or empty: auto); anything else raises InputError."""
    raw = os.environ.get(ENV, "")
    choice = raw.strip().lower() or "auto"
    if choice not in CHOICES:
        raise InputError(f"environment variable {ENV}={raw!r} is not one of {', '.join(CHOICES)}")
    return choice


def compute_device(local_rank: int = 0) -> "torch.device":
    """The device every stage computes on (see the module docstring)."""
    import torch  # here, so that checking GEM3D_DEVICE's spelling does not import torch

    choice = device_choice()
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if choice == "cuda":
        raise InputError(f"environment variable {ENV}=cuda but torch sees no CUDA GPU (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); use {ENV}=auto or cpu")
    return torch.device("cpu")
