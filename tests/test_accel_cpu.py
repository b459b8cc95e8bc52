"""The GPU code paths, run on the CPU: bf16 autocast, torch.compile, channels_last and fused AdamW
in the training loop and the sampler, the device choice, and scripts/gpu_check.sh.

torch 2.14 runs all of them on the CPU (compile through inductor's C++ backend, which needs g++ and
Python's headers), so a GPU run executes code these tests have run. The networks are TINY_CONFIG's
(conftest.py), built through gem3d.models.specs, trained with the pipeline's own loss functions.

Tolerances (bf16 keeps 8 significant bits: one rounding is up to 2**-9 = 0.2 %); measured on the
2-core AMD EPYC CI machine in brackets:
- bf16-autocast forward of trained weights vs fp32: relative L2 error < 2 % (0.3-0.8 %);
- bf16 training loss curve vs fp32 from the same initialisation: every logged mean within 2 %
  (at most 0.24 %); the bf16 loss falls to < 0.8x its first logged value in 30 steps (0.3-0.5x),
  stage 2 (slice-axis layers only, on a 30-step stage 1) to < 0.9x (0.83x);
- bf16 DDIM sampling vs fp32 (same seeds): relative L2 error of the latents < 2 % (0.35 %);
- channels_last vs contiguous weights in fp32: losses within 1e-5 relative (2e-7);
- compiled (inductor) vs eager forward in fp32: rtol = atol = 1e-4; compiled vs eager bf16
  training losses: rtol 1e-3 (different kernels round in different places);
- resume: bit-identical (torch.equal on weights, EMA, AdamW state and RNG states), in bf16, with
  channels_last, grad checkpointing, fused AdamW and compile.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import test_training_loop as T
from conftest import REPO, TINY_CONFIG
from gem3d.config import config_from_dict
from gem3d.diffusion import DDIMSampler, NoiseSchedule
from gem3d.io import InputError
from gem3d.models import AutoencoderKL, UNet, UNetConfig, from_stage1, position_embedding
from gem3d.models.specs import slice_unet_config, vae_config, volume_unet_config
from gem3d.sampling.generate import VolumeSampler
from gem3d.sampling.propagate import propagate_volumes
from gem3d.training import TrainConfig, load_checkpoint, train
from gem3d.training.precision import require_cpu_compiler
from gem3d.training.diffusion_training import eps_loss
from gem3d.training.vae_training import vae_loss

CFG = config_from_dict(TINY_CONFIG, source="tiny", check_paths=False)
SCHEDULE = NoiseSchedule()
NETWORKS = ("vae", "slice_model", "volume_stage1", "volume_stage2")
STEPS = 30  # "a few dozen": enough for every network's loss to fall clearly
# the GPU configs' switches (config/brats.yaml: bf16 + grad checkpointing; channels_last for speed)
FAST = dict(precision="bf16", channels_last=True, grad_checkpointing=True)
TRAIN = TrainConfig(steps=STEPS, lr=2e-3, batch_size=8, ema_decay=0.9, log_every=5, checkpoint_every=10, seed=1)
# stage 2 trains only the slice-axis layers (zero output at initialisation) on top of a stage-1
# network: a larger learning rate, and a smaller gain to expect within STEPS
LR = {"vae": 2e-3, "slice_model": 2e-3, "volume_stage1": 2e-3, "volume_stage2": 1e-2}
FALLS_TO = {"vae": 0.8, "slice_model": 0.8, "volume_stage1": 0.8, "volume_stage2": 0.9}


def train_cfg(name: str, **switches) -> TrainConfig:
    return dataclasses.replace(TRAIN, lr=LR[name], **switches)


def _blobs(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) smooth images in [-1, 1]: one Gaussian blob each (learnable structure)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 1.2 - 0.6
    radius = torch.rand(n, generator=g) * 0.4 + 0.2
    d2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    return (torch.exp(-d2 / radius[:, None, None] ** 2) * 2 - 1)[:, None]


def _moving_blobs(cases: int, channels: int, depth: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(cases, channels, depth, size, size) latent volumes: per channel a blob drifting through the
    slices, so neighbouring slices are alike (what stage 2's slice-axis layers can learn)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    start = torch.rand(cases, channels, 1, 2, generator=g) * 1.2 - 0.6
    drift = (torch.rand(cases, channels, 1, 2, generator=g) - 0.5) * 0.3
    centre = start + drift * torch.arange(depth).float()[None, None, :, None]  # (cases, channels, depth, 2)
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    return torch.exp(-d2 / 0.3 ** 2) * 2 - 1


_g = torch.Generator().manual_seed(7)
IMAGES = _blobs(64, CFG.preprocess.slice_size, _g)  # VAE training slices, 16 x 16
LATENT = CFG.preprocess.slice_size // 4  # TINY_CONFIG's VAE downsamples 4x
LATENTS = _moving_blobs(16, 4, 8, LATENT, _g)  # (case, c, slice, h, w)
WINDOW = CFG.volume_model.window


class Recorder:
    """The pipeline's loss functions, recording the dtype each forward pass computed in."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def vae(self, net, x, g):
        recon, posterior = net(x, sample=True, generator=None)
        self.dtypes.add(recon.dtype)
        return vae_loss(recon, x, posterior, CFG.vae.kl_weight)

    def eps(self, net, b, g):
        def spy(*args, **kwargs):
            out = net(*args, **kwargs)
            self.dtypes.add(out.dtype)
            return out

        return eps_loss(spy, b["x0"], b.get("cond"), b["t"], b["noise"], SCHEDULE, context=b.get("context"))


