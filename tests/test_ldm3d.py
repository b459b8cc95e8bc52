"""The conditional 3D LDM comparison: the 3D U-Net, depth resampling, training and sampling on the tiny run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from gem3d.methods.ldm3d import LDM3DSampler, fit_depth, resample_slices, train_ldm3d, unfit_depth
from gem3d.config import config_from_dict
from gem3d.data.latents import LatentStore
from gem3d.data.slice_store import OUTSIDE, SliceStore
from gem3d.io import InputError, read_json
from gem3d.models import UNet3D, UNet3DConfig, build_model, model_args
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeJob
from gem3d.sampling.informed import InformedSpec
from gem3d.training.checkpoint import load_checkpoint

from conftest import tiny_raw

TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], head_dim=8,
                norm_groups=4)


def _net(**changes) -> UNet3D:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet3D(UNet3DConfig(in_channels=8, out_channels=4, **{**TINY_NET, **changes}))


def _randomised(net: UNet3D) -> UNet3D:
    """Non-zero weights everywhere (a fresh network predicts zero, so nothing would depend on anything)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net.eval()


def test_unet3d_output_shape_and_zero_init():
    net = _net()
    x = torch.randn(2, 8, 8, 8, 8)
    out = net(x, torch.tensor([3, 700]))
    assert out.shape == (2, 4, 8, 8, 8)
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 8, 7, 8, 8), torch.tensor([3]))


