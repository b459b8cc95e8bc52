"""The GEM-3D authors' released networks in gem3d: the oracle is ../shared/fixtures/gem3d-release-layout
(four runs in the release's exact file layout, tiny and random, and what the authors' own networks compute from
them: `reference.pt`). A loader is right when gem3d's networks, given these files, reproduce it."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from einops import rearrange

from conftest import SHARED_FIXTURES
from gem3d.diffusion import DDIMSampler, NoiseSchedule
from gem3d.io import InputError
from gem3d.models import UNet, UNetConfig, position_embedding
from gem3d.models.release_import import (LIVE, ddim_latents, import_unet, release_names, schedule_args,
                                        unet_config)
from gem3d.models.vae import VAEConfig
from gem3d.models.vae_import import import_autoencoder
from gem3d.models.weights_file import read_state_dict
from gem3d.pretrained import find_run

RELEASE = SHARED_FIXTURES / "gem3d-release-layout"
RUNS = ["brain_stage1", "brain_stage2", "brain_base_stage2", "brain_slice"]
CONCAT_RUNS = RUNS[:3]
FIXTURE_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4)

pytestmark = pytest.mark.skipif(not (RELEASE / "reference.pt").is_file(),
                                reason=f"release-layout fixture absent at {RELEASE} (set GEM3D_SHARED_FIXTURES)")


@pytest.fixture(scope="module")
def reference():
    return torch.load(RELEASE / "reference.pt", weights_only=False)  # the fixture's own file: tensors it made


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def eps_of(net: UNet, run, r: dict, x: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
    """The network's output on the fixture's batch of 16 slices, as the authors' model sees it: 2D nets on the
    16 slices; pseudo-3D ones on them as one 16-slice window; the slice model with its positions."""
    if cond is None and "cond" in r:
        cond = r["cond"]
    if "position" in r:
        return net(x[:4], t[:4], context=position_embedding(r["position"], net.config.context_dim))
    x = torch.cat([x, cond], dim=1)
    if run.pseudo3d:
        out = net(rearrange(x, "(b f) c h w -> b c f h w", f=16), torch.as_tensor(t)[:1])
        return rearrange(out, "b c f h w -> (b f) c h w")
    return net(x, t)


@pytest.mark.parametrize("name", RUNS)
@torch.no_grad()
def test_eps_of_every_run_live_and_ema(reference, name):
    r = reference[name]
    run = find_run(RELEASE / name)
    for weights, key in (("live", "eps"), ("ema", "eps_ema")):
        if key not in r:
            continue
        net, info = import_unet(run, weights)
        assert info["weights"] == weights
        assert relative_error(eps_of(net.eval(), run, r, r["x_noisy"], r["t"]), r[key]) < 1e-5, (name, weights)
    if "eps_ema" in r:  # the two differ on purpose: the right ones were taken
        net, _ = import_unet(run, "live")
        assert relative_error(eps_of(net.eval(), run, r, r["x_noisy"], r["t"]), r["eps_ema"]) > 1e-2


@torch.no_grad()
def test_first_stage_posterior_and_decoding(reference):
    for name in RUNS:
        r = reference[name]
        vae, info = import_autoencoder(find_run(RELEASE / name).checkpoint, FIXTURE_VAE)
        assert info["file_channels"] == 3
        post = vae.eval().encode(r["vae_in"][:, :1])  # 3 equal channels = one grey channel, folded
        assert relative_error(post.mean, r["vae_mean"]) < 1e-5
        assert relative_error(post.logvar, r["vae_logvar"]) < 1e-5
        assert relative_error(vae.decode(r["vae_mean"])[:, 0], r["vae_decoded"].mean(dim=1)) < 1e-5


@pytest.mark.parametrize("name", CONCAT_RUNS)
@torch.no_grad()
def test_the_authors_ddim_through_gems_sampler(reference, name):
    """10 DDIM steps, eta 0, from the fixture's x_T: their grid (901, ..., 1, landing on timestep 0)."""
    r = reference[name]
    run = find_run(RELEASE / name)
    net, _ = import_unet(run, "live")
    solver = DDIMSampler(NoiseSchedule(**schedule_args(run)), 10, eta=0.0, spacing="ldm")
    assert solver.timesteps == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    z = ddim_latents(net, run, r["cond"], r["ddim10_eta0_xT"], steps=10)
    assert relative_error(z, r["ddim10_eta0_latents"]) < 1e-5
    vae, _ = import_autoencoder(run.checkpoint, FIXTURE_VAE)
    images = vae.eval().decode(z / run.scale_factor)[:, 0]
    assert relative_error(images, r["ddim10_eta0_images"].mean(dim=1)) < 1e-5
    gem3d_grid = DDIMSampler(NoiseSchedule(**schedule_args(run)), 10, eta=0.0)  # gem3d's own grid differs
    assert gem3d_grid.timesteps[-1] == 0