def vae_batch(step, g, items):
    return IMAGES[torch.randint(len(IMAGES), (8,), generator=g)]


def slice_batch(step, g, items):
    case, z = torch.randint(16, (8,), generator=g), torch.randint(8, (8,), generator=g)
    x0 = LATENTS[case, :, z]  # (b, c, h, w)
    return {"x0": x0, "context": position_embedding(z / 7.0, CFG.slice_model.position_dim),
            "t": SCHEDULE.sample_timesteps(8, g), "noise": torch.randn(x0.shape, generator=g)}


def window_batch(stage: int):
    """Windows as diffusion_training.window_batch builds them: cond = mask latents + informed slice."""

    def source(step, g, items):
        case, start = torch.randint(16, (8,), generator=g), torch.randint(8 - WINDOW + 1, (8,), generator=g)
        x0 = torch.stack([LATENTS[c, :, s:s + WINDOW] for c, s in zip(case.tolist(), start.tolist())])  # b c f h w
        cond = torch.cat([x0.flip(1), x0[:, :, :1].expand_as(x0)], dim=1)  # stand-in mask latents, informed slice
        t = SCHEDULE.sample_timesteps(8, g, mode="linear_decay" if stage == 2 else "uniform",
                                      frames=None if stage == 2 else WINDOW)
        return {"x0": x0, "cond": cond, "t": t, "noise": torch.randn(x0.shape, generator=g)}

    return source


def build(name: str, stage1: UNet | None = None):
    """(model, batch_source, loss recorder, loss_fn, trainable parameters or None), seeded."""
    rec = Recorder()
    torch.manual_seed(0)
    if name == "vae":
        return AutoencoderKL(vae_config(CFG)), vae_batch, rec, rec.vae, None
    if name == "slice_model":
        return UNet(slice_unet_config(CFG)), slice_batch, rec, rec.eps, None
    if name == "volume_stage1":
        return UNet(volume_unet_config(CFG, informed=True)), window_batch(1), rec, rec.eps, None
    model = from_stage1(stage1, volume_unet_config(CFG, informed=True, slice_axis=True))
    return model, window_batch(2), rec, rec.eps, model.slice_axis_parameters()