def test_unet3d_depends_on_timestep_and_checkpointing_keeps_gradients():
    net = _randomised(_net())
    x = torch.randn(1, 8, 8, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(net(x, torch.tensor([0])), net(x, torch.tensor([900])), atol=1e-4)
    net.train()
    grads = []
    for flag in (False, True):
        net.zero_grad()
        net.set_grad_checkpointing(flag)
        net(x, torch.tensor([10])).square().mean().backward()
        grads.append(net.input_blocks[0][0].conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_unet3d_rebuilds_from_model_args_and_validates_fields():
    net = _randomised(_net())
    again = build_model("unet3d", model_args(net))
    again.load_state_dict(net.state_dict())
    x = torch.randn(1, 8, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x, torch.tensor([5])), net(x, torch.tensor([5])))
    assert again.config == net.config
    with pytest.raises(ValueError, match="norm_groups"):
        UNet3DConfig(in_channels=8, out_channels=4, **{**TINY_NET, "norm_groups": 3})
    with pytest.raises(ValueError, match="attention_levels"):
        UNet3DConfig(in_channels=8, out_channels=4, **{**TINY_NET, "attention_levels": [2]})


def test_resample_slices_keeps_end_slices_and_shape():
    z = torch.randn(4, 5, 3, 3)  # (c, d, h, w)
    up = resample_slices(z, 9)
    assert up.shape == (4, 9, 3, 3) and up.dtype == torch.float32
    torch.testing.assert_close(up[:, 0], z[:, 0])
    torch.testing.assert_close(up[:, -1], z[:, -1])
    torch.testing.assert_close(up[:, 1], (z[:, 0] + z[:, 1]) / 2)  # linear between the neighbours
    image = torch.arange(3.0)[:, None, None].expand(3, 2, 2)  # (d, s, s) slices 0, 1, 2
    assert resample_slices(image, 5)[:, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]


# ---- on the tiny run ---------------------------------------------------------------------------


def _cfg_raw() -> dict:
    return tiny_raw(**{"ldm3d.depth": 8, "ldm3d.model": TINY_NET,
                       "ldm3d.train": {"steps": 3, "lr": 1e-3, "batch_size": 2, "log_every": 1, "checkpoint_every": 3,
                                       "precision": "fp32", "ema_decay": 0.9}})


def _cfg():
    return config_from_dict(_cfg_raw(), source="tiny", check_paths=False)


def _train(cfg) -> None:
    paths = Paths(cfg)
    latents = LatentStore(paths.latents, read_json(paths.split)["train"])
    train_ldm3d(cfg, latents, paths.model("vae"), paths.train_state("ldm3d"), paths.model("ldm3d"))


def test_train_ldm3d_writes_the_model_then_is_up_to_date(run_copy, caplog):
    cfg = _cfg()
    paths = Paths(cfg)
    _train(cfg)
    payload = load_checkpoint(paths.model("ldm3d"), expect_kind="unet3d")
    assert payload["step"] == 3 and payload["model_args"]["in_channels"] == 8
    assert payload["extra"]["depth"] == 8 and payload["extra"]["role"] == "ldm3d"
    assert payload["extra"]["latents_vae_sha256"] == read_json(paths.latents / "index.json")["vae_sha256"]
    with caplog.at_level(logging.INFO):
        _train(cfg)
    assert "up to date" in caplog.text
    assert load_checkpoint(paths.model("ldm3d"))["step"] == 3


def test_sampler_shapes_range_outside_and_seed_alone_decides(run_copy):
    cfg = _cfg()
    _train(cfg)
    store = SliceStore(Paths(cfg).slices)
    a, b = (store.load(c) for c in store.case_ids()[:2])
    label_a = a.label.copy()
    label_a[:, :2] = OUTSIDE  # an outside region, whatever the phantom has
    jobs = [VolumeJob("a", a.case_id, label_a, 0, InformedSpec("IG", position=0.5), seed=11),
            VolumeJob("b", b.case_id, b.label[:-3], 0, InformedSpec("IG", position=0.5), seed=12)]
    sampler = LDM3DSampler(cfg)
    assert cfg.sampling.volumes_per_batch >= 2 and set(sampler.checkpoints) == {"vae", "ldm3d"}
    together = sampler.generate(jobs, pin=True)
    alone = sampler.generate(jobs[1:], pin=False)[0]  # the second of the batch: its noise is its own
    for job, image in zip(jobs, together):
        assert image.shape == job.label.shape and image.dtype == np.float32
        assert image.min() >= -1 and image.max() <= 1
        assert (image[job.label == OUTSIDE] == -1).all()
        assert (image[job.label != OUTSIDE] != -1).any()
    np.testing.assert_allclose(alone, together[1], atol=1e-5)
    other_seed = sampler.generate([VolumeJob("b2", b.case_id, jobs[1].label, 0, jobs[1].informed, seed=99)])[0]
    assert np.abs(other_seed - alone).max() > 1e-3


def test_corrupt_ldm3d_model_is_one_line_naming_the_file(run_copy):
    cfg = _cfg()
    path = Paths(cfg).model("ldm3d")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as err:
        LDM3DSampler(cfg)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_volume_within_the_depth_is_padded_not_resampled():
    """Issue #23: the 3D LDM saw every volume resampled to ldm3d.depth; now one of up to `depth` slices is padded with
    the outside region's latent, half before and half after, and given back exactly; a deeper one is resampled."""
    z = torch.arange(2 * 5 * 1 * 1, dtype=torch.float32).reshape(2, 5, 1, 1)
    pad = torch.tensor([-7.0, -9.0]).reshape(2, 1, 1)
    fitted = fit_depth(z, 8, pad)
    assert fitted.shape == (2, 8, 1, 1)
    assert fitted[0, :, 0, 0].tolist() == [-7.0, 0.0, 1.0, 2.0, 3.0, 4.0, -7.0, -7.0]
    torch.testing.assert_close(unfit_depth(fitted.permute(1, 0, 2, 3), 5), z.permute(1, 0, 2, 3))
    deep = torch.arange(12, dtype=torch.float32).reshape(1, 12, 1, 1)
    torch.testing.assert_close(fit_depth(deep, 4, pad[:1]), resample_slices(deep, 4))
    assert unfit_depth(torch.zeros(4, 3, 3), 12).shape == (12, 3, 3)


def test_training_pads_with_the_outside_latents_and_records_it(run_copy, caplog):
    cfg = config_from_dict({**_cfg_raw(), "ldm3d": {**_cfg_raw()["ldm3d"], "depth": 32}}, source="tiny",
                           check_paths=False)
    with caplog.at_level(logging.INFO, logger="gem3d.ldm3d"):
        _train(cfg)
    extra = load_checkpoint(Paths(cfg).model("ldm3d"))["extra"]
    assert extra["fit"] == "pad" and extra["depth"] == 32 and extra["resampled_cases"] == []
    assert "0 deeper ones resampled" in caplog.text
    store = SliceStore(Paths(cfg).slices)
    case = store.load(store.case_ids("test")[0])
    image = LDM3DSampler(cfg).generate([VolumeJob("t", case.case_id, case.label, 0, InformedSpec("none"), 3)])[0]
    assert image.shape == case.label.shape and (image[case.label == OUTSIDE] == -1).all()
