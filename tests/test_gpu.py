"""The code paths on a CUDA GPU: bf16 autocast, torch.compile (Triton), channels_last, fused AdamW,
pinned transfers, SDPA past the kernels' batch limit, and the tiny pipeline trained and sampled on a GPU.

Skipped without a CUDA GPU (conftest.py); scripts/gpu_check.sh runs them on a user's first GPU
node. The same switches run on the CPU in every CI run (tests/test_accel_cpu.py); what only a GPU
has (NCCL, cuDNN, CUDA memory figures, Triton kernels) is listed in docs/benchmarks.md. The rest of
the suite runs on the CPU even on a GPU machine (GEM3D_DEVICE=cpu in conftest.py); these tests
switch to the GPU themselves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gem3d.diffusion import DDIMSampler, NoiseSchedule
from gem3d.models import UNet, UNetConfig, from_stage1
from gem3d.sampling.propagate import propagate_volumes
from gem3d.training import TrainConfig, load_checkpoint, train

pytestmark = pytest.mark.gpu

TINY_UNET = UNetConfig(in_channels=12, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_levels=(1,), head_dim=16, norm_groups=8, ff_mult=0)


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setenv("GEM3D_DEVICE", "cuda")
    # exact fp32 comparisons: no TF32 in convolutions or matrix products
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield torch.device("cuda")
    finally:
        torch.set_float32_matmul_precision(old)


def test_stage2_equals_stage1_at_init_on_gpu(on_gpu):
    torch.manual_seed(0)
    stage1 = UNet(TINY_UNET).to(on_gpu).eval()
    stage2 = from_stage1(stage1).to(on_gpu).eval()
    x = torch.randn(2, 12, 8, 16, 16, device=on_gpu)
    t = torch.randint(0, 1000, (2,), device=on_gpu)
    with torch.no_grad():
        torch.testing.assert_close(stage2(x, t), stage1(x, t[:, None].expand(2, 8)), rtol=1e-5, atol=1e-5)


def test_sdpa_past_the_kernel_batch_limit(on_gpu):
    """Slice-axis attention puts one sequence per pixel in the batch: 70000 > 65535 must work."""
    from gem3d.models.attention import MAX_SDPA_BATCH, sdpa

    q, k, v = (torch.randn(MAX_SDPA_BATCH + 4465, 2, 16, 32, device=on_gpu, dtype=torch.bfloat16)
               for _ in range(3))
    out = sdpa(q, k, v)
    ref = torch.cat([F.scaled_dot_product_attention(q[i:i + 8192], k[i:i + 8192], v[i:i + 8192])
                     for i in range(0, q.shape[0], 8192)])
    torch.testing.assert_close(out, ref)


def _window_batch(step: int, g: torch.Generator, items: range) -> dict:
    x0 = torch.randn(2, 4, 8, 16, 16, generator=g)
    return {"x0": x0, "cond": torch.randn(2, 8, 8, 16, 16, generator=g),
            "t": torch.randint(0, 1000, (2,), generator=g), "noise": torch.randn(x0.shape, generator=g)}


def _eps_loss(net, b: dict, g: torch.Generator):
    schedule = NoiseSchedule()
    x_t = schedule.add_noise(b["x0"], b["noise"], b["t"])
    return F.mse_loss(net(torch.cat([x_t, b["cond"]], dim=1), b["t"]).float(), b["noise"])


def test_training_loop_bf16_compile_channels_last_and_resume(on_gpu, tmp_path):
    """Stage-2 training the way the GPU configs run it, stopped after 4 steps and resumed to 8."""
    torch.manual_seed(0)
    model = from_stage1(UNet(TINY_UNET))
    trainable = model.slice_axis_parameters()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "slice_axis" not in n}
    cfg = TrainConfig(steps=4, lr=1e-3, batch_size=2, ema_decay=0.9, log_every=2, checkpoint_every=2,
                      precision="bf16", compile=True, channels_last=True, grad_checkpointing=True)
    path = tmp_path / "stage2.ckpt"
    common = dict(kind="unet", model_args={"config": dataclasses.asdict(model.config)}, trainable_parameters=trainable)
    first = train(model, _eps_loss, _window_batch, cfg, path, **common)
    assert first.final_step == 4 and np.isfinite(first.last_loss)
    assert next(model.parameters()).device.type == "cuda"
    conv = next(p for n, p in model.named_parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)

    model2 = from_stage1(UNet(TINY_UNET))
    resumed = train(model2, _eps_loss, _window_batch, dataclasses.replace(cfg, steps=8), path,
                    trainable_parameters=model2.slice_axis_parameters(),
                    **{k: v for k, v in common.items() if k != "trainable_parameters"})
    assert resumed.start_step == 4 and resumed.final_step == 8 and np.isfinite(resumed.last_loss)
    payload = load_checkpoint(path)
    assert payload["step"] == 8
    for name, p in model2.named_parameters():  # stage 2 trains only the slice-axis layers
        if name in frozen:
            torch.testing.assert_close(p.detach().cpu(), frozen[name], rtol=0, atol=0)


def test_compiled_unet_without_recompiles_across_ddim_steps_on_gpu(on_gpu):
    """tests/test_accel_cpu.py's check (run there on the CPU), with inductor's Triton kernels."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from test_accel_cpu import check_compiled_ddim

    torch._dynamo.reset()
    counters.clear()
    try:
        check_compiled_ddim(on_gpu)
    finally:
        torch._dynamo.reset()


