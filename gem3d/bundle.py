"""A trained generator to hand to another lab: `gem3d export` writes it, `gem3d generate --bundle` uses it.

A bundle is a folder that holds everything `gem3d generate` needs from a run and NO patient image data:

    config.yaml                  the run's config without the keys that name cases or local files (PRIVATE_KEYS)
    model_card.md, .json         what the networks were trained on and how (cases, steps), what was measured
    checksums.sha256             SHA-256 of every other file (`sha256sum -c` checks them)
    <name>/models/*.pt           the VAE, the volume model (stage 2), the slice model (IG) and the baseline, their
                                 training-only state (optimizer, random generators) removed
    <name>/slices/index.json     the slice store's settings (slice size and fit, labels, intensity normalisation,
                                 the median intensity range of the training cases) without any case
    <name>/nnunet/...            the dataset's nnU-Net plans and dataset.json (how a new mask is preprocessed)

Not in it: images, masks, latents, slice arrays, case lists or geometries of the training data. IC informed
slices need real slices, so a bundle generates with IG (its slice model) or an informed image the user gives.
`bundle_config(folder)` reads a bundle's config with its results root pointed at the bundle, so every stage
reads the bundle's files where it would read a run's.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from gem3d import version
from gem3d.config import Config, load_config
from gem3d.io import InputError, atomic_dir, file_sha256, read_json, write_json
from gem3d.paths import Paths

log = logging.getLogger("gem3d.bundle")

MODELS = ("vae", "volume_stage2", "slice_model", "baseline_stage2")  # what generation may need (the first two must be)
TRAINING_ONLY = ("optimizer", "rng", "batch_plan")  # checkpoint entries that only resume a training
CONFIG = "config.yaml"
# config keys that name training cases (an inline split, CASE:SLICE informed slices) or the lab's own files: left out
# of the bundle's config (their defaults apply; data.path is a placeholder, never read by generation)
PRIVATE_KEYS = ("data.split", "data.test_path", "sampling.deenhance_informed", "generation.masks",
                "generation.informed", "generation.informed_image", "generation.slice", "generation.region")
NO_DATA_PATH = "not-in-the-bundle"


def export_bundle(cfg: Config, out: Path) -> Path:
    """Write the bundle of the run `cfg` to the folder `out` (atomically: complete or not there)."""
    from gem3d.training.checkpoint import load_checkpoint, save_checkpoint, sha256_of

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "checksums.sha256").is_file():
        raise InputError(f"{out}: --out is a folder with files that is not a gem3d bundle; the bundle replaces the "
                         "folder, so give a new or empty one")
    paths = Paths(cfg)
    missing = [m for m in MODELS[:2] if not paths.model(m).is_file()]
    if missing:
        raise InputError(f"{paths.model(missing[0])}: not trained yet; a bundle needs the VAE and the volume model")
    if not cfg.source or not Path(cfg.source).is_file():
        raise InputError(f"{cfg.source}: the run's config file is needed (it goes into the bundle)")
    with atomic_dir(out) as tmp:
        root = tmp / cfg.name
        _write_config(cfg, tmp / CONFIG)
        vae_sha = {"from": sha256_of(paths.model("vae")), "to": None}
        written = {}
        for name in MODELS:
            if not paths.model(name).is_file():
                continue
            payload = {k: v for k, v in load_checkpoint(paths.model(name)).items()
                       if k not in TRAINING_ONLY + ("checksum",)}
            extra = payload.get("extra") or {}
            if name != "vae":
                made_with = extra.get("latents_vae_sha256")
                if made_with not in (None, vae_sha["from"]):
                    raise InputError(f"{paths.model(name)}: trained on another VAE's latents than {paths.model('vae')}"
                                     "; rerun the run's stages before exporting it")
                payload["extra"] = {**extra, "latents_vae_sha256": vae_sha["to"]}
            target = root / "models" / f"{name}.pt"
            save_checkpoint(target, payload)
            if name == "vae":
                vae_sha["to"] = sha256_of(target)
            written[name] = payload
        _settings(cfg, root)
        card = _model_card(cfg, written)
        write_json(tmp / "model_card.json", card)
        (tmp / "model_card.md").write_text(_card_markdown(card))
        lines = [f"{file_sha256(p)}  {p.relative_to(tmp).as_posix()}" for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.name != "checksums.sha256"]
        (tmp / "checksums.sha256").write_text("\n".join(lines) + "\n")
    log.info("bundle of %s (%s) -> %s", cfg.name, ", ".join(written), out)
    return out


def _write_config(cfg: Config, path: Path) -> None:
    """The run's config file as parsed (its comments dropped), without PRIVATE_KEYS."""
    import yaml

    from gem3d.config_file import read_config_file

    raw = read_config_file(Path(cfg.source))
    for dotted in PRIVATE_KEYS:
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    raw.setdefault("data", {})["path"] = NO_DATA_PATH
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _settings(cfg: Config, root: Path) -> None:
    """The slice store's index without its cases, and the nnU-Net plans: what new masks are prepared with."""
    paths = Paths(cfg)
    index = read_json(paths.slices / "index.json")
    ranges = [case["intensity_range"] for cid, case in index["cases"].items() if cid in index["split"]["train"]]
    settings = {k: v for k, v in index.items() if k not in ("cases", "split")}
    from gem3d.data.slice_store import SliceStore
    from gem3d.sampling.new_masks import never_cropped

    settings.update(cases={}, split={"train": [], "test": []}, never_cropped=never_cropped(SliceStore(paths.slices)),
                    intensity_range_median=[float(v) for v in np.median(np.asarray(ranges, float), axis=0)])
    write_json(root / "slices" / "index.json", settings)
    for folder, files in ((paths.preprocessed_dataset, ("nnUNetPlans.json", "dataset.json")),
                          (paths.raw_dataset, ("dataset.json",))):
        target = root / folder.relative_to(paths.root)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if not (folder / name).is_file():
                raise InputError(f"{folder / name}: missing (run the preprocessing before exporting)")
            shutil.copy(folder / name, target / name)


