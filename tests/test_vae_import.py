"""vae.pretrained: latent diffusion's and diffusers' autoencoder files imported into gem3d's VAE.

The files are built here from a reference autoencoder written in latent diffusion's own module
layout (its state dict has the real file's key names and shapes: separate q/k/v attention
convolutions, padded stride-2 downsampling, up.{level} run from the deepest level), renamed to the
diffusers layout for the diffusers files. The imported model must compute what the reference
computes on grey slices given as 3 equal channels, averaged over its 3 output channels.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gem3d import pipeline
from gem3d.config import config_from_dict
from gem3d.data.latents import load_vae
from gem3d.io import InputError, read_json
from gem3d.models import VAEConfig
from gem3d.models.vae_import import import_autoencoder
from gem3d.paths import Paths
from gem3d.training.checkpoint import load_checkpoint

from conftest import TINY_CONFIG

SMALL = dict(ch=8, mult=(1, 2, 2), blocks=2, z=4, groups=4)  # 3 levels, 2 residual blocks: every index rule


def norm(c, groups):
    return nn.GroupNorm(groups, c, eps=1e-6)


class RefResnet(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class RefAttn(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)  # (b, hw, c)
        k = self.k(y).reshape(b, c, h * w)  # (b, c, hw)
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # (b, hw query, hw key)
        out = torch.bmm(self.v(y).reshape(b, c, h * w), weights.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class RefMid(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = RefResnet(c, c, groups), RefAttn(c, groups), RefResnet(c, c, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class RefKL(nn.Module):
    """Latent diffusion's KL autoencoder layout: encoder.down.{i}.block.{j}, decoder.up.{i}.block.{j}, ..."""

    def __init__(self, ch, mult, blocks, z, groups, image_channels=3):
        super().__init__()
        self.encoder, self.decoder = nn.Module(), nn.Module()
        enc, dec = self.encoder, self.decoder
        enc.conv_in = nn.Conv2d(image_channels, ch, 3, padding=1)
        enc.down, c = nn.ModuleList(), ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block = nn.ModuleList(RefResnet(c if j == 0 else ch * m, ch * m, groups) for j in range(blocks))
            c = ch * m
            if level != len(mult) - 1:
                stage.downsample = nn.Module()
                stage.downsample.conv = nn.Conv2d(c, c, 3, stride=2)
            enc.down.append(stage)
        enc.mid, enc.norm_out, enc.conv_out = RefMid(c, groups), norm(c, groups), nn.Conv2d(c, 2 * z, 3, padding=1)
        dec.conv_in, dec.mid = nn.Conv2d(z, c, 3, padding=1), RefMid(c, groups)
        ups = {}
        for level in reversed(range(len(mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList(RefResnet(c if j == 0 else ch * mult[level], ch * mult[level], groups)
                                        for j in range(blocks + 1))
            c = ch * mult[level]
            if level != 0:
                stage.upsample = nn.Module()
                stage.upsample.conv = nn.Conv2d(c, c, 3, padding=1)
            ups[level] = stage
        dec.up = nn.ModuleList(ups[level] for level in range(len(mult)))
        dec.norm_out, dec.conv_out = norm(c, groups), nn.Conv2d(c, image_channels, 3, padding=1)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)

    def encode_mean(self, x):
        enc, h = self.encoder, self.encoder.conv_in(x)
        for stage in enc.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = enc.conv_out(F.silu(enc.norm_out(enc.mid(h))))
        return self.quant_conv(h).chunk(2, dim=1)[0]

    def decode(self, z):
        dec = self.decoder
        h = dec.mid(dec.conv_in(self.post_quant_conv(z)))
        for level in reversed(range(len(dec.up))):
            for block in dec.up[level].block:
                h = block(h)
            if level != 0:
                h = dec.up[level].upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return dec.conv_out(F.silu(dec.norm_out(h)))


def to_diffusers(state: dict, levels: int, old_attention: bool = False) -> dict:
    """Latent diffusion key names -> diffusers AutoencoderKL names (attention as Linear weights)."""
    attn = ["query", "key", "value", "proj_attn"] if old_attention else ["to_q", "to_k", "to_v", "to_out.0"]
    rules = [
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
        (r"encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"mid\.block_1\.", lambda m: "mid_block.resnets.0."), (r"mid\.block_2\.", lambda m: "mid_block.resnets.1."),
        (r"mid\.attn_1\.norm\.", lambda m: "mid_block.attentions.0.group_norm."),
        (r"mid\.attn_1\.(q|k|v|proj_out)\.",
         lambda m: f"mid_block.attentions.0.{attn[['q', 'k', 'v', 'proj_out'].index(m[1])]}."),
        (r"nin_shortcut", lambda m: "conv_shortcut"), (r"norm_out", lambda m: "conv_norm_out"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if ".attentions.0." in key and "group_norm" not in key and value.dim() == 4:
            value = value[:, :, 0, 0]  # Linear
        out[key] = value
    return out


def reference(seed=0, **arch):
    torch.manual_seed(seed)
    return RefKL(**{**SMALL, **arch}).eval()


def gem3d_config(ch, mult, blocks, z, groups) -> VAEConfig:
    return VAEConfig(base_channels=ch, channel_mult=tuple(mult), num_res_blocks=blocks, latent_channels=z,
                     norm_groups=groups)


def assert_computes_the_reference(model, ref, size=16):
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = ref.encode_mean(x.repeat(1, 3, 1, 1))
        want = ref.decode(mean).mean(dim=1, keepdim=True)
        got_mean = model.encode(x).mean
        got = model.decode(got_mean)
    torch.testing.assert_close(got_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_latent_diffusion_checkpoint_in_a_whole_model(tmp_path):
    ref = reference()
    state = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)  # other parts of the model: ignored
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": state, "global_step": 5}, path)
    model, info = import_autoencoder(path, gem3d_config(**SMALL))
    assert info == {"layout": "latent-diffusion", "file_channels": 3} and model.config.in_channels == 1
    assert_computes_the_reference(model.eval(), ref)


def test_autoencoder_checkpoint_with_its_training_loss(tmp_path):
    ref = reference(seed=3)
    state = {**ref.state_dict(), "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2)}
    torch.save({"state_dict": state}, tmp_path / "kl-f8.ckpt")
    model, _ = import_autoencoder(tmp_path / "kl-f8.ckpt", gem3d_config(**SMALL))
    assert_computes_the_reference(model.eval(), ref)


@pytest.mark.parametrize("old_attention", [False, True])
def test_diffusers_safetensors(tmp_path, old_attention):
    from safetensors.torch import save_file

    ref = reference(seed=1)
    state = to_diffusers(ref.state_dict(), levels=3, old_attention=old_attention)
    assert "encoder.mid_block.attentions.0." + ("query" if old_attention else "to_q") + ".weight" in state
    assert state["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (16, 16, 3, 3)  # the deepest level
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model, info = import_autoencoder(tmp_path / "diffusion_pytorch_model.safetensors", gem3d_config(**SMALL))
    assert info["layout"] == "diffusers"
    assert_computes_the_reference(model.eval(), ref)


def test_paper_size_kl_f8(tmp_path):
    """The real KL-f8: 128 x [1, 2, 4, 4], 2 residual blocks, 4 latent channels, 32 groups (83.7M parameters)."""
    arch = dict(ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, groups=32)
    ref = reference(**arch)
    state = ref.state_dict()
    assert state["encoder.down.3.block.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in state.items()}}, tmp_path / "sd.ckpt")
    model, _ = import_autoencoder(tmp_path / "sd.ckpt", VAEConfig.paper())
    assert_computes_the_reference(model.eval(), ref, size=8)


def _refused(tmp_path, state, match, config=None):
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(InputError, match=match) as err:
        import_autoencoder(tmp_path / "bad.ckpt", config or gem3d_config(**SMALL))
    assert "\n" not in str(err.value)


def test_other_shapes_or_layouts_are_refused_naming_the_key(tmp_path):
    state = reference().state_dict()
    _refused(tmp_path, {**state, "encoder.mid.attn_1.k.weight": torch.zeros(16, 8, 1, 1)},
             r"bad\.ckpt: key encoder\.mid\.attn_1\.k\.weight has shape \(16, 8, 1, 1\), .* needs \(16, 16, 1, 1\)")
    _refused(tmp_path, {k: v for k, v in state.items() if k != "decoder.up.1.upsample.conv.bias"},
             r"key decoder\.up\.1\.upsample\.conv\.bias missing \(latent-diffusion layout")
    _refused(tmp_path, {**state, "encoder.down.2.attn.0.q.weight": torch.zeros(16, 16, 1, 1)},
             r"key encoder\.down\.2\.attn\.0\.q\.weight is not part of the latent-diffusion autoencoder")
    _refused(tmp_path, state, r"key encoder\.conv_in\.weight has shape \(8, 3, 3, 3\), vae\.model 16 x \[1, 2, 2\]",
             config=gem3d_config(**{**SMALL, "ch": 16}))
    _refused(tmp_path, {"model.diffusion_model.out.weight": torch.zeros(2)},
             r"neither the latent-diffusion .* nor the diffusers .* layout \(first key: model\.diffusion_model")


def test_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(InputError, match=r"broken\.safetensors: autoencoder file is not a torch or safetensors file"):
        import_autoencoder(tmp_path / "broken.safetensors", gem3d_config(**SMALL))
    torch.save({"callback": re.compile("x")}, tmp_path / "objects.ckpt")
    with pytest.raises(InputError, match=r"objects\.ckpt: autoencoder file holds no tensors \(its entries are "
                                         r"pickled re\._compile object \(not loaded\)\)"):
        import_autoencoder(tmp_path / "objects.ckpt", gem3d_config(**SMALL))


def test_a_checkpoint_with_pickled_objects_loads_its_tensors_only(tmp_path):
    """A Lightning-style checkpoint (callbacks keyed by class, objects beside the state dict) is read without
    importing or calling what it names; the autoencoder's tensors are imported."""
    ref = reference()
    torch.save({"state_dict": ref.state_dict(), "callbacks": {re.Pattern: {"x": re.compile("x")}}},
               tmp_path / "lightning.ckpt")
    model, info = import_autoencoder(tmp_path / "lightning.ckpt", gem3d_config(**SMALL))
    assert info["layout"] == "latent-diffusion"
    assert torch.equal(model.state_dict()["encoder.conv_out.weight"], ref.state_dict()["encoder.conv_out.weight"])


@pytest.fixture
def run_copy(trained_run, tmp_path, monkeypatch):
    workdir, _ = trained_run
    shutil.copytree(workdir / "results", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_vae_with_a_pretrained_file_only_measures_and_writes(run_copy):
    vae = TINY_CONFIG["vae"]["model"]
    arch = dict(ch=vae["base_channels"], mult=vae["channel_mult"], blocks=vae["num_res_blocks"],
                z=vae["latent_channels"], groups=vae["norm_groups"])
    ref = reference(seed=7, **arch)
    torch.save({"state_dict": ref.state_dict()}, run_copy / "kl.ckpt")
    raw = {**TINY_CONFIG, "vae": {**TINY_CONFIG["vae"], "pretrained": "kl.ckpt"}}
    cfg = config_from_dict(raw, source="tiny", check_paths=False)
    paths = Paths(cfg)
    state_bytes = paths.train_state("vae").read_bytes()  # the tiny run's finished training state
    pipeline.train_vae(cfg)
    assert paths.train_state("vae").read_bytes() == state_bytes  # nothing trained
    loaded = load_vae(paths.model("vae"), cfg=cfg)
    assert_computes_the_reference(loaded.model, ref)
    metrics = read_json(paths.vae_metrics)
    assert metrics["source"].startswith("pretrained kl.ckpt (latent-diffusion layout)")
    assert loaded.scale_factor == pytest.approx(metrics["scale_factor"]) and metrics["scale_factor"] > 0
    extra = load_checkpoint(paths.model("vae"))["extra"]
    assert extra["pretrained_layout"] == "latent-diffusion" and len(extra["pretrained_sha256"]) == 64
    pipeline.encode(cfg)  # the latent cache reads the imported model like a trained one

    trained = config_from_dict(TINY_CONFIG, source="tiny", check_paths=False)
    pipeline.train_vae(trained)  # back to training: the finished state's model is exported again
    state = load_checkpoint(paths.train_state("vae"))["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in load_checkpoint(paths.model("vae"))["state_dict"].items())
    assert read_json(paths.vae_metrics)["source"] == "trained"

    missing = config_from_dict({**raw, "vae": {**raw["vae"], "pretrained": "nowhere.ckpt"}}, source="tiny",
                               check_paths=False)
    with pytest.raises(InputError, match=r"config key vae\.pretrained: file not found at nowhere\.ckpt"):
        pipeline.train_vae(missing)
