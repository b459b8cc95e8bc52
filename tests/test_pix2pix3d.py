"""3D Pix2Pix (comparison method): networks, detached adversarial terms, training stage, sampler, overfit."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from gem3d import pipeline
from gem3d.methods import pix2pix as p2p
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
    with caplog.at_level(logging.INFO, logger="gem3d.training"):
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


def test_gradient_checkpointing_it_does_not_have_is_refused_at_load():
    raw = {**tiny_raw(), "comparisons": ["pix2pix"],
           "pix2pix": {**PIX2PIX, "train": {**PIX2PIX["train"], "grad_checkpointing": True}}}
    with pytest.raises(InputError, match=r"config key pix2pix.train.grad_checkpointing: 3D Pix2Pix has no gradient"):
        config_from_dict(raw, source="tiny", check_paths=False)
    config_from_dict({**raw, "pix2pix": PIX2PIX}, source="tiny", check_paths=False)


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
    np.testing.assert_array_equal(first, other_seed)  # no noise: 2 levels have no dropout block
    np.testing.assert_array_equal(first, p2p.Pix2PixSampler(cfg).generate(jobs[:1], pin=False)[0])
    bad = VolumeJob("bad", case_id, np.full_like(label, 4), 0, InformedSpec("IC"), 0)
    with pytest.raises(InputError, match=r"mask labels \[4\] outside the trained set -1..3"):
        sampler.generate([bad], pin=True)


def test_dropout_sits_on_the_blocks_next_to_the_innermost_as_in_pix2pix():
    """pix2pix's 8-level generator has dropout on decoder blocks 4, 5, 6 (its ngf*8 blocks), not on the innermost
    (7) nor the outer ones; fewer levels keep the blocks next to the innermost, never the outermost (issue #23)."""
    assert list(Pix2Pix3DConfig(in_channels=5, levels=8, dropout=0.5).dropout_levels()) == [4, 5, 6]
    assert list(Pix2Pix3DConfig(in_channels=5, levels=4, dropout=0.5).dropout_levels()) == [1, 2]
    assert list(Pix2Pix3DConfig(in_channels=5, levels=7, dropout=0.5, dropout_blocks=1).dropout_levels()) == [5]
    assert not Pix2Pix3DConfig(in_channels=5, levels=8, dropout=0.0).dropout_levels()
    net = tiny_net(levels=4, dropout=0.5)
    with_dropout = [k for k, block in enumerate(net.generator.up) if any(isinstance(m, torch.nn.Dropout) for m in block)]
    assert with_dropout == [1, 2]


@pytest.mark.parametrize("name", ["brats.yaml", "abdomenct1k.yaml"])
def test_the_paper_configs_drop_out_where_pix2pix_does(name):
    """Found in review: at 7 levels, 3 dropout blocks put one on a 4x-width block, which pix2pix never drops out:
    pix2pix's are its 8x-width blocks below the innermost (levels - 5 of them)."""
    from conftest import REPO
    from gem3d.config import load_config

    model = load_config(REPO / "config" / name, check_paths=False).pix2pix.model
    net = Pix2Pix3DConfig(in_channels=5, **model)
    widths = [net.base_channels * min(2 ** k, 8) for k in range(net.levels)]  # encoder width at level k
    assert list(net.dropout_levels()) == [k for k in range(1, net.levels - 1) if widths[k] == widths[k - 1] ==
                                          8 * net.base_channels]


def test_the_config_default_is_pix2pix_dropout_and_decay():
    cfg = config_from_dict(tiny_raw(), source="tiny", check_paths=False)
    assert cfg.pix2pix.model["dropout"] == 0.5 and cfg.pix2pix.train["lr_decay"] == 0.5


def test_sampling_keeps_dropout_on_drawn_from_the_job_seed(tiny_store, monkeypatch, tmp_path):
    """pix2pix applies dropout at test time: with dropout blocks a volume depends on its job's seed, and the same
    seed gives the same volume (torch's global generator is forked and seeded per volume)."""
    import shutil

    workdir, _ = tiny_store
    shutil.copytree(workdir / "results" / "tiny" / "slices", tmp_path / "results" / "tiny" / "slices")
    monkeypatch.chdir(tmp_path)
    model = {**TINY_NET, "levels": 3, "dropout": 0.5}
    cfg = config_from_dict({**tiny_raw(), "pix2pix": {**PIX2PIX, "model": model}}, source="tiny", check_paths=False)
    paths = Paths(cfg)
    p2p.train_pix2pix(cfg, SliceStore(paths.slices), paths.train_state("pix2pix"), paths.model("pix2pix"))
    store = SliceStore(paths.slices)
    case_id = store.case_ids("test")[0]
    label = store.load(case_id).label
    jobs = [VolumeJob(f"{case_id}_{seed}", case_id, label, 0, InformedSpec("none"), seed) for seed in (1, 2, 1)]
    torch.manual_seed(123)
    a, b, again = p2p.Pix2PixSampler(cfg).generate(jobs)
    assert np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(a, again)
    assert torch.initial_seed() == 123  # the caller's global generator is left as it was


def test_lr_decays_linearly_over_the_last_share_of_the_steps_as_pix2pix():
    from gem3d.training.train_config import lr_factor

    cfg = TrainConfig(steps=10, lr_decay=0.5)
    factors = [lr_factor(cfg, step) for step in range(10)]
    assert factors[:5] == [1.0] * 5  # pix2pix's n_epochs at the full rate
    assert factors[5:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])  # 1 - (step + 1 - start) / (decay + 1)
    assert [lr_factor(TrainConfig(steps=10), s) for s in range(10)] == [1.0] * 10
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay=1.5)


def test_the_loop_applies_the_decay(tmp_path):
    net = tiny_net()
    label = torch.randint(-1, 4, (1, 8, 16, 16), generator=torch.Generator().manual_seed(1))
    lines = []
    train(net, p2p.make_loss(100.0, 3), lambda step, g, items: {"label": label, "image": torch.zeros(1, 1, 8, 16, 16)},
          TrainConfig(steps=4, lr=1e-3, lr_decay=0.5, ema_decay=0.0, log_every=1, checkpoint_every=4),
          tmp_path / "state.ckpt", kind="pix2pix3d", model_args=model_args(net), log=lines.append)
    logged = [float(line.split("| lr ")[1].split(" ")[0]) for line in lines if line.startswith("step ")]
    assert logged == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3], rel=1e-2)  # the lr each step ran with
