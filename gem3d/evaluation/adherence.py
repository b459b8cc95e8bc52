"""Mask adherence of generated volumes: does each image show the anatomy its mask says?

The real-data nnU-Net of the downstream experiment (row "real", seed 0: trained on real scans only) segments
every generated volume of the downstream rows' sets, and its Dice against the mask the volume was generated from
is that volume's adherence (per region, and their mean). A volume far from its mask teaches a segmentation
network the wrong thing; `evaluation.segmentation.min_adherence` trains a row without such volumes.

Outputs: ``Paths.evaluation/adherence/<set>.json`` (per volume: sample id, source case, Dice per region and
mean), ``tables/adherence.csv`` (per set: volumes, mean, quantiles, share below the threshold) and
``tables/adherence_volumes.csv`` (every volume). The sets' own manifests are the sampling rules' outputs and are
not rewritten (that would make every later result out of date); the adherence files sit beside them in the
evaluation folder.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from gem3d.config import Config
from gem3d.io import InputError, write_json
from gem3d.sampling.sets import adherence_sets

log = logging.getLogger("gem3d.evaluation.adherence")

MODEL = ("real", 0)  # the downstream row and seed whose nnU-Net segments the generated volumes


def measure_sets(cfg: Config, names: list[str]) -> dict[str, list[dict]]:
    """Predict every volume of the sets with the real-data nnU-Net (one prediction call, so the model and
    nnU-Net load once) and score each against its own mask -> per set, its volumes' adherence."""
    from gem3d.evaluation.downstream import adherence_dir, adherence_path, metrics_path, predict, score, set_cases

    data, seed = MODEL
    if not metrics_path(cfg, data, seed).is_file():
        raise InputError(f"{metrics_path(cfg, data, seed)}: the real-data nnU-Net (row {data}, seed {seed}) is not "
                         "trained yet; it segments the generated volumes")
    # set -> [(manifest entry, case)]; case ids carry the set's name, so they are unique over sets
    members = {name: set_cases(cfg, name) for name in names}
    cases = [case for pairs in members.values() for _, case in pairs]
    per_case = score(cfg, predict(cfg, data, seed, cases, adherence_dir(cfg) / "predictions"), cases)
    result = {}
    for name, pairs in members.items():
        volumes = []
        for entry, case in pairs:
            dice = {region: m["dice"] for region, m in per_case[case.case_id]["regions"].items()}
            volumes.append({"sample_id": entry["sample_id"], "source_case": entry["source_case"],
                            "copy": entry.get("copy", 0), "dice": dice,
                            "mean_dice": float(np.mean(list(dice.values())))})
        write_json(adherence_path(cfg, name), {"set": name, "model": {"row": data, "seed": seed}, "volumes": volumes})
        log.info("%s: mask adherence of %d volumes, mean Dice %.3f", name, len(volumes),
                 float(np.mean([v["mean_dice"] for v in volumes])))
        result[name] = volumes
    return result


def measure(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every downstream set's adherence -> (per-set summary, per-volume table)."""
    threshold = cfg.evaluation.segmentation.min_adherence
    lines, summary = [], []
    for name, volumes in measure_sets(cfg, list(adherence_sets(cfg))).items():
        values = np.array([v["mean_dice"] for v in volumes])
        lines += [{"set": name, "sample_id": v["sample_id"], "source_case": v["source_case"], "copy": v["copy"],
                   **{f"Dice {r}": d for r, d in v["dice"].items()}, "mean Dice": v["mean_dice"]} for v in volumes]
        q = np.quantile(values, [0.1, 0.5, 0.9])
        summary.append({"set": name, "volumes": len(values), "mean Dice": values.mean(), "q10": q[0], "median": q[1],
                        "q90": q[2], "min": values.min(),
                        "below threshold": int((values < threshold).sum()) if threshold is not None else None})
    return pd.DataFrame(summary), pd.DataFrame(lines)