def run(name: str, path: Path, cfg: TrainConfig, stage1: UNet | None = None):
    model, source, rec, loss_fn, trainable = build(name, stage1)
    result = train(model, loss_fn, source, cfg, path, kind="unet" if name != "vae" else "vae", model_args={},
                   trainable_parameters=trainable, log=lambda msg: None)
    return model, result, rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every network trained STEPS steps in fp32 and with the GPU switches (bf16, channels_last, grad
    checkpointing), from the same initialisation; stage 2 starts from the fp32 stage-1 weights."""
    root = tmp_path_factory.mktemp("accel")
    out = {}
    for name in NETWORKS:
        stage1 = out["volume_stage1"]["fp32"][0] if name == "volume_stage2" else None
        out[name] = {
            "fp32": run(name, root / f"{name}_fp32.ckpt", train_cfg(name), stage1),
            "bf16": run(name, root / f"{name}_bf16.ckpt", train_cfg(name, **FAST), stage1),
        }
        out[name]["paths"] = root
    return out


# ---------------------------------------------------------------------------------------------
# bf16 autocast, channels_last, fused AdamW


@pytest.mark.parametrize("name", NETWORKS)
def test_bf16_training_on_cpu_tracks_fp32_and_its_loss_falls(runs, name):
    (_, fp32, rec32), (_, bf16, rec16) = runs[name]["fp32"], runs[name]["bf16"]
    assert rec32.dtypes == {torch.float32} and rec16.dtypes == {torch.bfloat16}  # the loop's autocast ran
    losses32, losses16 = [v for _, v in fp32.losses], [v for _, v in bf16.losses]
    assert len(losses16) == STEPS // TRAIN.log_every
    assert losses16[-1] < FALLS_TO[name] * losses16[0], losses16
    for a, b in zip(losses32, losses16):
        assert abs(b - a) <= 0.02 * a, (losses32, losses16)


@pytest.mark.parametrize("name", NETWORKS)
def test_bf16_forward_matches_fp32_on_trained_weights(runs, name):
    model = runs[name]["fp32"][0].eval()
    g = torch.Generator().manual_seed(3)
    if name == "vae":
        x = vae_batch(0, g, range(8))
        forward = lambda: model(x, sample=False)[0]  # noqa: E731
    else:
        source = slice_batch if name == "slice_model" else window_batch(2 if name == "volume_stage2" else 1)
        b = source(0, g, range(8))
        x_t = SCHEDULE.add_noise(b["x0"], b["noise"], b["t"])
        inp = x_t if "cond" not in b else torch.cat([x_t, b["cond"]], dim=1)
        forward = lambda: model(inp, b["t"], context=b.get("context"))  # noqa: E731
    with torch.no_grad():
        ref = forward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = forward()
    assert low.dtype == torch.bfloat16 and ref.dtype == torch.float32
    err = (low.float() - ref).norm() / ref.norm()
    assert 0 < err < 2e-2, float(err)


@pytest.mark.parametrize("name", NETWORKS)
def test_bf16_channels_last_fused_resume_is_bit_identical(runs, name, tmp_path):
    """Stopped half way and resumed: the same state as the uninterrupted run, bit for bit."""
    stage1 = runs["volume_stage1"]["fp32"][0] if name == "volume_stage2" else None
    cfg = train_cfg(name, **FAST)
    path = tmp_path / "resumed.ckpt"
    run(name, path, dataclasses.replace(cfg, steps=STEPS // 2), stage1)
    model, result, _ = run(name, path, cfg, stage1)
    assert result.start_step == STEPS // 2 and result.final_step == STEPS
    reference = load_checkpoint(runs[name]["paths"] / f"{name}_bf16.ckpt")
    resumed = load_checkpoint(path)
    T.assert_same_training_state(reference, resumed)
    T.assert_same(model.state_dict(), reference["state_dict"], "live model")
    assert all(group["fused"] for group in resumed["optimizer"]["param_groups"])  # fused AdamW on the CPU
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    assert convs and all(model.get_parameter(n).is_contiguous(memory_format=torch.channels_last) for n in convs)
    assert all(resumed["state_dict"][n].is_contiguous(memory_format=torch.channels_last) for n in convs)


def test_channels_last_changes_only_the_layout(runs, tmp_path):
    """fp32 with channels_last weights trains like the contiguous layout (same math, other kernels)."""
    _, plain, _ = runs["volume_stage1"]["fp32"]
    model, last, _ = run("volume_stage1", tmp_path / "cl.ckpt", train_cfg("volume_stage1", channels_last=True))
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for (_, a), (_, b) in zip(plain.losses, last.losses):
        assert b == pytest.approx(a, rel=1e-5)


def test_tiny_mlp_bf16_resume_restores_every_rng(tmp_path):
    """test_training_loop's exact-resume check (dropout, python/numpy RNGs, loop generator) in bf16."""
    cfg = dataclasses.replace(T.CFG, precision="bf16")
    T.run(tmp_path / "a.pt", cfg)
    T.run(tmp_path / "b.pt", dataclasses.replace(cfg, steps=5))
    _, resumed = T.run(tmp_path / "b.pt", cfg)
    assert resumed.start_step == 5
    T.assert_same_training_state(load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt"))


def test_log_says_the_precision_used_and_notes_emulated_bf16(tmp_path, monkeypatch):
    import gem3d.training.loop as loop

    messages: list[str] = []
    T.run(tmp_path / "a.pt", dataclasses.replace(T.CFG, steps=1, precision="bf16"), log=messages.append)
    assert any(", precision bf16, lr " in m for m in messages) and not any("emulated" in m for m in messages)
    monkeypatch.setattr(loop, "native_cpu_bf16", lambda: False)  # a CPU without AVX512-BF16 / AMX
    messages.clear()
    T.run(tmp_path / "b.pt", dataclasses.replace(T.CFG, steps=1, precision="bf16"), log=messages.append)
    assert any("no native bf16 instructions" in m and "precision fp32" in m for m in messages)
    messages.clear()
    T.run(tmp_path / "c.pt", dataclasses.replace(T.CFG, steps=1), log=messages.append)
    assert any(", precision fp32, lr " in m for m in messages) and not any("bf16" in m for m in messages)


def _sampler_like(net: UNet, precision: str) -> types.SimpleNamespace:
    """The parts of a VolumeSampler its network call reads, with VolumeSampler's own methods bound."""
    fake = types.SimpleNamespace(net=net, device=torch.device("cpu"),
                                 cfg=types.SimpleNamespace(sampling=types.SimpleNamespace(precision=precision)))
    fake.autocast = types.MethodType(VolumeSampler.autocast, fake)
    fake.model_fn = types.MethodType(VolumeSampler._model_fn, fake)
    return fake


def test_bf16_sampling_on_cpu_matches_fp32(runs):
    """VolumeSampler's network call under sampling.precision bf16 on the CPU: the same volumes as fp32
    up to bf16 rounding (same seeds: the noise is drawn from each volume's own generator)."""
    net = runs["volume_stage2"]["fp32"][0].eval()
    seen: list[torch.dtype] = []
    hook = net.out.conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    ddim = DDIMSampler(SCHEDULE, num_inference_steps=5, eta=1.0)
    g = torch.Generator().manual_seed(1)
    masks = [torch.randn(4, d, LATENT, LATENT, generator=g) for d in (11, 7)]
    informed = [torch.randn(4, LATENT, LATENT, generator=g) for _ in masks]

    def sample(precision):
        fn = _sampler_like(net, precision).model_fn
        gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
        with torch.no_grad():
            return propagate_volumes(fn, ddim, masks, informed, [5, 0], WINDOW, 1, 4, gens)

    try:
        ref, low = sample("fp32"), sample("bf16")
    finally:
        hook.remove()
    assert set(seen) == {torch.float32, torch.bfloat16}
    for a, b in zip(ref, low):
        assert b.dtype == torch.float32 and b.shape == a.shape
        err = (b - a).norm() / a.norm()
        assert 0 < err < 2e-2, float(err)


# ---------------------------------------------------------------------------------------------
# torch.compile (inductor's C++ backend on the CPU)

# One resolution level keeps inductor's C++ kernels few; slice-axis conv and attention, spatial
# attention, res blocks and the timestep embedding are all in it. simdlen 1 asks for scalar C++
# (half the compile time of the vectorised kernels); graph capture, lowering and numerics are the
# same code paths.
COMPILE_UNET = UNetConfig(in_channels=12, out_channels=4, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                          attention_levels=(0,), head_dim=8, norm_groups=4, ff_mult=0, mid_attention=False)


def _compile_net() -> UNet:
    torch.manual_seed(0)
    stage1 = UNet(COMPILE_UNET)
    torch.nn.init.normal_(stage1.out.conv.weight, std=0.05)  # a non-zero output, so comparisons mean something
    return from_stage1(stage1)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch({"cpp.simdlen": 1}):
        yield
    torch._dynamo.reset()


def check_compiled_ddim(device: torch.device) -> None:
    """A compiled stage-2 UNet through a DDIM loop equals the eager one, compiled once at the first
    step and never again (also run on a GPU by tests/test_gpu.py)."""
    net = _compile_net().to(device).eval()
    compile_counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(net, backend=compile_counter, fullgraph=True)
    frames_after_call: list[int] = []

    def model_fn(net_):
        def fn(x, t, cond):
            out = net_(torch.cat([x, cond], dim=1), t)
            if net_ is compiled:
                frames_after_call.append(compile_counter.frame_count)
            return out
        return fn

    ddim = DDIMSampler(SCHEDULE, num_inference_steps=6, eta=1.0)
    g = torch.Generator().manual_seed(2)
    mask = [torch.randn(4, WINDOW, 4, 4, generator=g).to(device)]  # one window: one batch shape every step
    informed = [torch.randn(4, 4, 4, generator=g).to(device)]
    with torch.no_grad():
        eager = propagate_volumes(model_fn(net), ddim, mask, informed, [0], WINDOW, 1, 4,
                                  [torch.Generator().manual_seed(5)])
        fast = propagate_volumes(model_fn(compiled), ddim, mask, informed, [0], WINDOW, 1, 4,
                                 [torch.Generator().manual_seed(5)])
    assert frames_after_call == [1] * 6  # compiled at the first DDIM step, never again
    assert counters["stats"]["unique_graphs"] == 1  # one graph: no graph break in the UNet
    torch.testing.assert_close(fast[0], eager[0], rtol=1e-4, atol=1e-4)


def test_compiled_unet_equals_eager_without_recompiles_across_ddim_steps(fresh_dynamo):
    require_cpu_compiler()  # without g++ / Python.h: that one line, not inductor's traceback
    check_compiled_ddim(torch.device("cpu"))


def _compile_batch(step, g, items):
    x0 = torch.randn(2, 4, WINDOW, 4, 4, generator=g)
    return {"x0": x0, "cond": torch.randn(2, 8, WINDOW, 4, 4, generator=g),
            "t": SCHEDULE.sample_timesteps(2, g, mode="linear_decay"), "noise": torch.randn(x0.shape, generator=g)}


def test_compiled_training_step_equals_eager_and_resumes_exactly(fresh_dynamo, tmp_path):
    """Stage-2 training as the GPU configs run it (compile + bf16 + channels_last + grad checkpointing
    + fused AdamW + a trainable subset): compiled equals eager; a compiled resume is bit-identical."""
    cfg = TrainConfig(steps=4, lr=1e-3, batch_size=2, ema_decay=0.9, log_every=1, checkpoint_every=2, **FAST)

    def fit(path, compile_, steps=4):
        net = _compile_net()
        rec = Recorder()
        messages: list[str] = []
        result = train(net, rec.eps, _compile_batch, dataclasses.replace(cfg, compile=compile_, steps=steps), path,
                       kind="unet", model_args={}, trainable_parameters=net.slice_axis_parameters(),
                       log=messages.append)
        assert rec.dtypes == {torch.bfloat16}
        assert any((", precision bf16, compiled, lr " if compile_ else ", precision bf16, lr ") in m for m in messages)
        return net, result

    _, eager = fit(tmp_path / "eager.ckpt", False)
    assert counters["stats"]["unique_graphs"] == 0
    _, compiled = fit(tmp_path / "compiled.ckpt", True)
    assert counters["stats"]["unique_graphs"] == 1  # forward and backward compiled once, reused every step
    for (_, a), (_, b) in zip(eager.losses, compiled.losses):
        assert b == pytest.approx(a, rel=1e-3)
    fit(tmp_path / "resumed.ckpt", True, steps=2)
    _, resumed = fit(tmp_path / "resumed.ckpt", True)
    assert resumed.start_step == 2 and counters["stats"]["unique_graphs"] == 1  # no recompile for a new model
    T.assert_same_training_state(load_checkpoint(tmp_path / "compiled.ckpt"),
                                 load_checkpoint(tmp_path / "resumed.ckpt"))


def test_compile_without_a_compiler_is_one_line(tmp_path, monkeypatch):
    cfg = dataclasses.replace(T.CFG, steps=2, compile=True)
    with inductor_config.patch({"cpp.cxx": ("gem3d-no-such-compiler++",)}):
        with pytest.raises(InputError) as err:
            T.run(tmp_path / "a.pt", cfg)
    msg = str(err.value)
    assert "compile: true on the CPU needs a C++ compiler" in msg and "compile: false" in msg and "\n" not in msg
    assert not (tmp_path / "a.pt").exists()
    import sysconfig

    real = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "include": str(tmp_path)})
    with pytest.raises(InputError, match=r"needs Python's C headers .*Python\.h is missing.*python3-dev"):
        T.run(tmp_path / "b.pt", cfg)