@pytest.mark.parametrize("name", CONCAT_RUNS)
@torch.no_grad()
def test_conditioning_built_by_gem3d_from_the_raw_window(reference, name):
    """The mask window (BraTS ids 0..3, -1 outside) and the informed image through gem3d's own encoding paths
    (mask as grey label / 3 * 2 - 1, -1 -> -5/3; scaled posterior means) give the fixture's `cond`."""
    from gem3d.data.latents import LoadedVAE

    r = reference[name]
    run = find_run(RELEASE / name)
    model, _ = import_autoencoder(run.checkpoint, FIXTURE_VAE)
    vae = LoadedVAE(model.eval(), run.scale_factor, "sha", max_label=3)
    mask = vae.encode_labels(reference["labels"].numpy())  # (c, d, h, w)
    parts = [rearrange(mask, "c d h w -> d c h w")]
    if r["cond"].shape[1] == 8:  # GEM-3D: the informed slice's latent repeated over the window
        parts.append(vae.encode(reference["informed_image"]).expand(16, -1, -1, -1))
    cond = torch.cat(parts, dim=1)
    assert relative_error(cond, r["cond"]) < 1e-5
    net, _ = import_unet(run, "live")  # and the network's output from that conditioning
    assert relative_error(eps_of(net.eval(), run, r, r["x_noisy"], r["t"], cond), r["eps"]) < 1e-5


