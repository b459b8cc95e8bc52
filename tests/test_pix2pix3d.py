"""3D Pix2Pix (comparison method): networks, detached adversarial terms, training stage, sampler, overfit."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from gem3d import pipeline
from gem3d.comparisons import pix2pix as p2p
from gem3d.config import config_from_dict
from gem3d.data.slice_store import SliceStore
from gem3d.io import InputError
from gem3d.models import build_model, model_args, model_kind
from gem3d.models.pix2pix3d import Pix2Pix3D, Pix2Pix3DConfig, gan_loss, mask_channels
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeJob
from gem3d.sampling.informed import InformedSpec
from gem3d.training.checkpoint import load_checkpoint
from gem3d.training.loop import TrainConfig, train

from conftest import tiny_raw

TINY_NET = dict(base_channels=4, levels=2, disc_base_channels=4, disc_layers=1, norm_groups=2)
PIX2PIX = {"volume_size": [8, 16, 16], "model": TINY_NET,
           "train": {"steps": 3, "lr": 2e-4, "betas": [0.5, 0.999], "batch_size": 1, "precision": "fp32",
                     "ema_decay": 0.0, "log_every": 1, "checkpoint_every": 3}}


def tiny_net(seed=0, **changes) -> Pix2Pix3D:
    torch.manual_seed(seed)
    return Pix2Pix3D(Pix2Pix3DConfig(in_channels=5, **{**TINY_NET, **changes}))


def tiny_batch(b=2, size=(8, 16, 16), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(-1, 4, (b, *size), generator=g)
    return mask_channels(label, 3), torch.rand(b, 1, *size, generator=g) * 2 - 1


def test_generator_maps_the_mask_to_an_image_in_range():
    net = tiny_net()
    mask, _ = tiny_batch()
    assert mask.shape == (2, 5, 8, 16, 16) and torch.equal(mask.sum(1), torch.ones(2, 8, 16, 16))
    fake = net.generate(mask)
    assert fake.shape == (2, 1, 8, 16, 16) and fake.abs().max() <= 1 and fake.std() > 0
    with pytest.raises(ValueError, match=r"divisible by 4, got \(8, 16, 18\)"):
        net.generate(torch.zeros(1, 5, 8, 16, 18))
    with pytest.raises(ValueError, match="Pix2Pix3DConfig.levels"):
        Pix2Pix3DConfig(in_channels=5, levels=1)
    with pytest.raises(ValueError, match="Pix2Pix3DConfig.dropout"):
        Pix2Pix3DConfig(in_channels=5, dropout=1.0)


def test_discriminator_gives_one_logit_per_patch():
    mask, image = tiny_batch()
    d = tiny_net().discriminator
    assert d(torch.cat([mask, image], 1)).shape == (2, 1, 2, 6, 6)  # size / 2**layers - 2 per axis
    d2 = tiny_net(disc_layers=2).discriminator
    mask, image = tiny_batch(1, (12, 16, 32))
    assert d2(torch.cat([mask, image], 1)).shape == (1, 1, 1, 2, 6)
    with pytest.raises(ValueError, match="at least 12, got"):
        d2(torch.zeros(1, 6, 8, 16, 16))


def test_generator_term_trains_no_discriminator_and_back():
    net = tiny_net()
    mask, image = tiny_batch()
    fake, logits, d_loss = net(mask, image)
    torch.testing.assert_close(logits, net.discriminator(torch.cat([mask, fake], 1)))  # same D, detached weights
    gen, disc = list(net.generator.parameters()), list(net.discriminator.parameters())
    gan_loss(logits, True).backward(retain_graph=True)
    assert all(p.grad is None for p in disc)
    assert all(p.grad is not None for p in gen) and sum(float(p.grad.abs().sum()) for p in gen) > 0
    net.zero_grad(set_to_none=True)
    d_loss.backward()
    assert all(p.grad is None for p in gen)
    assert all(p.grad is not None for p in disc) and sum(float(p.grad.abs().sum()) for p in disc) > 0


def test_build_model_round_trip():
    net = tiny_net(seed=3)
    assert model_kind(net) == "pix2pix3d"
    again = build_model("pix2pix3d", model_args(net))
    assert again.config == net.config
    again.load_state_dict(net.state_dict())
    mask, _ = tiny_batch()
    torch.testing.assert_close(again.generate(mask), net.generate(mask))


def test_overfits_one_repeated_volume(tmp_path):
    net = tiny_net()
    label = torch.randint(-1, 4, (1, 8, 16, 16), generator=torch.Generator().manual_seed(1))
    image = torch.where(label >= 0, label.float() / 3 * 1.6 - 0.8, -1.0)[:, None]  # a mask-determined image
    result = train(net, p2p.make_loss(100.0, 3), lambda step, g, items: {"label": label, "image": image},
                   TrainConfig(steps=30, lr=1e-2, betas=(0.5, 0.999), ema_decay=0.0, log_every=5,
                               checkpoint_every=30),
                   tmp_path / "state.ckpt", kind="pix2pix3d", model_args=model_args(net))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.7 * first, result.losses


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """The tiny run's slice store (data stages only, no network): (workdir, cfg)."""
    workdir = tmp_path_factory.mktemp("pix2pix_run")
    cfg = config_from_dict({**tiny_raw(), "pix2pix": PIX2PIX}, source="tiny", check_paths=False)
    old = os.getcwd()
    os.chdir(workdir)
    try:
        for stage in (pipeline.make_phantoms, pipeline.import_data, pipeline.preprocess, pipeline.build_slices):
            stage(cfg)
    finally:
        os.chdir(old)
    return workdir, cfg


