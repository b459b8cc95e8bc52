#!/usr/bin/env python
"""The two Python parts of scripts/gpu_check.sh: what machine this is, and the markdown table.

    python scripts/gpu_check_report.py env --device cuda|cpu      # versions and card; exit 2 if cuda is missing
    python scripts/gpu_check_report.py table --dir DIR --device D --preset P --sample-steps S

`table` reads the logs gpu_check.sh left in DIR (pytest_gpu.log, bench_training.log,
bench_sampling*.log), writes DIR/gpu_check.md and prints it. The targets are those of
docs/benchmarks.md; they apply to the paper preset on a GPU, so other runs show "n/a".
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_PEAK_GB = 30.0  # stage-1 and stage-2 training at one window: within 30 GB
TARGET_SPEEDUP = 2.0  # gem3d style at least 2x the authors' style (stage 1 and 2)
TARGET_VOLUME_S = 25.0  # at most 25 s per 155-slice volume at 200 DDIM steps
TARGET_STEPS = 200
TARGETED = ("volume_stage1", "volume_stage2")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(device: str) -> tuple[list[str], str]:
    """(lines to print, one-line card description); raises SystemExit(2) for cuda without a GPU."""
    import torch

    visible = torch.cuda.is_available()
    if device == "cuda" and not visible:
        visible_env = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        sys.stderr.write(f"error: --device cuda but torch sees no CUDA GPU (torch {torch.__version__}, "
                         f"CUDA_VISIBLE_DEVICES={visible_env}); run on a GPU node or use --device cpu\n")
        raise SystemExit(2)
    cudnn = torch.backends.cudnn.version() if visible else None
    lines = [f"python {platform.python_version()}, {platform.platform()}",
             f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}, runtime "
             f"{'cuDNN ' + str(cudnn) if visible else 'none'})"]
    if visible:
        props = torch.cuda.get_device_properties(0)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        card = (f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}"
                f"{', driver ' + driver[0] if driver else ''}; {torch.cuda.device_count()} visible")
    else:
        threads = torch.get_num_threads()
        card = (f"none (the CPU: {cpu_name()}, {os.cpu_count()} cores, torch uses {threads} "
                f"thread{'s' if threads != 1 else ''})")
    lines.append(f"card: {card}")
    return lines, card


# ---------------------------------------------------------------------------------------------
# parsing the logs


def parse_pytest(text: str) -> dict:
    """Counts from pytest's summary line ('5 passed, 2 skipped, 300 deselected in 3.2s')."""
    counts = {}
    for line in reversed(text.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found:
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
            break
    return counts


def parse_training(text: str) -> dict:
    """network -> style -> (ms/step, peak GiB) from bench_training.py's markdown table."""
    out: dict = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in ("authors", "gem3d"):
            out.setdefault(cells[0], {})[cells[1]] = (float(cells[3]), float(cells[5]))
    return out


def parse_sampling(text: str) -> dict | None:
    m = re.search(r"measured: ([\d.naninf]+) s in all, ([\d.naninf]+) s per volume", text)
    head = re.search(r"precision (\w+), compile (\w+)", text)
    shape = re.search(r"volumes (\d+) x (\d+) slices, .*?, (\d+) (\S+) steps", text)
    if not (m and head and shape):
        return None
    return {"per_volume": float(m.group(2)), "precision": head.group(1), "compile": head.group(2) == "True",
            "volumes": int(shape.group(1)), "depth": int(shape.group(2)), "steps": int(shape.group(3)),
            "solver": shape.group(4).lower()}


# ---------------------------------------------------------------------------------------------
# the table


def verdict(ok: bool | None, applies: str | None) -> str:
    if applies is not None:
        return f"n/a ({applies})"
    return "-" if ok is None else ("yes" if ok else "**no**")


def build_table(folder: Path, device: str, preset: str, card: str) -> str:
    import torch

    scope = None if (device == "cuda" and preset == "paper") else f"preset {preset} on {device}"
    rows = [("measurement", "value", "target", "met"), ("---", "---", "---", "---")]

    tests = parse_pytest((folder / "pytest_gpu.log").read_text()) if (folder / "pytest_gpu.log").exists() else {}
    ran = tests.get("passed", 0) + tests.get("failed", 0) + tests.get("error", 0)
    if not tests:
        rows.append(("GPU tests (pytest -m gpu)", "not run", "all pass", "-"))
    elif ran == 0:
        rows.append(("GPU tests (pytest -m gpu)", f"{tests.get('skipped', 0)} skipped (no CUDA GPU)", "all pass",
                     "n/a (no GPU)"))
    else:
        bad = tests.get("failed", 0) + tests.get("error", 0)
        value = ", ".join(f"{n} {k}" for k, n in tests.items() if k != "deselected")
        rows.append(("GPU tests (pytest -m gpu)", value, "all pass", verdict(bad == 0, None)))

    train_log = folder / "bench_training.log"
    training = parse_training(train_log.read_text()) if train_log.exists() else {}
    for name, styles in training.items():
        authors, gem3d = styles.get("authors"), styles.get("gem3d")
        if authors and gem3d:
            speedup = authors[0] / gem3d[0]
            target = f"gem3d >= {TARGET_SPEEDUP:g}x faster" if name in TARGETED else "-"
            ok = speedup >= TARGET_SPEEDUP if name in TARGETED else None
            rows.append((f"train {name}: ms/step, authors' style / gem3d", f"{authors[0]:.1f} / {gem3d[0]:.1f} "
                         f"({speedup:.2f}x)", target, verdict(ok, scope if name in TARGETED else None)))
        peak = (gem3d or authors)[1]
        if math.isnan(peak):
            rows.append((f"train {name}: peak memory, gem3d", "n/a (measured on CUDA only)",
                         f"<= {TARGET_PEAK_GB:g} GB" if name in TARGETED else "-", "-"))
        else:
            ok = peak * 2**30 / 1e9 <= TARGET_PEAK_GB if name in TARGETED else None
            rows.append((f"train {name}: peak memory, gem3d", f"{peak:.2f} GiB ({peak * 2**30 / 1e9:.1f} GB)",
                         f"<= {TARGET_PEAK_GB:g} GB" if name in TARGETED else "-",
                         verdict(ok, scope if name in TARGETED else None)))
    if not training:
        rows.append(("train: benchmark", "failed (see bench_training.log)", "-", "**no**"))

    for log in sorted(folder.glob("bench_sampling*.log")):
        s = parse_sampling(log.read_text())
        if s is None:
            rows.append((f"sample: {log.name}", "failed (see the log)", "-", "**no**"))
            continue
        how = ", ".join(x for x in ("compiled" if s["compile"] else "", f"{s['volumes']} volumes together"
                                    if s["volumes"] > 1 else "", f"{s['steps']} {s['solver']} steps") if x)
        applies = scope
        if applies is None and (s["steps"] != TARGET_STEPS or s["depth"] != 155 or s["solver"] != "ddim"):
            applies = f"{s['steps']} {s['solver']} steps, {s['depth']} slices"
        elif applies is not None and s["steps"] != TARGET_STEPS:
            applies += f", {s['steps']} steps"
        rows.append((f"sample: s per {s['depth']}-slice volume, {how}", f"{s['per_volume']:.2f}",
                     f"<= {TARGET_VOLUME_S:g} s at {TARGET_STEPS} ddim steps",
                     verdict(s["per_volume"] <= TARGET_VOLUME_S, applies)))

    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown"
    head = (f"scripts/gpu_check.sh --device {device} --preset {preset}: {card}; torch {torch.__version__}"
            f" (CUDA build {torch.version.cuda or 'none'}); commit {commit}; {datetime.date.today().isoformat()}.")
    note = ("" if scope is None else
            f"\n\nThis run is {scope}, not the paper preset on a GPU: the targets (docs/benchmarks.md) do not apply.")
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    return f"{head}\n\n{table}{note}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--device", choices=("cuda", "cpu"), required=True)
    table = sub.add_parser("table")
    table.add_argument("--dir", type=Path, required=True)
    table.add_argument("--device", choices=("cuda", "cpu"), required=True)
    table.add_argument("--preset", choices=("paper", "demo"), required=True)
    args = parser.parse_args()
    lines, card = describe(args.device)
    if args.command == "env":
        print("\n".join(lines))
        return
    text = build_table(args.dir, args.device, args.preset, card)
    tmp = args.dir / "gpu_check.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.dir / "gpu_check.md")
    print(text, end="")


if __name__ == "__main__":
    main()
