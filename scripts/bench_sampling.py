#!/usr/bin/env python
"""Sampling benchmark: seconds per generated volume, beside the FLOP floor of the networks.

    python scripts/bench_sampling.py --preset paper --device cuda --depth 155   # 512x512, 200 DDIM steps
    python scripts/bench_sampling.py --preset demo --device cpu                  # the demo configuration
    python scripts/bench_sampling.py --preset demo --device cpu --solver dpmpp_2m --steps 15
    python scripts/bench_sampling.py --closed-form     # solver error on Gaussian data (no network)

Random weights (speed does not depend on them). `--solver` picks the sampler (ddim with eta 1, the
paper's; dpmpp_2m, DPM-Solver++(2M), eta 0); a step is one network call per window with either.
One volume = bi-directional propagation of 16-slice windows with overlap 1 (all windows of a round
in one batch), then VAE decoding of every slice in chunks. `--volumes N` propagates N volumes together (their windows share the batches).
The floor is FLOPs / peak dense bf16 throughput (`--peak-tflops`, 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

import torch
from torch.utils.flop_counter import FlopCounterMode

from gem3d.diffusion import SOLVERS, NoiseSchedule, build_solver
from gem3d.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from gem3d.sampling.propagate import propagate_volumes
from gem3d.sampling.windows import plan_windows

PRESETS = {
    "paper": dict(latent=64, window=16, steps=200, depth=155, vae=VAEConfig.paper(),
                  volume=UNetConfig.paper_volume(slice_axis=True)),
    "demo": dict(latent=8, window=8, steps=50, depth=30,
                 vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
                 volume=UNetConfig(12, 4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_levels=(1,), head_dim=16, norm_groups=8, ff_mult=0, slice_axis=True)),
}


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def closed_form_table(steps_list=(5, 10, 15, 25, 50, 100, 200), n=4096) -> None:
    """End-point error of each solver (DDIM with eta 0) on Gaussian data x0 ~ N(mu, s^2) per dimension
    (s in 0.05..1): the exact epsilon is s_t (x - a mu) / (a^2 s^2 + s_t^2), and the probability-flow ODE
    keeps (x - a mu) / sqrt(a^2 s^2 + s_t^2) constant, so its end point is known in closed form."""
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    mu = torch.linspace(-1, 1, n, dtype=torch.float64)
    s = torch.linspace(0.05, 1.0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x_T = torch.randn(1, n, generator=g, dtype=torch.float64)

    def var(t):
        return schedule.alpha_bar(t) * s**2 + 1 - schedule.alpha_bar(t)

    def eps(x, t):
        return (1 - schedule.alpha_bar(t)) ** 0.5 * (x - schedule.alpha_bar(t) ** 0.5 * mu) / var(t)

    def exact(t0):  # the ODE from t0 to 0, then the final step (the x0 prediction at 0)
        a0, a = schedule.alpha_bar(0) ** 0.5, schedule.alpha_bar(t0) ** 0.5
        x_0 = a0 * mu + (var(0) / var(t0)).sqrt() * (x_T - a * mu)
        return mu + a0 * s**2 * (x_0 - a0 * mu) / var(0)

    print("# closed-form solver error: Gaussian data, 4096 dimensions, RMS error of the end point")
    print("| steps | " + " | ".join(sorted(SOLVERS)) + " |\n|---:|" + "---:|" * len(SOLVERS))
    for steps in steps_list:
        errors = []
        for name in sorted(SOLVERS):
            solver = build_solver(name, schedule, steps, 0.0)
            errors.append(float((solver.sample(eps, x_T.clone()) - exact(solver.timesteps[0])).pow(2).mean().sqrt()))
        print(f"| {steps} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=None, help="slices per volume")
    parser.add_argument("--volumes", type=int, default=1)
    parser.add_argument("--solver", choices=sorted(SOLVERS), default="ddim",
                        help="sampler: ddim (eta 1, the paper's) or dpmpp_2m (DPM-Solver++(2M), eta 0)")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (network calls per window); "
                        "default: the preset's")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs and the floor; do not run")
    parser.add_argument("--closed-form", action="store_true", help="print the solvers' error on Gaussian data "
                        "(closed-form ODE end point; no network) and stop")
    args = parser.parse_args()
    if args.closed_form:
        closed_form_table()
        return
    p = PRESETS[args.preset]
    depth, steps, n, lat = args.depth or p["depth"], args.steps or p["steps"], p["window"], p["latent"]
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = UNet(p["volume"]).to(device).eval()
    vae = AutoencoderKL(p["vae"]).to(device).eval()
    if args.device == "cuda":
        net = net.to(memory_format=torch.channels_last)
    step_net = torch.compile(net) if args.compile else net
    bf16 = args.precision == "bf16" and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def model_fn(x, t, cond):
        with autocast():
            return step_net(torch.cat([x, cond], dim=1), t).float()

    sampler = build_solver(args.solver, NoiseSchedule(), steps, 1.0 if args.solver == "ddim" else 0.0)
    size = lat * p["vae"].downsampling_factor
    mask_slices = [torch.rand(depth, 1, size, size, device=device) * 2 - 1 for _ in range(args.volumes)]
    informed = [torch.randn(4, lat, lat, device=device) for _ in range(args.volumes)]
    starts = [depth // 2] * args.volumes

    def run():
        generators = [torch.Generator().manual_seed(v) for v in range(args.volumes)]
        with torch.no_grad():
            masks = []
            for m in mask_slices:  # the masks go through the VAE encoder (posterior mean)
                with autocast():
                    parts = [vae.encode(m[lo:lo + 16]).mean.float() for lo in range(0, depth, 16)]
                masks.append(torch.cat(parts).permute(1, 0, 2, 3))  # (d, c, h, w) -> (c, d, h, w)
            out = propagate_volumes(model_fn, sampler, masks, informed, starts, n, 1, 4, generators,
                                    max_batch_windows=64)
            for z in out:
                for lo in range(0, depth, 16):
                    with autocast():
                        vae.decode(z[:, lo:lo + 16].permute(1, 0, 2, 3))
        if device.type == "cuda":
            torch.cuda.synchronize()

    plan = plan_windows(depth, n, starts[0], 1)
    windows = sum(len(r.windows) for r in plan)
    with torch.device("meta"):
        meta_net, meta_vae = UNet(p["volume"]), AutoencoderKL(p["vae"])
    window_flops = flops_of(lambda: meta_net(torch.randn(1, 12, n, lat, lat, device="meta"),
                                             torch.zeros(1, dtype=torch.long, device="meta")))
    slice_decode_flops = flops_of(lambda: meta_vae.decode(torch.randn(1, 4, lat, lat, device="meta")))
    slice_encode_flops = flops_of(lambda: meta_vae.encode(torch.randn(1, 1, size, size, device="meta")).mean)
    total = args.volumes * (window_flops * windows * steps + (slice_decode_flops + slice_encode_flops) * depth)
    seconds = float("nan")
    if not args.flops_only:
        if device.type == "cuda":
            run()  # warm-up (and compilation)
        tic = time.perf_counter()
        run()
        seconds = time.perf_counter() - tic
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# sampling benchmark: preset {args.preset}, {name}, torch {torch.__version__}, precision "
          f"{'bf16' if bf16 else 'fp32'}, compile {args.compile}")
    print(f"volumes {args.volumes} x {depth} slices, window {n}, {windows} windows in {len(plan)} rounds per volume, "
          f"{steps} {args.solver} steps (eta {sampler.eta:g})")
    print(f"FLOPs: {window_flops / 1e12:.3f} TFLOP per window forward, {slice_decode_flops / 1e12:.3f} TFLOP per "
          f"slice decode, {slice_encode_flops / 1e12:.3f} TFLOP per mask-slice encode, {total / 1e12:.1f} TFLOP in all")
    print(f"measured: {seconds:.2f} s in all, {seconds / args.volumes:.2f} s per volume")
    print(f"bf16 FLOP floor at {args.peak_tflops:.0f} TFLOP/s: {total / args.peak_tflops / 1e12 / args.volumes:.2f} s "
          f"per volume; measured / floor = {seconds / (total / args.peak_tflops / 1e12):.1f}")


if __name__ == "__main__":
    main()
