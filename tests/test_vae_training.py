"""VAE training terms: patch discriminator (hinge, adaptive weight, start step), LPIPS, exported model, sharpness."""

from __future__ import annotations

import pytest
import torch

from gem3d.config import config_from_dict
from gem3d.data.latents import load_vae
from gem3d.data.slice_store import SliceStore, build_slice_store
from gem3d.io import InputError, read_json
from gem3d.models import AdversarialVAE, AdversarialVAEConfig, AutoencoderKL, VAEConfig
from gem3d.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from gem3d.paths import Paths
from gem3d.training import vae_training as vt
from gem3d.training.checkpoint import load_checkpoint

from conftest import TINY_CONFIG

TINY_VAE = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4)
ADVERSARIAL = {"weight": 0.5, "start": 4, "layers": 2, "base_channels": 8}


def tiny_pair(seed=0) -> AdversarialVAE:
    torch.manual_seed(seed)
    return AdversarialVAE(AdversarialVAEConfig(vae=TINY_VAE, discriminator=dict(layers=2, base_channels=8)))


def test_patch_discriminator_gives_one_logit_per_patch():
    d = PatchDiscriminator(DiscriminatorConfig(layers=3, base_channels=8))
    assert d(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 6, 6)  # 64 / 2**3 - 2
    assert DiscriminatorConfig(layers=3).min_input_size() == 24
    with pytest.raises(ValueError, match="needs slices of at least 24x24"):
        d(torch.zeros(1, 1, 16, 16))


def test_generator_term_does_not_train_the_discriminator_and_back():
    net = tiny_pair()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    recon, _, g_logits, d_loss = net(x)
    torch.testing.assert_close(g_logits, net.discriminator(recon))  # the same discriminator, detached weights
    vae_params, d_params = list(net.vae.parameters()), list(net.discriminator.parameters())
    grads = torch.autograd.grad(-g_logits.mean(), vae_params + d_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in grads[len(vae_params):])  # the generator term: no gradient to D
    assert any(g is not None and g.abs().sum() > 0 for g in grads[:len(vae_params)])
    grads = torch.autograd.grad(d_loss, vae_params + d_params, allow_unused=True)
    assert all(g is None for g in grads[:len(vae_params)])  # the discriminator term: no gradient to the VAE
    assert all(g is not None for g in grads[len(vae_params):])


def test_hinge_and_adaptive_weight_by_hand():
    from gem3d.models.discriminator import hinge_loss

    assert float(hinge_loss(torch.tensor([2.0, 0.0]), torch.tensor([-3.0, 0.5]))) == pytest.approx(0.5 * (0.5 + 0.75))
    w = torch.ones(3, requires_grad=True)
    nll, g = (3.0 * w).sum(), (-4.0 * w).sum()  # gradient norms 3 sqrt(3) and 4 sqrt(3)
    assert float(vt.adaptive_weight(nll, g, w, 1e4)) == pytest.approx(3 / (4 + 1e-4 / 3 ** 0.5), rel=1e-6)
    assert float(vt.adaptive_weight(100 * nll, g, w, 10.0)) == 10.0  # clamped


class MarkedSlices:
    """A SliceSampler stand-in whose slices say what they are: image of row r = r + 1, mask of row r = -(r + 1)."""

    def __init__(self, n=50, size=4):
        self.n, self.store = n, type("Store", (), {"slice_size": size})()

    def __len__(self):
        return self.n

    def images(self, rows):
        return torch.tensor(rows + 1.0, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 4, 4).clone()

    def masks(self, rows):
        return -self.images(rows)


def _global_batches(world: int, micro: int, steps=6, batch=8, fraction=0.5):
    """Every step's items, all processes and micro-batches of the split world x micro joined in global order."""
    from gem3d.training.batching import batch_plan, shard_items
    from gem3d.training.loop import TrainConfig

    plan = batch_plan(TrainConfig(batch_size=batch, micro_batch=micro), world)
    source = vt.vae_batch_source(MarkedSlices(), 0, batch, fraction)
    return [torch.cat([source(step, torch.Generator(), shard_items(plan, rank, a))["x"][:, 0, 0, 0]
                       for rank in range(world) for a in range(plan.accumulate)]) for step in range(steps)]