def _model_card(cfg: Config, models: dict) -> dict:
    paths = Paths(cfg)
    split = read_json(paths.split) if paths.split.is_file() else {"train": [], "test": []}
    card = {"gem3d_version": version(), "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "run": cfg.name,
            "data": {"format": cfg.data.format, "labels": cfg.data.labels, "modality": cfg.data.modality,
                     "training_cases": len(split.get("train", [])), "test_cases": len(split.get("test", []))},
            "slices": {"size": cfg.preprocess.slice_size, "fit": cfg.preprocess.slice_fit,
                       "intensity": cfg.preprocess.intensity},
            "networks": {}, "measured": {}}
    for name, payload in models.items():
        extra = payload.get("extra") or {}
        card["networks"][name] = {"kind": payload["kind"], "steps": int(payload.get("step") or 0),
                                  "last_loss": (payload.get("history") or {}).get("last_loss"),
                                  "parameters": int(sum(np.prod(v.shape) for v in payload["state_dict"].values())),
                                  "imported_from": (extra.get("pretrained") or {}).get("file")
                                  if isinstance(extra.get("pretrained"), dict) else extra.get("pretrained")}
    if paths.vae_metrics.is_file():
        card["measured"]["vae_test_reconstruction"] = read_json(paths.vae_metrics)
    for table in ("test_fidelity", "generation_quality", "segmentation"):
        md = paths.tables / f"{table}.md"
        if md.is_file():
            card["measured"][table] = md.read_text()
    return card


def _card_markdown(card: dict) -> str:
    lines = [f"# gem3d generator: {card['run']}", "",
             f"gem3d {card['gem3d_version']}, written {card['written']}. No patient image data is in this bundle; "
             "networks trained on few cases can still reproduce them closely (check `tables/privacy` of the run "
             "before sharing).", "",
             f"Trained on {card['data']['training_cases']} cases ({card['data']['format']}, {card['data']['modality']}; "
             f"labels {card['data']['labels']}), {card['slices']['size']}x{card['slices']['size']} slices "
             f"({card['slices']['fit']}, intensity over the {card['slices']['intensity']}); "
             f"{card['data']['test_cases']} test cases held out.", "", "| network | steps | parameters | last loss | "
             "imported from |", "|---|---|---|---|---|"]
    for name, n in card["networks"].items():
        lines.append(f"| {name} | {n['steps']} | {n['parameters']:,} | {n['last_loss']} | {n['imported_from'] or ''} |")
    vae = card["measured"].get("vae_test_reconstruction")
    if vae:
        lines += ["", f"VAE test reconstruction: PSNR {vae['psnr']:.2f} dB, SSIM {vae['ssim']:.4f}, scale factor "
                      f"{vae['scale_factor']:.5f}."]
    for table in ("test_fidelity", "generation_quality", "segmentation"):
        if table in card["measured"]:
            lines += ["", card["measured"][table].strip()]
    return "\n".join(lines) + "\n"


def bundle_config(folder: Path) -> Config:
    """The config of a bundle, reading and writing under the bundle (its results root), after checking every
    file against checksums.sha256 (one line naming the first that differs)."""
    folder = Path(folder)
    sums = folder / "checksums.sha256"
    if not (folder / CONFIG).is_file() or not sums.is_file():
        raise InputError(f"{folder}: not a gem3d bundle (no {CONFIG} or checksums.sha256; write one with gem3d export)")
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: listed in {sums} but missing")
        if file_sha256(path) != digest:
            raise InputError(f"{path}: its SHA-256 differs from {sums} (a changed or damaged file)")
    cfg = load_config(folder / CONFIG, check_paths=False)
    return dataclasses.replace(cfg, results_root=str(folder))
