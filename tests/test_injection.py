"""Condition injection of the volume UNet (paper Table 3): concat, ControlNet branch, cross-attention.

Tiny CPU networks; x = concat(x_t, mask, informed), C channels each.
"""

import dataclasses
import json

import pytest
import torch

from gem3d.models import UNet, UNetConfig, build_model, count_parameters, from_stage1, model_args

torch.set_num_threads(1)

C = 2  # latent channels
TINY = dict(in_channels=3 * C, out_channels=C, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(1,), head_dim=4, norm_groups=4)
MODES = ("concat", "control", "crossattn")
NEW_PARTS = ("control.", "informed_encoder.")


def tiny(**overrides) -> UNetConfig:
    return UNetConfig(**{**TINY, **overrides})


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.1, skip=lambda name: False):
    """Add noise to the weights so zero/identity initialisations cannot hide a wiring mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not skip(name):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def is_control_zero_layer(name: str) -> bool:
    return name.startswith("control.") and ("zero_conv" in name or "hint_conv" in name)


def with_channels(x: torch.Tensor, part: int, value: torch.Tensor) -> torch.Tensor:
    """x with latent `part` (0 noisy, 1 mask, 2 informed) replaced."""
    x = x.clone()
    x[:, part * C:(part + 1) * C] = value
    return x


# ---- every mode ------------------------------------------------------------------------------

@pytest.mark.parametrize("injection", MODES)
def test_shapes_and_build_model_round_trip(injection):
    net = perturb(UNet(tiny(injection=injection)), seed=0).eval()
    args = json.loads(json.dumps(model_args(net)))
    assert args["injection"] == injection
    rebuilt = build_model("unet", args).eval()
    rebuilt.load_state_dict(net.state_dict())
    x4, x5, t = rand(2, 3 * C, 8, 8), rand(2, 3 * C, 3, 8, 8, seed=1), torch.tensor([5, 900])
    with torch.no_grad():
        out4, out5 = net(x4, t), net(x5, t)
        assert out4.shape == (2, C, 8, 8) and out5.shape == (2, C, 3, 8, 8)
        assert out4.abs().max() > 1e-3
        assert torch.equal(rebuilt(x4, t), out4) and torch.equal(rebuilt(x5, t), out5)
    has_new = {prefix: any(k.startswith(prefix) for k in net.state_dict()) for prefix in NEW_PARTS}
    assert has_new == {"control.": injection == "control", "informed_encoder.": injection == "crossattn"}


def test_concat_model_args_without_injection_still_build():
    """Checkpoints written before the field existed: same keys, same outputs."""
    net = perturb(UNet(tiny(slice_axis=True)), seed=1).eval()
    old_args = json.loads(json.dumps(model_args(net)))
    del old_args["injection"]
    old = build_model("unet", old_args).eval()
    assert old.config.injection == "concat" and old.config.main_in_channels == 3 * C
    old.load_state_dict(net.state_dict())  # strict: no extra or missing entries
    x, t = rand(1, 3 * C, 2, 8, 8), torch.tensor([17])
    with torch.no_grad():
        assert torch.equal(old(x, t), net(x, t))


@pytest.mark.parametrize("overrides,field", [
    (dict(injection="film"), "injection"),
    (dict(injection="control", in_channels=2 * C), "in_channels"),
    (dict(injection="crossattn", in_channels=3 * C + 1), "in_channels"),
    (dict(injection="crossattn", attention_levels=()), "attention_levels"),
    (dict(injection="crossattn", context_dim=6), "context_dim"),
])
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)
    with pytest.raises(ValueError, match=field):
        build_model("unet", {**TINY, **overrides})


# ---- control ---------------------------------------------------------------------------------

def test_control_at_init_is_the_main_unet_on_the_noisy_latent():
    net = UNet(tiny(injection="control"))
    # ControlNet initialisation: the branch's encoder starts as a copy of the main encoder
    main_enc = {**net.input_blocks.state_dict(), **{f"m.{k}": v for k, v in net.middle_block.state_dict().items()}}
    ctrl_enc = {**net.control.input_blocks.state_dict(),
                **{f"m.{k}": v for k, v in net.control.middle_block.state_dict().items()}}
    assert main_enc.keys() == ctrl_enc.keys() and all(torch.equal(main_enc[k], ctrl_enc[k]) for k in main_enc)

    perturb(net, seed=2, skip=is_control_zero_layer).eval()  # a "trained" network, zero convs still zero
    main_only = UNet(tiny(in_channels=C)).eval()  # the same UNet without the branch, reading x_t alone
    main_only.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("control.")})
    x, t = rand(2, 3 * C, 3, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        reference = main_only(x[:, :C], t)
        assert torch.allclose(net(x, t), reference, atol=1e-6)
        perturb(net, seed=3, skip=lambda n: not is_control_zero_layer(n))  # ... and the test can fail
        assert not torch.allclose(net(x, t), reference, atol=1e-4)


def test_control_zero_convs_open_with_training():
    """Step 1 opens the output zero convs; the hint conv behind them gets a gradient from step 2 on,
    after which the output depends on the mask and informed channels."""
    torch.manual_seed(0)
    net = perturb(UNet(tiny(injection="control")), seed=4, skip=is_control_zero_layer).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, t = rand(2, 3 * C, 8, 8, seed=5), torch.tensor([10, 400])
    x_mask, x_informed = with_channels(x, 1, rand(2, C, 8, 8, seed=6)), with_channels(x, 2, rand(2, C, 8, 8, seed=7))

    def step():
        opt.zero_grad()
        net(x, t).sub(rand(2, C, 8, 8, seed=8)).square().mean().backward()
        opt.step()

    def reads(x_other):
        with torch.no_grad():
            return not torch.allclose(net(x, t), net(x_other, t), atol=1e-6)

    assert not reads(x_mask) and not reads(x_informed)
    step()
    ctrl = net.control
    assert all(z.weight.abs().max() > 0 for z in [*ctrl.zero_convs, ctrl.middle_zero_conv])
    assert ctrl.hint_conv.weight.abs().max() == 0
    assert not reads(x_mask)
    step()
    assert ctrl.hint_conv.weight.abs().max() > 0
    assert reads(x_mask) and reads(x_informed)


# ---- crossattn -------------------------------------------------------------------------------

def test_crossattn_reads_mask_at_input_and_informed_per_frame():
    net = perturb(UNet(tiny(injection="crossattn")), seed=9).eval()
    assert net.config.context_dim == TINY["model_channels"]  # the default token width
    assert net.input_blocks[0][0].conv.in_channels == 2 * C  # x_t + mask; the informed slice is attended to
    x, t = rand(1, 3 * C, 3, 8, 8, seed=10), torch.tensor([250])
    informed0 = x.clone()
    informed0[:, 2 * C:, 0] += 1.0  # the informed latent of frame 0 only
    mask2 = x.clone()
    mask2[:, C:2 * C, 2] += 1.0
    with torch.no_grad():
        out = net(x, t)
        changed = net(informed0, t)
        assert not torch.allclose(changed[:, :, 0], out[:, :, 0], atol=1e-5)
        assert torch.allclose(changed[:, :, 1:], out[:, :, 1:], atol=1e-6)  # each frame encodes its own slice
        assert not torch.allclose(net(mask2, t)[:, :, 2], out[:, :, 2], atol=1e-5)
        x4 = x[:, :, 0]
        assert not torch.allclose(net(with_channels(x4, 2, rand(1, C, 8, 8, seed=11)), t), net(x4, t), atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        net(x, t, context=torch.zeros(1, TINY["model_channels"]))


# ---- stage 2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("injection", ["control", "crossattn"])
def test_stage2_from_stage1(injection):
    stage1 = perturb(UNet(tiny(injection=injection)), seed=12).eval()
    stage2 = from_stage1(stage1).eval()
    assert stage2.config.slice_axis and stage2.config.injection == injection
    x, t = rand(2, 3 * C, 4, 8, 8, seed=13), torch.tensor([[3, 40, 500, 999], [7, 7, 7, 7]])
    with torch.no_grad():
        out1 = stage1(x, t)
        assert out1.abs().max() > 1e-3
        assert torch.allclose(stage2(x, t), out1, atol=1e-5)
        for i in range(4):  # stage 1 on a window is the 2D network on each slice
            assert torch.allclose(out1[:, :, i], stage1(x[:, :, i], t[:, i]), atol=1e-5)

    names = [n for n, _ in stage2.named_slice_axis_parameters()]
    new_parts = [n for n, _ in stage2.named_parameters() if n.startswith(NEW_PARTS)]
    assert names and new_parts and not any(n.startswith(NEW_PARTS) for n in names)
    assert not any("slice_axis" in n for n in new_parts)  # the branch / informed encoder stay 2D
    concat2 = UNet(tiny(slice_axis=True))
    assert sum(p.numel() for p in stage2.slice_axis_parameters()) == sum(
        p.numel() for p in concat2.slice_axis_parameters())
    with torch.no_grad():  # ... and the test can fail
        perturb(stage2, seed=14, skip=lambda n: "slice_axis" not in n)
        assert not torch.allclose(stage2(x, t), out1, atol=1e-4)


@pytest.mark.parametrize("injection", ["control", "crossattn"])
def test_gradient_checkpointing_same_gradients(injection):
    x, t = rand(1, 3 * C, 2, 8, 8, seed=15), torch.tensor([[1, 500]])
    state = perturb(UNet(tiny(injection=injection, slice_axis=True)), seed=16).state_dict()
    grads = []
    for flag in (False, True):
        net = UNet(tiny(injection=injection, slice_axis=True)).train()
        net.load_state_dict(state)
        net.set_grad_checkpointing(flag)
        net(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_paper_volume_parameter_counts():
    """Built on the meta device; the slice-axis layers (stage 2's trained part) are the same in every mode."""
    counts = {}
    for injection in MODES:
        with torch.device("meta"):
            net = UNet(UNetConfig.paper_volume(slice_axis=True, injection=injection))
        new = sum(p.numel() for n, p in net.named_parameters() if n.startswith(NEW_PARTS))
        counts[injection] = (count_parameters(net), sum(p.numel() for p in net.slice_axis_parameters()), new)
        print(f"\npaper volume stage 2, {injection}: {counts[injection][0] / 1e6:.1f}M params, "
              f"{counts[injection][1] / 1e6:.1f}M slice-axis, {new / 1e6:.2f}M control branch / informed encoder")
    assert len({slice_axis for _, slice_axis, _ in counts.values()}) == 1
    assert counts["concat"][2] == 0 < counts["crossattn"][2] < counts["control"][2]
    assert dataclasses.asdict(UNetConfig.paper_volume())["injection"] == "concat"