# ---------------------------------------------------------------------------------------------
# the device choice: GEM3D_DEVICE decides for every stage

# Where gem3d may name CUDA without asking gem3d.device.compute_device, and why.
CUDA_MENTIONS_ALLOWED = {
    "gem3d/device.py": "the one place that chooses",
    "gem3d/training/checkpoint.py": "saves and restores the CUDA RNG state when CUDA is in use",
    "gem3d/training/distributed.py": "launch_command(None): one process per visible GPU when compute_device is CUDA",
    "gem3d/evaluation/nnunet_trainer.py": "nnU-Net's trainer signature default; gem3d passes -device (compute_device)",
}
CUDA_PATTERN = re.compile(r"torch\.cuda\.(is_available|device_count)\(|\.cuda\(|torch\.device\(\s*['\"]cuda|"
                          r"device\s*=\s*['\"]cuda")


def test_no_stage_picks_a_device_itself():
    found = {}
    for path in sorted((REPO / "gem3d").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        hits = [i + 1 for i, line in enumerate(path.read_text().splitlines())
                if CUDA_PATTERN.search(line) and not line.lstrip().startswith("#")]
        if hits:
            found[rel] = hits
    assert set(found) <= set(CUDA_MENTIONS_ALLOWED), {k: v for k, v in found.items() if k not in CUDA_MENTIONS_ALLOWED}
    assert "gem3d/device.py" in found  # the pattern does find what it looks for


def test_gem3d_device_cpu_wins_over_a_visible_gpu(monkeypatch):
    from gem3d.device import compute_device
    from gem3d.evaluation.downstream import device_name
    from gem3d.training.distributed import distributed_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("GEM3D_DEVICE", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed_env().device == torch.device("cpu")  # training (every rank) and encoding
    assert device_name() == "cpu"  # nnU-Net's -device
    monkeypatch.setenv("GEM3D_DEVICE", "auto")
    assert distributed_env().device == torch.device("cuda", 1) == compute_device(3)  # local rank 3 of 2 GPUs
    assert device_name() == "cuda"


# ---------------------------------------------------------------------------------------------
# scripts/gpu_check.sh


def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=900)


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    proc = _script("--device", "cpu", "--preset", "demo", "--train-steps", "1", "--warmup", "1",
                   "--sample-steps", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^torch 2\.\S+ \(CUDA build \S+, runtime none\)", out, re.M), out[:2000]
    assert "card: none (the CPU:" in out
    assert re.search(r"pytest -m gpu: \d+ skipped, none run \(no CUDA GPU visible\)", out), out
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in out  # printed and written
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| measurement | value | target | met |")
    for network in ("vae", "slice_model", "volume_stage1", "volume_stage2"):
        row = rf"^\| train {network}: ms/step, authors' style / gem3d \| [\d.]+ / [\d.]+ "
        assert re.search(row, table, re.M), table
    assert re.search(r"^\| sample: s per 155-slice volume, 2 ddim steps \| [\d.]+ \| <= 25 s at 200 ddim steps "
                     r"\| n/a ", table, re.M), table
    assert re.search(r"^\| GPU tests \(pytest -m gpu\) \| \d+ skipped \(no CUDA GPU\) \|", table, re.M), table
    assert "preset demo" in table and "not the paper preset on a GPU" in table
    for log in ("pytest_gpu.log", "bench_training.log", "bench_sampling.log"):
        assert (tmp_path / log).stat().st_size > 0


def test_gpu_check_refuses_cuda_without_a_gpu_and_bad_options(tmp_path):
    proc = _script("--device", "cuda", "--out", str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --device cuda but torch sees no CUDA GPU")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "gpu_check.md").exists()
    proc = _script("--preset", "huge", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr == "error: --preset must be paper or demo, got 'huge'\n"
