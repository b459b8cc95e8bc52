"""Training stages on the tiny run: outputs, stored scale factor, resume, and bad input."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from gem3d import pipeline
from gem3d.config import config_from_dict
from gem3d.data.latents import LatentStore, load_vae
from gem3d.io import InputError
from gem3d.models import UNet, build_model
from gem3d.paths import Paths
from gem3d.training.checkpoint import load_checkpoint

from conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def _cfg(**changes):
    raw = {**TINY_CONFIG}
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    return config_from_dict(raw, source="tiny", check_paths=False)


def test_models_rebuild_from_their_files(in_run):
    paths = Paths(in_run)
    vae = load_vae(paths.model("vae"))
    assert vae.scale_factor > 0 and vae.max_label == 3
    metrics = load_checkpoint(paths.model("vae"))["extra"]
    assert {"scale_factor", "test_psnr", "test_ssim"} <= set(metrics)
    for name, in_channels, slice_axis in (("volume_stage1", 12, False), ("volume_stage2", 12, True),
                                          ("baseline_stage2", 8, True), ("slice_model", 4, False)):
        payload = load_checkpoint(paths.model(name), expect_kind="unet")
        net = build_model("unet", payload["model_args"])
        assert isinstance(net, UNet) and net.config.in_channels == in_channels
        assert net.config.slice_axis == slice_axis
    latents = LatentStore(paths.latents)
    assert latents.channels == 4 and latents.index["vae_sha256"] == vae.sha


def test_stage2_trains_only_slice_axis_layers(in_run):
    paths = Paths(in_run)
    s1 = load_checkpoint(paths.model("volume_stage1"))
    s2 = load_checkpoint(paths.model("volume_stage2"))
    stage1_weights = s1["ema_state_dict"]
    for name, value in s2["state_dict"].items():
        if "slice_axis" not in name:
            assert torch.equal(value, stage1_weights.get(name, s1["state_dict"][name])), name
    assert set(s2["ema_state_dict"]) == {k for k in s2["state_dict"] if "slice_axis" in k}


def test_rerun_is_idempotent_and_resumes(run_copy):
    cfg = run_copy
    paths = Paths(cfg)
    before = load_checkpoint(paths.model("volume_stage1"))
    pipeline.train_volume(cfg, 1)  # finished: returns at once, same weights
    after = load_checkpoint(paths.model("volume_stage1"))
    assert after["step"] == before["step"]
    longer = dataclasses.replace(cfg, volume_model=dataclasses.replace(
        cfg.volume_model, stage1={**cfg.volume_model.stage1, "steps": before["step"] + 3}))
    pipeline.train_volume(longer, 1)  # resumes from the training state and runs 3 more steps
    assert load_checkpoint(paths.model("volume_stage1"))["step"] == before["step"] + 3


def test_slice_store_of_another_size_is_refused(run_copy):
    cfg = _cfg(preprocess={"slice_size": 32})
    with pytest.raises(InputError, match=r"16x16 slices but the config asks for 32"):
        pipeline.train_vae(cfg)


def test_corrupt_or_missing_checkpoint(run_copy):
    cfg = run_copy
    paths = Paths(cfg)
    paths.model("vae").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"vae.pt: cannot read checkpoint"):
        pipeline.encode(cfg)
    paths.model("volume_stage1").unlink()
    with pytest.raises(InputError, match=r"volume_stage1.pt: checkpoint not found"):
        pipeline.train_volume(cfg, 2)


def test_stage2_from_wrong_stage1_is_refused(run_copy):
    cfg = run_copy
    paths = Paths(cfg)
    shutil.copyfile(paths.model("baseline_stage1"), paths.model("volume_stage1"))
    paths.train_state("volume_stage2").unlink()
    with pytest.raises(InputError, match=r"8 input channels, the config asks for 12"):
        pipeline.train_volume(cfg, 2)


def test_data_parallel_training_through_the_cli(run_copy, tmp_path):
    """`gem3d train-slice --nproc 2` re-runs itself under torchrun (2 CPU processes, gloo)."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = run_copy
    paths = Paths(cfg)
    paths.model("slice_model").unlink()
    paths.train_state("slice_model").unlink()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    log = tmp_path / "train.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "gem3d.cli", "train-slice", "--nproc", "2", "--config", str(config),
                          "--log", str(log)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in log.read_text()
    payload = load_checkpoint(paths.model("slice_model"))
    assert payload["step"] == TINY_CONFIG["slice_model"]["train"]["steps"]


def test_vae_loss_weights_kl_as_latent_diffusion():
    """L1 mean + w * KL / pixels = (L1 summed over a slice's pixels + w * KL) / pixels."""
    from gem3d.models import DiagonalGaussian
    from gem3d.training.vae_training import vae_loss

    x = torch.zeros(2, 1, 8, 8)
    recon = torch.full((2, 1, 8, 8), 0.5)
    moments = torch.cat([torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)], dim=1)  # mean 1, logvar 0
    posterior = DiagonalGaussian(moments)
    loss, parts = vae_loss(recon, x, posterior, kl_weight=0.1)
    kl = 0.5 * 16  # 0.5 * mean^2 per latent element, 4 x 2 x 2 elements
    assert float(parts["kl"]) == pytest.approx(kl) and float(parts["l1"]) == pytest.approx(0.5)
    ldm = (0.5 * 64 + 0.1 * kl) / 64  # summed L1 of one slice + w * KL, per pixel
    assert float(loss) == pytest.approx(ldm)