def test_mask_share_of_a_step_does_not_depend_on_the_split():
    """Issue #24.1: round(micro x mask_fraction) masks per micro-batch gave none at micro_batch 1 (round(0.5) = 0);
    the image-or-mask choice is per global item, so every split of the global batch draws the same items."""
    one_by_eight = _global_batches(1, 8)
    assert all((x < 0).sum() == 4 for x in one_by_eight)  # global 8 x 0.5: 4 masks in every step
    for world, micro in ((8, 1), (2, 4), (1, 1), (4, 2)):
        assert all(torch.equal(a, b) for a, b in zip(one_by_eight, _global_batches(world, micro))), (world, micro)
    assert not torch.equal(one_by_eight[0], one_by_eight[1])  # a new draw each step
    shares = [float((x < 0).float().mean()) for x in _global_batches(1, 1, steps=400, batch=3, fraction=0.5)]
    assert {round(v, 4) for v in shares} == {0.3333, 0.6667}
    assert sum(shares) / len(shares) == pytest.approx(0.5, abs=0.05)


def test_micro_batches_of_one_train_on_masks_in_the_loop(tmp_path):
    """The training loop at global batch 8, micro_batch 1 (8 accumulated micro-batches): 4 masks per step."""
    from gem3d.training.loop import TrainConfig, train

    seen = {}
    net = torch.nn.Conv2d(1, 1, 1)

    def loss_fn(model, batch, g):
        seen.setdefault(int(batch["step"]), []).append(batch["x"][:, 0, 0, 0])
        return model(batch["x"]).pow(2).mean(), {}

    cfg = TrainConfig(steps=3, batch_size=8, micro_batch=1, ema_decay=0.0, log_every=1, checkpoint_every=3)
    train(net, loss_fn, vt.vae_batch_source(MarkedSlices(), 0, 8, 0.5), cfg, tmp_path / "s.ckpt", kind="t",
          model_args={})
    assert sorted(seen) == [0, 1, 2]
    for step, xs in seen.items():
        assert len(xs) == 8 and int((torch.cat(xs) < 0).sum()) == 4, step


def test_adaptive_weight_is_clamped_in_pixel_mean_units():
    """Issue #24.3: latent diffusion clamps at 1e4 a ratio computed on a pixel-SUMMED loss; ours is the pixel mean,
    so the same clamp is 1e4 / (c h w): 4.3 at 48 x 48 (the hippocampus run), 0.038 at 512 x 512."""
    adv = type("Adv", (), {"max_adaptive_weight": 1e4})()
    assert vt.max_adaptive_weight(adv, torch.zeros(2, 1, 48, 48)) == pytest.approx(4.34, abs=0.01)
    assert vt.max_adaptive_weight(adv, torch.zeros(2, 1, 512, 512)) == pytest.approx(0.038, abs=0.001)

    def weight(clamp):
        raw = {**TINY_CONFIG, "vae": {**TINY_CONFIG["vae"], "adversarial": {**ADVERSARIAL, "start": 0,
                                                                            "max_adaptive_weight": clamp}}}
        cfg = config_from_dict(raw, source="tiny", check_paths=False)
        net = tiny_pair()
        torch.manual_seed(1)
        x = torch.rand(2, 1, 32, 32) * 2 - 1
        return float(vt.make_loss(cfg)(net, {"x": x, "step": 0}, None)[1]["adaptive_weight"])

    free = weight(1e12)  # the gradient-norm ratio itself
    assert 1 / 1024 < free < 1e4 / 1024
    assert weight(1.0) == pytest.approx(1 / 1024)  # 1.0 in latent diffusion's units: 1 / 1024 at 32 x 32
    assert weight(1e4) == pytest.approx(free)  # 1e4 / 1024 = 9.8: above the ratio, no clamp


def _cfg(tmp_path, **vae):
    raw = {**TINY_CONFIG, "vae": {**TINY_CONFIG["vae"], **vae}}
    return config_from_dict(raw, source="tiny", check_paths=False)


def _train(cfg, store, where, name="run"):
    out = where / name
    out.mkdir(exist_ok=True)
    metrics = vt.train_vae(cfg, store, out / "vae.ckpt", out / "vae.pt", out / "vae_metrics.json")
    return out, metrics


@pytest.fixture
def store(trained_run):
    workdir, cfg = trained_run
    return SliceStore(workdir / "results" / cfg.name / "slices")


TRAIN = {**TINY_CONFIG["vae"]["train"], "steps": 6, "log_every": 1, "checkpoint_every": 3}


