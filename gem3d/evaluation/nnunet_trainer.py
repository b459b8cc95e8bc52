"""The nnU-Net v2 trainer of the downstream experiment: nnU-Net's default trainer with the training
length taken from environment variables (set by gem3d/evaluation/downstream.py from
``evaluation.segmentation``), so `nnUNetv2_train -tr nnUNetTrainerGem3d` runs any length without
one class per setting.

    GEM3D_NNUNET_EPOCHS           epochs (nnU-Net default 1000)
    GEM3D_NNUNET_ITERATIONS       training iterations per epoch (default 250)
    GEM3D_NNUNET_VAL_ITERATIONS   validation iterations per epoch (default 50)
    GEM3D_NNUNET_SEED             seeds Python's, numpy's and torch's generators before nnU-Net builds the network
                                  (its initial weights and the main process's draws); nnU-Net's augmentation
                                  workers draw their own seeds, so two runs of one seed still differ a little
    GEM3D_NNUNET_THREADS          torch threads of the training (nnU-Net takes every core on a CPU; under
                                  Snakemake this is the job's share, its OMP_NUM_THREADS)
    GEM3D_NNUNET_SKIP_VALIDATION  "1" (default): skip nnU-Net's final validation. With fold "all"
                                  its validation cases are the training cases, and gem3d predicts the
                                  real test split itself, so that pass only costs time.

Two more savings of a short CPU training, about 1 s an epoch of a 10-minute one (12 %): no
checkpoint_best.pth (with fold "all" it is chosen on the training cases, and gem3d predicts with
checkpoint_final.pth), and nnU-Net's progress.png drawn at each checkpoint and at the end, not every epoch.

nnU-Net finds this class by name through ``nnUNet_extTrainer`` (a folder holding a module that
imports it; downstream.py writes that folder). Importing this module imports nnunetv2.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

ENV_EPOCHS = "GEM3D_NNUNET_EPOCHS"
ENV_ITERATIONS = "GEM3D_NNUNET_ITERATIONS"
ENV_VAL_ITERATIONS = "GEM3D_NNUNET_VAL_ITERATIONS"
ENV_SKIP_VALIDATION = "GEM3D_NNUNET_SKIP_VALIDATION"
ENV_SEED = "GEM3D_NNUNET_SEED"
ENV_THREADS = "GEM3D_NNUNET_THREADS"
TRAINER_NAME = "nnUNetTrainerGem3d"


def env_positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    return value


def plots_after(epoch: int, save_every: int, epochs: int) -> bool:
    """Whether progress.png is drawn after `epoch` (0-based): at each checkpoint_latest.pth and after the last."""
    return (epoch + 1) % save_every == 0 or epoch >= epochs - 1


def checkpoint_interval(epochs: int, nnunet_default: int) -> int:
    """Epochs between nnU-Net's checkpoint_latest.pth: its 50 would leave a shorter training killed before its end
    nothing to resume from (gem3d resumes with --c only from that file), so about ten per training."""
    return max(1, min(nnunet_default, epochs // 10))


class nnUNetTrainerGem3d(nnUNetTrainer):
    # the parameter names must stay those of nnUNetTrainer.__init__ (it records them for checkpoints)
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        threads = os.environ.get(ENV_THREADS)
        if threads not in (None, "") and self.device.type == "cpu":
            torch.set_num_threads(env_positive_int(ENV_THREADS, 1))
        seed = os.environ.get(ENV_SEED)
        if seed not in (None, ""):
            random.seed(int(seed))
            np.random.seed(int(seed) % 2**32)
            torch.manual_seed(int(seed))
        self.num_epochs = env_positive_int(ENV_EPOCHS, self.num_epochs)
        self.num_iterations_per_epoch = env_positive_int(ENV_ITERATIONS, self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = env_positive_int(ENV_VAL_ITERATIONS, self.num_val_iterations_per_epoch)
        self.save_every = checkpoint_interval(self.num_epochs, self.save_every)
        plot = self.logger.plot_progress_png

        def plot_progress_png(output_folder):
            if plots_after(self.current_epoch, self.save_every, self.num_epochs):
                plot(output_folder)

        self.logger.plot_progress_png = plot_progress_png

    def save_checkpoint(self, filename: str) -> None:
        if os.path.basename(filename) == "checkpoint_best.pth":
            return  # chosen on the training cases under fold "all"; gem3d uses checkpoint_final.pth
        super().save_checkpoint(filename)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get(ENV_SKIP_VALIDATION, "1") == "1":
            self.print_to_log_file(f"{ENV_SKIP_VALIDATION}=1: final validation skipped (gem3d predicts the test split)")
            return
        super().perform_actual_validation(save_probabilities)