def test_sampling_on_gpu_matches_cpu(on_gpu):
    """The same seeds give the same volumes on the GPU and the CPU (noise is drawn on the CPU)."""
    torch.manual_seed(0)
    net = from_stage1(UNet(TINY_UNET)).eval()
    sampler = DDIMSampler(NoiseSchedule(), num_inference_steps=5, eta=1.0)
    g = torch.Generator().manual_seed(1)
    masks = [torch.randn(4, d, 16, 16, generator=g) for d in (13, 9)]
    informed = [torch.randn(4, 16, 16, generator=g) for _ in masks]

    def run(device, precision="fp32"):
        model = net.to(device)

        def model_fn(x, t, cond):
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else torch.no_grad()
            with ctx:
                return model(torch.cat([x, cond], dim=1), t).float()

        gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
        with torch.no_grad():
            out = propagate_volumes(model_fn, sampler, [m.to(device) for m in masks],
                                    [i.to(device) for i in informed], [6, 0], 8, 1, 4, gens)
        return [o.cpu() for o in out]

    cpu, gpu = run("cpu"), run(on_gpu)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    for a, b in zip(cpu, run(on_gpu, "bf16")):
        assert torch.isfinite(b).all() and b.shape == a.shape


def test_tiny_pipeline_trains_and_samples_on_gpu(on_gpu, tmp_path, monkeypatch):
    """The five networks trained on the GPU in bf16 (channels_last, fused AdamW), then a set sampled."""
    from conftest import TINY_CONFIG, train_tiny_run

    from gem3d.io import read_json, read_volume
    from gem3d.paths import Paths
    from gem3d.sampling.sample_sets import merge_shards, sample_set

    fast = {"precision": "bf16", "channels_last": True}
    overrides = {
        "vae": {**TINY_CONFIG["vae"], "train": {**TINY_CONFIG["vae"]["train"], **fast}},
        "volume_model": {**TINY_CONFIG["volume_model"],
                         "stage1": {**TINY_CONFIG["volume_model"]["stage1"], **fast},
                         "stage2": {**TINY_CONFIG["volume_model"]["stage2"], **fast}},
    }
    cfg = train_tiny_run(tmp_path, overrides)
    monkeypatch.chdir(tmp_path)
    paths = Paths(cfg)
    assert np.isfinite(read_json(paths.vae_metrics)["psnr"])  # scale factor and PSNR measured on the GPU
    sample_set(cfg, "IG")
    out = merge_shards(cfg, "IG", 1)
    manifest = read_json(out / "manifest.json")
    for v in manifest["volumes"]:
        gen = read_volume(out / "imagesTr" / f"{v['sample_id']}_0000.nii.gz")
        real = read_volume(paths.raw_dataset / "imagesTr" / f"{v['source_case']}_0000.nii.gz")
        assert gen.shape == real.shape and np.isfinite(gen.array).all()
        np.testing.assert_allclose(gen.affine, real.affine)