def test_before_start_the_loss_is_todays_then_it_is_not(store, tmp_path):
    plain, _ = _train(_cfg(tmp_path, train=TRAIN), store, tmp_path, "plain")
    adv, metrics = _train(_cfg(tmp_path, train=TRAIN, adversarial=ADVERSARIAL), store, tmp_path, "adv")
    before = load_checkpoint(plain / "vae.ckpt")["history"]["losses"]
    after = load_checkpoint(adv / "vae_adversarial.ckpt")["history"]["losses"]
    assert [s for s, _ in before] == [1, 2, 3, 4, 5, 6] == [s for s, _ in after]
    assert after[:4] == before[:4]  # steps 0..3 (< start 4): exactly L1 + KL, the same updates
    assert after[4][1] != before[4][1]
    assert metrics["terms"] == {"l1": 1.0, "kl_weight": 1e-6, "perceptual_weight": 0.0, "adversarial_weight": 0.5,
                                "adversarial_start": 4}
    assert 0 < metrics["hf_energy_ratio"] < 10


def test_resume_is_bit_exact_with_the_adversarial_term(store, tmp_path):
    adversarial = {**ADVERSARIAL, "start": 2}
    whole, _ = _train(_cfg(tmp_path, train=TRAIN, adversarial=adversarial), store, tmp_path, "whole")
    split, _ = _train(_cfg(tmp_path, train={**TRAIN, "steps": 3}, adversarial=adversarial), store, tmp_path, "split")
    _train(_cfg(tmp_path, train=TRAIN, adversarial=adversarial), store, tmp_path, "split")  # resumes at step 3
    a, b = (load_checkpoint(p / "vae_adversarial.ckpt") for p in (whole, split))
    assert a["step"] == b["step"] == 6 and a["kind"] == "vae_adversarial"
    assert any(k.startswith("discriminator.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["history"]["losses"] == b["history"]["losses"]


def test_exported_model_is_the_plain_vae(store, tmp_path):
    out, metrics = _train(_cfg(tmp_path, train=TRAIN, adversarial=ADVERSARIAL), store, tmp_path)
    model = load_checkpoint(out / "vae.pt", expect_kind="vae")
    state = load_checkpoint(out / "vae_adversarial.ckpt")
    assert not any("discriminator" in k for k in model["state_dict"]) and "optimizer" not in model
    assert model["model_args"] == state["model_args"]["vae"]
    for key, value in model["state_dict"].items():
        assert torch.equal(value, state["state_dict"][f"vae.{key}"])
    loaded = load_vae(out / "vae.pt")
    assert isinstance(loaded.model, AutoencoderKL) and loaded.scale_factor == pytest.approx(metrics["scale_factor"])
    assert model["extra"]["test_hf_energy_ratio"] == pytest.approx(metrics["hf_energy_ratio"])
    assert not (out / "vae.ckpt").exists()  # the pair trains in its own state file


def test_switching_the_term_back_exports_the_matching_state(store, tmp_path):
    plain, adversarial = _cfg(tmp_path, train=TRAIN), _cfg(tmp_path, train=TRAIN, adversarial=ADVERSARIAL)
    out, _ = _train(plain, store, tmp_path)
    _train(adversarial, store, tmp_path)
    pair = load_checkpoint(out / "vae_adversarial.ckpt")["state_dict"]
    assert all(torch.equal(v, pair[f"vae.{k}"]) for k, v in load_checkpoint(out / "vae.pt")["state_dict"].items())
    history = load_checkpoint(out / "vae.ckpt")["history"]
    _train(plain, store, tmp_path)  # the finished plain state is exported again (not retrained, not skipped)
    state = load_checkpoint(out / "vae.ckpt")
    assert state["history"] == history
    assert all(torch.equal(v, state["state_dict"][k]) for k, v in load_checkpoint(out / "vae.pt")["state_dict"].items())


def test_adversarial_settings_that_cannot_work_are_refused(store, tmp_path):
    with pytest.raises(InputError, match=r"vae\.adversarial\.start: 6 is not below vae\.train\.steps 6"):
        _train(_cfg(tmp_path, train=TRAIN, adversarial={**ADVERSARIAL, "start": 6}), store, tmp_path)
    with pytest.raises(InputError, match=r"vae\.adversarial\.layers: 3 layers need slices of at least 24 pixels"):
        _train(_cfg(tmp_path, train=TRAIN, adversarial={**ADVERSARIAL, "layers": 3}), store, tmp_path)
    with pytest.raises(InputError, match=r"config key vae\.perceptual_weight: 1\.0 needs VGG-16 weights"):
        _train(_cfg(tmp_path, train=TRAIN, perceptual_weight=1.0), store, tmp_path)


@pytest.fixture
def alexnet_weights(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    path = tmp_path / "alex_features.pth"
    torch.save(alexnet(weights=None).features.state_dict(), path)  # random weights, the real architecture
    return path


@pytest.fixture
def vgg_weights(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path / "vgg16_features.pth"
    torch.save(make_layers(cfgs["D"]).state_dict(), path)  # VGG-16's features, random weights
    return path


def test_lpips_term_is_vgg_not_the_evaluations_alexnet(alexnet_weights, vgg_weights, tmp_path):
    """Issue #24.4: the training term used the evaluation's own LPIPS network (AlexNet, Table 2's metric). It is
    VGG-LPIPS, as latent diffusion trains it, from vae.perceptual_vgg_weights, whatever the evaluation uses; a VAE
    term equal to the reported metric (evaluation.lpips_net vgg) is refused in one line."""
    raw = {**TINY_CONFIG, "evaluation": {**TINY_CONFIG["evaluation"], "lpips_backbone_weights": str(alexnet_weights)},
           "vae": {**TINY_CONFIG["vae"], "perceptual_weight": 1.0, "perceptual_vgg_weights": str(vgg_weights)}}
    model, record = vt._lpips(config_from_dict(raw, source="tiny"))
    assert model.net_name == "vgg" and record.startswith("vgg:")
    refused = {**raw, "evaluation": {**raw["evaluation"], "lpips_net": "vgg",
                                     "lpips_backbone_weights": str(vgg_weights)}}
    with pytest.raises(InputError, match=r"vae\.perceptual_weight: 1\.0 trains with VGG-LPIPS, the LPIPS that "
                                         r"evaluation\.lpips_net vgg reports in Table 2"):
        config_from_dict(refused, source="tiny")
    with pytest.raises(InputError, match=r"vae\.perceptual_vgg_weights: weights missing at"):
        config_from_dict({**raw, "vae": {**raw["vae"], "perceptual_vgg_weights": str(tmp_path / "none.pth")}},
                         source="tiny")


def test_lpips_term_adds_weighted_lpips(vgg_weights, tmp_path):
    from gem3d.evaluation.paired import load_lpips

    lpips = load_lpips("vgg", vgg_weights)
    raw = {**TINY_CONFIG, "vae": {**TINY_CONFIG["vae"], "perceptual_vgg_weights": str(vgg_weights)}}
    plain = config_from_dict(raw, source="tiny", check_paths=False)
    perceptual = config_from_dict({**raw, "vae": {**raw["vae"], "perceptual_weight": 2.0}}, source="tiny",
                                  check_paths=False)
    torch.manual_seed(0)
    net = AutoencoderKL(VAEConfig(**TINY_VAE))
    batch = {"x": torch.rand(2, 1, 32, 32) * 2 - 1, "step": 0}
    torch.manual_seed(1)
    base, _ = vt.make_loss(plain)(net, batch, None)
    torch.manual_seed(1)
    loss, metrics = vt.make_loss(perceptual, lpips)(net, batch, None)
    torch.manual_seed(1)
    recon, _ = net(batch["x"])
    expected = lpips(recon, batch["x"]).mean().detach()
    assert float(metrics["lpips"]) == pytest.approx(float(expected)) and float(expected) > 0
    assert float(loss.detach()) == pytest.approx(float(base.detach()) + 2.0 * float(expected), rel=1e-6)
    loss.backward()  # the LPIPS term trains the decoder, not LPIPS
    assert net.decoder.conv_out.weight.grad is not None
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_term_in_the_stage(trained_run, vgg_weights, tmp_path, caplog):
    """32 x 32 slices: the config's VGG weights file is used and recorded in the state."""
    workdir, cfg = trained_run
    paths = Paths(cfg)
    build_slice_store(workdir / paths.preprocessed_dataset, workdir / paths.raw_dataset, tmp_path / "slices32", 32,
                      cfg.data.labels, read_json(workdir / paths.split), cfg.preprocess.configuration)
    raw = {**TINY_CONFIG, "preprocess": {**TINY_CONFIG["preprocess"], "slice_size": 32},
           "vae": {**TINY_CONFIG["vae"], "perceptual_weight": 1.0, "perceptual_vgg_weights": str(vgg_weights),
                   "train": {**TRAIN, "steps": 2}}}
    with caplog.at_level("INFO", logger="gem3d.training"):
        out, metrics = _train(config_from_dict(raw, source="tiny", check_paths=False),
                              SliceStore(tmp_path / "slices32"), tmp_path)
    assert metrics["terms"]["perceptual_weight"] == 1.0
    assert "lpips" in caplog.text
    inputs = load_checkpoint(out / "vae.ckpt")["fingerprint"]["inputs"]
    assert inputs["lpips"].startswith("vgg:")
