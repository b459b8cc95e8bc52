#!/usr/bin/env python
"""Training-step benchmark of every network: steps/s, peak memory, FLOPs, against the authors' style.

    python scripts/bench_training.py --preset paper --device cuda          # paper sizes, on a GPU
    python scripts/bench_training.py --preset demo --device cpu            # the demo config on CPU
    python scripts/bench_training.py --preset demo --styles gem3d --volume-batch 4 --threads 1   # one core

`--threads` sets torch's intra-op threads (as Snakemake's OMP_NUM_THREADS does for a rule with that many
threads); run two such processes side by side to see what two 1-thread jobs on 2 cores get.

For each network (VAE, slice LDM, volume stage 1, volume stage 2) it times forward + backward +
AdamW steps on random data of the paper's (or demo's) shapes, in two styles:
- "authors": fp32, einsum attention (softmax(QK^T)V written out), no compile, no channels_last;
  in stage 2 every weight computes its gradient (the authors' code left the 2D weights
  requires_grad and only kept them out of the optimizer);
- "gem3d": bf16 autocast, SDPA attention, channels_last, torch.compile (CUDA only); stage 2
  computes gradients for the slice-axis layers only.
Both run in the same process on the same card, so their ratio is meaningful. FLOPs per step come
from torch.utils.flop_counter on the meta device. Prints one line per (network, style) and a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import gem3d.models.attention as attention
from gem3d.models import AutoencoderKL, UNet, UNetConfig, VAEConfig, position_embedding

PRESETS = {
    # latent 64 x 64 from 512 x 512 slices (f = 8); 16-slice windows; batch one window per GPU
    "paper": dict(size=512, latent=64, window=16, vae_batch=8, slice_batch=16, vae=VAEConfig.paper(),
                  slice=UNetConfig.paper_slice(), volume=UNetConfig.paper_volume()),
    "demo": dict(size=32, latent=8, window=8, vae_batch=16, slice_batch=16,
                 vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
                 slice=UNetConfig(4, 4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_levels=(1,), head_dim=16, norm_groups=8, context_dim=32),
                 volume=UNetConfig(12, 4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_levels=(1,), head_dim=16, norm_groups=8, ff_mult=0)),
}


def einsum_attention(q, k, v):
    """The authors' style: the attention matrix materialised in full."""
    scale = q.shape[-1] ** -0.5
    weights = torch.einsum("bhnd,bhmd->bhnm", q * scale, k).softmax(dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", weights, v)


@contextlib.contextmanager
def attention_style(style: str):
    original = attention.sdpa
    if style == "authors":
        attention.sdpa = einsum_attention
    try:
        yield
    finally:
        attention.sdpa = original


def networks(p: dict):
    """name -> (model factory, batch factory, loss function)."""
    c, n, lat, size = 4, p["window"], p["latent"], p["size"]
    volume_cfg = p["volume"]
    ctx_dim = p["slice"].context_dim

    def vae_batch(device):
        return (torch.randn(p["vae_batch"], 1, size, size, device=device),)

    def vae_loss(model, x):
        recon, post = model(x)
        return F.l1_loss(recon.float(), x) + 1e-6 * post.kl().float().mean() / x[0].numel()

    def slice_batch(device):
        b = p["slice_batch"]
        return (torch.randn(b, c, lat, lat, device=device), torch.randint(0, 1000, (b,), device=device),
                position_embedding(torch.rand(b), ctx_dim).to(device))

    def slice_loss(model, x, t, ctx):
        return F.mse_loss(model(x, t, context=ctx).float(), x)

    def window_batch(device):
        b = p.get("volume_batch", 1)
        return (torch.randn(b, volume_cfg.in_channels, n, lat, lat, device=device),
                torch.randint(0, 1000, (b, n), device=device))

    def window_loss(model, x, t):
        return F.mse_loss(model(x, t).float(), x[:, :c])

    def stage2(style: str = "gem3d"):
        import dataclasses

        model = UNet(dataclasses.replace(volume_cfg, slice_axis=True))
        for name, param in model.named_parameters():
            param.requires_grad_(style == "authors" or "slice_axis" in name)
        return model

    return {
        "vae": (lambda style="gem3d": AutoencoderKL(p["vae"]), vae_batch, vae_loss),
        "slice_model": (lambda style="gem3d": UNet(p["slice"]), slice_batch, slice_loss),
        "volume_stage1": (lambda style="gem3d": UNet(volume_cfg), window_batch, window_loss),
        "volume_stage2": (stage2, lambda d: (window_batch(d)[0], torch.randint(0, 1000, (p.get("volume_batch", 1),),
                                                                                device=d)), window_loss),
    }


def count_flops(make_model, make_batch, loss_fn, style: str = "gem3d") -> float:
    """FLOPs of one forward + backward, counted on the meta device (no real compute)."""
    with torch.device("meta"):
        model = make_model(style)
    batch = make_batch("meta")
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, *batch).backward()
    return float(counter.get_total_flops())


def bench(make_model, make_batch, loss_fn, style: str, device: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = make_model(style).to(device)
    fast = style == "gem3d" and device == "cuda"
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(device == "cuda" and isinstance(model, UNet))
    if fast:
        model = model.to(memory_format=torch.channels_last)
    trained = [q for n, q in model.named_parameters() if q.requires_grad and
               (not isinstance(model, UNet) or not model.config.slice_axis or "slice_axis" in n)]
    opt = torch.optim.AdamW(trained, lr=1e-5, fused=device == "cuda")
    step_model = torch.compile(model) if fast else model
    batch = make_batch(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if fast else contextlib.nullcontext()

    def one_step():
        with autocast:
            loss = loss_fn(step_model, *batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with attention_style(style):
        for _ in range(warmup):
            one_step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        for _ in range(steps):
            one_step()
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - tic) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan
    return {"s_per_step": seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="network names to run")
    parser.add_argument("--styles", nargs="*", default=["authors", "gem3d"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--volume-batch", type=int, default=1, help="windows per volume-model step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = {**PRESETS[args.preset], "volume_batch": args.volume_batch}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# training benchmark: preset {args.preset}, device {device_name}, torch {torch.__version__}")
    rows = []
    for name, (make_model, make_batch, loss_fn) in networks(p).items():
        if args.only and name not in args.only:
            continue
        result = {}
        for style in args.styles:
            flops = count_flops(make_model, make_batch, loss_fn, style)  # authors' stage 2: every weight gradient
            r = bench(make_model, make_batch, loss_fn, style, args.device, args.steps, args.warmup)
            result[style] = {**r, "flops": flops}
            print(f"{name:14s} {style:8s} {r['s_per_step'] * 1e3:9.1f} ms/step  {1 / r['s_per_step']:7.2f} steps/s  "
                  f"peak {r['peak_gib']:.2f} GiB  {flops / 1e12:.3f} TFLOP/step  "
                  f"{flops / r['s_per_step'] / 1e12:.2f} TFLOP/s", flush=True)
        speedup = result["authors"]["s_per_step"] / result["gem3d"]["s_per_step"] if len(result) == 2 else math.nan
        rows.append((name, result, speedup))
    print("\n| network | style | TFLOP/step | ms/step | steps/s | peak GiB | speed-up vs authors' style |")
    print("|---|---|---|---|---|---|---|")
    for name, result, speedup in rows:
        for style, r in result.items():
            ratio = f"{speedup:.2f}x" if style == "gem3d" else "1.00x"
            print(f"| {name} | {style} | {r['flops'] / 1e12:.3f} | {r['s_per_step'] * 1e3:.1f} | "
                  f"{1 / r['s_per_step']:.2f} | {r['peak_gib']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