@pytest.fixture(scope="module")
def trained(tiny_store):
    """3D Pix2Pix trained for a few steps on the tiny store: (workdir, cfg)."""
    workdir, cfg = tiny_store
    old = os.getcwd()
    os.chdir(workdir)
    try:
        paths = Paths(cfg)
        p2p.train_pix2pix(cfg, SliceStore(paths.slices), paths.train_state("pix2pix"), paths.model("pix2pix"))
    finally:
        os.chdir(old)
    return workdir, cfg


def test_training_writes_the_model_once(trained, monkeypatch, caplog):
    workdir, cfg = trained
    monkeypatch.chdir(workdir)
    paths = Paths(cfg)
    payload = load_checkpoint(paths.model("pix2pix"), expect_kind="pix2pix3d")
    assert payload["step"] == 3 and payload["model_args"]["in_channels"] == 5
    assert payload["extra"]["volume_size"] == [8, 16, 16] and payload["extra"]["gan_loss"] == "vanilla"
    stamp = paths.model("pix2pix").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="gem3d.pix2pix"):
        p2p.train_pix2pix(cfg, SliceStore(paths.slices), paths.train_state("pix2pix"), paths.model("pix2pix"))
    assert "up to date" in caplog.text
    assert paths.model("pix2pix").stat().st_mtime_ns == stamp


def test_volume_size_the_generator_cannot_halve_is_refused(tiny_store, monkeypatch, tmp_path):
    workdir, cfg = tiny_store
    monkeypatch.chdir(workdir)
    bad = config_from_dict({**tiny_raw(), "pix2pix": {**PIX2PIX, "volume_size": [8, 16, 18]}}, source="tiny",
                           check_paths=False)
    with pytest.raises(InputError, match=r"pix2pix.volume_size: \[8, 16, 18\] must be 3 sizes divisible by"):
        p2p.train_pix2pix(bad, SliceStore(Paths(cfg).slices), tmp_path / "s.ckpt", tmp_path / "m.pt")


def test_sampler_returns_deterministic_volumes_outside_at_minus_one(trained, monkeypatch):
    workdir, cfg = trained
    monkeypatch.chdir(workdir)
    store = SliceStore(Paths(cfg).slices)
    case_id = store.case_ids("test")[0]
    label = store.load(case_id).label
    sampler = p2p.Pix2PixSampler(cfg)
    assert sampler.solver is None and set(sampler.checkpoints) == {"pix2pix"}
    jobs = [VolumeJob(f"{case_id}_x", case_id, label, 0, InformedSpec("IC"), seed) for seed in (1, 2)]
    first, other_seed = sampler.generate(jobs, pin=True)
    assert first.shape == label.shape and first.dtype == np.float32  # back at the slice store's (d, s, s)
    assert first.min() >= -1 and first.max() <= 1
    assert np.all(first[label == -1] == -1) and (label == -1).any() and first[label >= 0].std() > 0
    np.testing.assert_array_equal(first, other_seed)  # no noise: dropout off, the seed changes nothing
    np.testing.assert_array_equal(first, p2p.Pix2PixSampler(cfg).generate(jobs[:1], pin=False)[0])
    bad = VolumeJob("bad", case_id, np.full_like(label, 4), 0, InformedSpec("IC"), 0)
    with pytest.raises(InputError, match=r"mask labels \[4\] outside the trained set -1..3"):
        sampler.generate([bad], pin=True)