def _write_run(root, name: str, unet_params: dict, state: dict, target_3d: bool = False, extra_params=None):
    """A run folder in the release layout (yaml + a Lightning-like checkpoint) holding `state`."""
    target = ("ldm.modules.diffusionmodules.openaimodel_pseudo3D.UNetModel" if target_3d
              else "ldm.modules.diffusionmodules.openaimodel.UNetModel")
    params = {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012, "scale_factor": 0.18215,
              "conditioning_key": "concat", "unet_config": {"target": target, "params": unet_params},
              **(extra_params or {})}
    (root / name / "configs").mkdir(parents=True)
    (root / name / "checkpoints").mkdir()
    (root / name / "configs" / "2024-01-01T00-00-00-project.yaml").write_text(yaml.safe_dump({"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}))
    torch.save({"state_dict": state, "callbacks": {shutil.Error: {"dirpath": "x"}}},
               root / name / "checkpoints" / "last.ckpt")
    return root / name


def _release_state(net: UNet) -> dict:
    names = release_names(net)
    return {LIVE + names[k]: v.clone() for k, v in net.state_dict().items()}


def _randomise(net: UNet) -> UNet:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised outputs would hide a wrong mapping
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


@pytest.mark.parametrize("unet_params, pseudo3d", [
    ({"in_channels": 8, "out_channels": 4, "model_channels": 64, "channel_mult": [1, 2, 3],
      "num_res_blocks": 2, "attention_resolutions": [4, 2], "num_head_channels": 16}, True),
    ({"in_channels": 12, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 1, 2],
      "num_res_blocks": 1, "attention_resolutions": [1, 4], "num_heads": 2, "use_new_attention_order": True,
      "use_scale_shift_norm": True}, False),
    ({"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2],
      "num_res_blocks": 2, "attention_resolutions": [1, 2], "num_head_channels": 8, "use_spatial_transformer": True,
      "transformer_depth": 2, "context_dim": 16}, False),
])
@torch.no_grad()
def test_the_mapping_follows_the_yaml_for_other_networks(tmp_path, unet_params, pseudo3d):
    """Widths, depths, attention levels, head counts, attention order and transformer depth of any network the
    authors' code builds: every tensor of the file lands in the network the yaml describes (none left over)."""
    run_dir = _write_run(tmp_path, "run", unet_params, {}, pseudo3d)
    source = _randomise(UNet(unet_config(find_run(run_dir))))
    shutil.rmtree(run_dir)
    run = find_run(_write_run(tmp_path, "run", unet_params, _release_state(source), pseudo3d))
    net, _ = import_unet(run, "live")
    c = unet_params["in_channels"]
    x = torch.randn(1, c, 4, 8, 8) if pseudo3d else torch.randn(2, c, 8, 8)
    context = torch.randn(2, 1, unet_params["context_dim"]) if "context_dim" in unet_params else None
    kwargs = {"context": context} if context is not None else {}
    assert torch.equal(net(x, torch.tensor([300] * x.shape[0]), **kwargs),
                       source(x, torch.tensor([300] * x.shape[0]), **kwargs))
    assert net.config.attention_levels == tuple(int(torch.tensor(r).log2()) for r in
                                                sorted(unet_params["attention_resolutions"]))


def _fixture_state(name: str) -> dict:
    return read_state_dict(RELEASE / name / "checkpoints" / "last.ckpt")


def _copy_run(tmp_path, name: str, state: dict | None = None, yaml_edit=None):
    """A copy of a fixture run with another state dict or an edited yaml."""
    dest = tmp_path / name
    shutil.copytree(RELEASE / name, dest)
    if state is not None:
        torch.save({"state_dict": state}, dest / "checkpoints" / "last.ckpt")
    if yaml_edit is not None:
        path = next((dest / "configs").glob("*-project.yaml"))
        raw = yaml.safe_load(path.read_text())
        yaml_edit(raw["model"]["params"])
        path.write_text(yaml.safe_dump(raw))
    return dest


def test_missing_extra_and_misshaped_keys_are_one_line_naming_the_key(tmp_path):
    key = "model.diffusion_model.input_blocks.3.1.qkv_tem.weight"
    state = _fixture_state("brain_stage2")
    cases = [
        ({k: v for k, v in state.items() if k != key}, rf"key {key} missing"),
        ({**state, "model.diffusion_model.input_blocks.9.0.in_layers.0.weight": torch.zeros(3)},
         r"key model\.diffusion_model\.input_blocks\.9\.0\.in_layers\.0\.weight is not part of the network"),
        ({**state, key: torch.zeros(96, 64, 1)}, rf"key {key} has shape \(96, 64, 1\), .* needs \(192, 64, 1\)"),
    ]
    for i, (bad, match) in enumerate(cases):
        run = find_run(_copy_run(tmp_path / str(i), "brain_stage2", bad))
        with pytest.raises(InputError, match=match) as err:
            import_unet(run, "live")
        assert "\n" not in str(err.value)


def test_refusals_of_runs_gem3d_cannot_read(tmp_path):
    with pytest.raises(InputError, match=r"no model_ema\.\* weights \(its yaml has use_ema False\)"):
        import_unet(find_run(RELEASE / "brain_stage2"), "ema")
    run = find_run(_copy_run(tmp_path, "brain_stage1", yaml_edit=lambda p: p.update(linear_end=0.02)))
    with pytest.raises(InputError, match=r"key betas: the file's noise schedule differs from the one its yaml"):
        import_unet(run, "live")
    run = find_run(_copy_run(tmp_path / "b", "brain_stage1",
                             yaml_edit=lambda p: p["unet_config"]["params"].update(resblock_updown=True)))
    with pytest.raises(InputError, match=r"unet_config\.params\.resblock_updown True: not supported"):
        import_unet(run, "live")
    loose = tmp_path / "loose.ckpt"
    shutil.copy(RELEASE / "brain_stage1" / "checkpoints" / "last.ckpt", loose)
    with pytest.raises(InputError, match=r"loose\.ckpt: a checkpoint outside a run's checkpoints/ folder"):
        find_run(loose)
    bare = tmp_path / "bare"
    shutil.copytree(RELEASE / "brain_stage1" / "checkpoints", bare / "checkpoints")
    (bare / "configs").mkdir()
    with pytest.raises(InputError, match=r"no configs/\*-project\.yaml .* nothing is guessed"):
        find_run(bare / "checkpoints" / "last.ckpt")


def test_ldm_attention_config_refuses_what_latent_diffusion_does_not_build():
    with pytest.raises(ValueError, match=r"attention='ldm' cannot have injection 'control'"):
        UNetConfig(in_channels=12, out_channels=4, model_channels=32, channel_mult=(1, 2), attention_levels=(1,),
                   head_dim=8, attention="ldm", injection="control", ff_mult=0)
    with pytest.raises(ValueError, match=r"ff_mult 4 without a context"):
        UNetConfig(in_channels=12, out_channels=4, model_channels=32, channel_mult=(1, 2), attention_levels=(1,),
                   head_dim=8, attention="ldm")
