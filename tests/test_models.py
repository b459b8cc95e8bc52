"""Networks on tiny CPU configs: shapes, stage-1 == stage-2 at init, build_model round trip."""

import dataclasses
import json

import pytest
import torch

from gem3d.models import (
    AutoencoderKL, UNet, UNetConfig, VAEConfig, build_model, count_parameters, from_stage1, model_args,
    model_kind, position_embedding, timestep_embedding,
)
from gem3d.models.pseudo3d import SliceAxisConv

torch.set_num_threads(1)

TINY = dict(in_channels=3, out_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(1,), head_dim=4, norm_groups=4)


def tiny_unet(**overrides) -> UNetConfig:
    return UNetConfig(**{**TINY, **overrides})


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.1, only_slice_axis: bool = False):
    """Add noise to the weights so zero/identity initialisations cannot hide a wiring mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only_slice_axis and "slice_axis" not in name:
                continue
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- VAE -------------------------------------------------------------------------------------

@pytest.mark.parametrize("channel_mult,f", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_vae_shapes_and_kl(channel_mult, f):
    cfg = VAEConfig(base_channels=8, channel_mult=channel_mult, num_res_blocks=1, norm_groups=4)
    assert cfg.downsampling_factor == f
    vae = AutoencoderKL(cfg).eval()
    x = rand(2, 1, 16, 16)
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 4, 16 // f, 16 // f)
        z1 = post.sample(torch.Generator().manual_seed(1))
        z2 = post.sample(torch.Generator().manual_seed(1))
        assert torch.equal(z1, z2) and not torch.equal(z1, post.mode())
        kl = post.kl()
        assert kl.shape == (2,) and (kl >= 0).all()
        assert vae.decode(z1).shape == x.shape
        recon, post2 = vae(x, sample=False)
        assert recon.shape == x.shape and torch.allclose(post2.mean, post.mean)


def test_vae_rejects_bad_input():
    vae = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 1, 9, 8))
    with pytest.raises(ValueError, match="expects"):
        vae.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(base_channels=12, norm_groups=8)


# ---- UNet shapes -----------------------------------------------------------------------------

def test_unet_2d_and_3d_shapes():
    net = perturb(UNet(tiny_unet(scale_shift_norm=True)), seed=0).eval()
    with torch.no_grad():
        assert net(rand(2, 3, 8, 8), torch.tensor([5, 900])).shape == (2, 2, 8, 8)
        x = rand(2, 3, 4, 8, 8)
        per_window = net(x, torch.tensor([5, 900]))
        per_slice = net(x, torch.tensor([[5] * 4, [900] * 4]))
        assert per_window.shape == per_slice.shape == (2, 2, 4, 8, 8)
        assert torch.allclose(per_window, per_slice, atol=1e-6)
        mixed = net(x, torch.tensor([[5, 100, 500, 900], [1, 2, 3, 4]]))
        assert not torch.allclose(mixed, per_slice)
    with pytest.raises(ValueError, match="timesteps"):
        net(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        net(rand(1, 3, 7, 8), torch.tensor([1]))


def test_stage1_window_is_slicewise_2d():
    """Stage 1 on a window == the 2D net on each slice with its own timestep."""
    net = perturb(UNet(tiny_unet()), seed=1).eval()
    x, t = rand(2, 3, 4, 8, 8), torch.randint(0, 1000, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        window = net(x, t)
        for i in range(4):
            assert torch.allclose(window[:, :, i], net(x[:, :, i], t[:, i]), atol=1e-5)


# ---- pseudo-3D -------------------------------------------------------------------------------

@pytest.mark.parametrize("per_slice_t", [False, True])
def test_stage2_from_stage1_reproduces_stage1(per_slice_t):
    stage1 = perturb(UNet(tiny_unet()), seed=2).eval()
    stage2 = from_stage1(stage1).eval()
    assert stage2.config.slice_axis and not stage1.config.slice_axis
    x = rand(2, 3, 4, 8, 8)
    t = torch.tensor([[3, 40, 500, 999], [7, 7, 7, 7]]) if per_slice_t else torch.tensor([3, 999])
    with torch.no_grad():
        out1, out2 = stage1(x, t), stage2(x, t)
    assert out1.abs().max() > 1e-3  # the weights were perturbed: a non-trivial output
    assert torch.allclose(out1, out2, atol=1e-5)
    # ... and the test can fail: a perturbed slice-axis layer changes the output
    with torch.no_grad():
        perturb(stage2, seed=3, only_slice_axis=True)
        assert not torch.allclose(out1, stage2(x, t), atol=1e-4)


def test_load_stage1_from_state_dict_and_f1():
    stage1 = perturb(UNet(tiny_unet()), seed=4).eval()
    stage2 = UNet(tiny_unet(slice_axis=True)).load_stage1(stage1.state_dict()).eval()
    x, t = rand(1, 3, 1, 8, 8), torch.tensor([10])  # a window of one slice is still valid
    with torch.no_grad():
        assert torch.allclose(stage1(x, t), stage2(x, t), atol=1e-5)
    with pytest.raises(ValueError, match="windows"):
        stage2(rand(1, 3, 8, 8), t)


def test_only_stage2_mixes_slices():
    stage1 = perturb(UNet(tiny_unet()), seed=5).eval()
    stage2 = perturb(from_stage1(stage1), seed=6, only_slice_axis=True).eval()
    x, t = rand(1, 3, 4, 8, 8), torch.tensor([300])
    x_changed = x.clone()
    x_changed[:, :, 0] += 1.0
    with torch.no_grad():
        assert torch.allclose(stage1(x, t)[:, :, 3], stage1(x_changed, t)[:, :, 3])
        assert not torch.allclose(stage2(x, t)[:, :, 3], stage2(x_changed, t)[:, :, 3], atol=1e-5)


def test_load_stage1_rejects_wrong_keys():
    stage1_state = UNet(tiny_unet()).state_dict()
    stage2 = UNet(tiny_unet(slice_axis=True))
    extra = {**stage1_state, "bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected keys.*bogus.weight"):
        stage2.load_stage1(extra)
    missing = dict(stage1_state)
    del missing["time_embed.0.weight"]
    with pytest.raises(ValueError, match="missing keys.*time_embed.0.weight"):
        stage2.load_stage1(missing)
    with pytest.raises(ValueError, match="unexpected keys.*slice_axis"):
        UNet(tiny_unet()).load_stage1(stage2)  # stage-2 weights do not fit a 2D net
    wider = UNet(tiny_unet(model_channels=16))
    with pytest.raises(ValueError, match="shape"):
        stage2.load_stage1(wider)
    with pytest.raises(ValueError, match="config"):
        from_stage1(stage1_state)


def test_slice_axis_parameters_and_conv_count():
    cfg = tiny_unet(slice_axis=True, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2))
    net = UNet(cfg)
    names = {n for n, _ in net.named_slice_axis_parameters()}
    assert names and all("slice_axis" in n for n in names)
    assert {id(p) for p in net.slice_axis_parameters()} == {
        id(p) for n, p in net.named_parameters() if "slice_axis" in n}
    assert count_parameters(net) - count_parameters(UNet(dataclasses.replace(cfg, slice_axis=False))) == sum(
        p.numel() for p in net.slice_axis_parameters())
    levels = len(cfg.channel_mult)
    res_blocks = levels * cfg.num_res_blocks + 2 + levels * (cfg.num_res_blocks + 1)  # encoder + middle + decoder
    resamples = 2 * (levels - 1)
    convs = [m for m in net.modules() if isinstance(m, SliceAxisConv)]
    assert len(convs) == 1 + 2 * res_blocks + resamples + 1


def test_gradient_checkpointing_same_gradients():
    x, t = rand(1, 3, 2, 8, 8), torch.tensor([[1, 500]])
    grads, state = [], perturb(UNet(tiny_unet(slice_axis=True)), seed=7).state_dict()
    for use_checkpoint in (False, True):
        net = UNet(tiny_unet(slice_axis=True, use_checkpoint=use_checkpoint)).train()
        net.load_state_dict(state)
        net(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- slice model: position context -----------------------------------------------------------

def test_position_context_changes_output():
    net = perturb(UNet(tiny_unet(in_channels=4, out_channels=4, context_dim=16, attention_levels=(0, 1))),
                  seed=8).eval()
    x, t = rand(2, 4, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        a = net(x, t, position_embedding(torch.tensor([0.1, 0.1]), dim=16))
        b = net(x, t, position_embedding(torch.tensor([0.9, 0.9]), dim=16))
    assert a.shape == x.shape and not torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        net(x, t)


def test_embeddings():
    e = timestep_embedding(torch.tensor([0, 10, 999]), 32)
    assert e.shape == (3, 32) and torch.allclose(e[0, :16], torch.ones(16))
    p = position_embedding(torch.linspace(0, 1, 5))
    assert p.shape == (5, 128) and not torch.allclose(p[0], p[-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        position_embedding(torch.tensor([1.5]))


# ---- registry --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,config", [
    ("vae", VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)),
    ("unet", tiny_unet(slice_axis=True, context_dim=8)),
])
def test_build_model_round_trip(kind, config):
    model = build_model(kind, dataclasses.asdict(config))
    args = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples come back as lists
    rebuilt = build_model(kind, args)
    assert rebuilt.config == config and model_kind(rebuilt) == kind
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    assert json.loads(json.dumps(model_args(model))) == model_args(model)


def test_build_model_rejects_unknown():
    with pytest.raises(ValueError, match="allowed.*unet.*vae"):
        build_model("gan", {})
    with pytest.raises(ValueError, match="unknown unet model_args.*'widht'.*allowed"):
        build_model("unet", {**TINY, "widht": 3})
    with pytest.raises(ValueError, match="attention_levels"):
        build_model("unet", {**TINY, "attention_levels": [5]})


def test_paper_configs_parameter_counts():
    """Build on the meta device (no memory, no init cost) and report the sizes."""
    with torch.device("meta"):
        vol2 = UNet(UNetConfig.paper_volume(slice_axis=True))
        slice_model = UNet(UNetConfig.paper_slice())
        vae = AutoencoderKL(VAEConfig.paper())
    vol_total, vol_slice = count_parameters(vol2), sum(p.numel() for p in vol2.slice_axis_parameters())
    print(f"\npaper volume stage 2: {vol_total / 1e6:.1f}M params, {vol_slice / 1e6:.1f}M slice-axis "
          f"(authors: 368M / 93.8M); slice model {count_parameters(slice_model) / 1e6:.1f}M; "
          f"VAE {count_parameters(vae) / 1e6:.1f}M")
    assert VAEConfig.paper().downsampling_factor == 8
    assert UNetConfig.paper_baseline().in_channels == 8 and UNetConfig.paper_volume().in_channels == 12
    assert 0 < vol_slice < vol_total


def test_sdpa_splits_huge_batches_exactly(monkeypatch):
    """Batches over the CUDA kernels' grid limit go through in equal chunks with the same result."""
    import torch.nn.functional as F

    from gem3d.models import attention

    q, k, v = (torch.randn(7, 2, 5, 4) for _ in range(3))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 3)
    torch.testing.assert_close(attention.sdpa(q, k, v), real(q, k, v))
    assert calls == [3, 3, 1]
    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 7)
    calls.clear()
    attention.sdpa(q, k, v)
    assert calls == [7]
