#!/usr/bin/env python
"""Seconds per training step of a downstream nnU-Net network, at the widths `evaluation.segmentation.base_features`
gives it: the network nnU-Net planned (a prepared row's nnUNetPlans.json), built as nnU-Net builds it (deep
supervision on), one SGD step (nnU-Net's: momentum 0.99, Nesterov) on a random batch of the planned patch size.
Data loading and augmentation are not included (nnU-Net's log gives the whole epoch time).

    python scripts/bench_nnunet_train.py \\
        results/hippocampus_study/evaluation/nnunet/preprocessed/Dataset921_hippocampus_study_real/nnUNetPlans.json \\
        --configuration 2d --batch 12 --threads 1 2 --base-features 32 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

from gem3d.evaluation.downstream import edit_plans  # noqa: E402
from gem3d.io import read_json  # noqa: E402


def step_seconds(plans: dict, configuration: str, batch: int, base_features: int | None, steps: int) -> float:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    conf = edit_plans(plans, configuration, batch, base_features)["configurations"][configuration]
    arch = conf["architecture"]
    n_labels = len(plans.get("labels", {})) or 3
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                 n_labels, deep_supervision=True)
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(batch, 1, *conf["patch_size"])
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        loss = sum(out.float().mean() for out in net(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plans", type=Path, help="a prepared row's nnUNetPlans.json")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--base-features", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args(argv)
    plans = read_json(args.plans)
    print(f"{args.plans}: {args.configuration}, batch {args.batch}, {torch.__version__}", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for base in args.base_features:
            seconds = step_seconds(plans, args.configuration, args.batch, base, args.steps)
            print(f"threads {threads}  base_features {base:3d}: {seconds * 1000:6.0f} ms per step, "
                  f"{seconds / args.batch * 1000:5.1f} ms per sample", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
