"""Model files made from given networks instead of trainings (`*.pretrained` keys, gem3d/pretrained.py).

The train rule of a network given as a file runs this instead of training: it reads the file, checks it against
the config (every contradiction is one line naming the config key) and writes the run's model file in gem3d's
format, so sampling, evaluation and the report use it as a trained one. The model file records where it came
from (`extra["pretrained"]`: file, SHA-256, layout, weights) and its fingerprint holds the file's SHA-256.

- A release run (the GEM-3D authors' latent-diffusion checkpoints): the UNet from the yaml and the checkpoint
  (gem3d/models/release_import.py), the noise schedule of the yaml (which must equal `diffusion`), the 16-slice
  window of the authors' pseudo-3D layers, and their first stage, which must be the VAE of this run (the network
  was trained in its latent space: point `vae.pretrained` at the release).
- A gem3d model file (e.g. from `gem3d export`): taken as it is, after the same checks sampling makes (the
  network config it was trained with, the VAE it was trained on).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gem3d.config import Config
from gem3d.fingerprint import check_model_config, stage_fingerprint
from gem3d.io import InputError
from gem3d.models import model_args
from gem3d.models.specs import latent_channels, slice_unet_config, variant_unet_config
from gem3d.pretrained import ReleaseRun, find_run, run_folder
from gem3d.training.checkpoint import load_checkpoint, save_checkpoint, sha256_of

log = logging.getLogger("gem3d.imported")

# the architecture numbers a release network and the config must agree on (UNetConfig field -> config key)
ARCHITECTURE = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                "attention_levels", "context_dim", "scale_shift_norm")


def _describe(model: str) -> tuple[str, str, int]:
    """(config key of its pretrained section, fingerprint role, stage) of a model file name."""
    if model == "slice_model":
        return "slice_model", "slice_model", 0
    variant, _, stage = model.rpartition("_stage")
    key = "volume_model.pretrained" if variant == "volume" else "volume_model.baseline_pretrained"
    return key, "volume", int(stage)


def import_network(cfg: Config, model: str, vae_path: Path, out: Path) -> None:
    """Write the model file `out` of `model` (slice_model, volume_stage1/2, baseline_stage1/2) from the file
    `cfg.pretrained(model)`; `vae_path` is this run's VAE model file."""
    source = cfg.pretrained(model)
    key, role, stage = _describe(model)
    if stage == 1 and source == cfg.pretrained(model.replace("stage1", "stage2")):
        key = f"{key}.stage2 (its 2D part, as stage 1)"
    else:
        key = f"{key}.stage{stage}" if stage else f"{key}.pretrained"
    if source is None:
        raise InputError(f"{cfg.source}: config key {key}: not set, {model} is trained")
    source_sha = sha256_of(source, None) if Path(source).is_file() else None
    vae_sha = sha256_of(vae_path)
    if run_folder(source) is None:
        payload = _gem3d_file(cfg, model, role, Path(source), vae_sha, key)
    else:
        run = find_run(source)
        source_sha = sha256_of(run.checkpoint, None)
        payload = _release(cfg, model, role, run, vae_path, key)
        payload["fingerprint"] = stage_fingerprint(cfg, "import_network", {"pretrained": source_sha})
    payload["extra"] = {**payload.get("extra", {}), "latents_vae_sha256": vae_sha}
    payload["extra"]["pretrained"] = {**payload["extra"].get("pretrained", {}), "file": str(source),
                                      "sha256": source_sha}
    save_checkpoint(out, payload)
    log.info("%s: imported from %s (sha256 %s)", out, source, (source_sha or "?")[:12])


def _gem3d_file(cfg: Config, model: str, role: str, path: Path, vae_sha: str, key: str) -> dict:
    payload = load_checkpoint(path, expect_kind="unet")
    check_model_config(payload, cfg, role, path)
    extra = payload.get("extra") or {}
    trained_vae = extra.get("latents_vae_sha256")
    if trained_vae is not None and trained_vae != vae_sha:
        raise InputError(f"{path}: ({key}) trained in another VAE's latent space (sha256 {trained_vae[:12]}) than "
                         f"this run's VAE ({vae_sha[:12]}); set vae.pretrained to the VAE it was trained with")
    want_informed = not model.startswith("baseline")
    slice_axis = payload["model_args"].get("slice_axis", False)
    if model != "slice_model" and (extra.get("informed", want_informed) != want_informed
                                   or (not slice_axis and model.endswith("stage2"))):
        raise InputError(f"{path}: ({key}) is a {extra.get('role', 'different')} model, not the {model} it is "
                         "given as")
    if slice_axis and model.endswith("stage1"):  # stage 1 from a stage-2 file: its 2D part
        from gem3d.models import build_model
        from gem3d.training.checkpoint import inference_state_dict

        net = build_model("unet", payload["model_args"])
        net.load_state_dict(inference_state_dict(payload, use_ema=True))
        net = two_d_part(net)
        payload = {**payload, "model_args": model_args(net), "ema_state_dict": None,
                   "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                   "extra": {**extra, "role": extra.get("role", "").replace("stage2", "stage1")}}
        extra = payload["extra"]
    return {**payload, "extra": {**extra, "pretrained": {"layout": "gem3d"}}}


def two_d_part(net):
    """The stage-1 (2D) network inside a stage-2 one: every weight but the slice-axis layers'."""
    from dataclasses import replace

    from gem3d.models import UNet
    from gem3d.models.pseudo3d import is_slice_axis_name

    flat = UNet(replace(net.config, slice_axis=False))
    flat.load_state_dict({k: v for k, v in net.state_dict().items() if not is_slice_axis_name(k)})
    return flat


def _release(cfg: Config, model: str, role: str, run: ReleaseRun, vae_path: Path, key: str) -> dict:
    from gem3d.models.release_import import PSEUDO3D_FRAMES, import_unet, schedule_args
    from gem3d.models import weights_file

    weights = cfg.slice_model.pretrained_weights if model == "slice_model" else cfg.volume_model.pretrained_weights
    c = latent_channels(cfg)
    if model == "slice_model":
        want, expect_cond = slice_unet_config(cfg), "crossattn"
    else:
        variant = "baseline" if model.startswith("baseline") else "gem3d"
        want, expect_cond = variant_unet_config(cfg, variant, slice_axis=model.endswith("stage2")), "concat"
    if run.conditioning != expect_cond:
        raise InputError(f"{run.project_yaml}: conditioning_key {run.conditioning!r}, but {key} needs a "
                         f"{expect_cond} network ({model})")
    if not run.pseudo3d and want.slice_axis:
        raise InputError(f"{run.project_yaml}: a 2D (stage 1 or slice) network, but {key} is the {model}")
    state = weights_file.read_state_dict(run.checkpoint, "release checkpoint")
    net, info = import_unet(run, weights, state)
    if run.pseudo3d and not want.slice_axis:  # stage 1 from a stage-2 run: its 2D part
        net = two_d_part(net)
    _check_architecture(cfg, net.config, want, run, model)
    schedule = schedule_args(run)
    for name in ("num_train_timesteps", "beta_start", "beta_end"):
        if abs(float(getattr(cfg.diffusion, name)) - float(schedule[name])) > 1e-12:
            raise InputError(f"{cfg.source}: config key diffusion.{name}: {getattr(cfg.diffusion, name)}, but the "
                             f"network of {run.project_yaml} was trained with {schedule[name]}")
    if run.pseudo3d and cfg.volume_model.window != PSEUDO3D_FRAMES:
        raise InputError(f"{cfg.source}: config key volume_model.window: {cfg.volume_model.window}, but the authors' "
                         f"pseudo-3D layers ({run.checkpoint}) work on windows of {PSEUDO3D_FRAMES} slices")
    _check_first_stage(run, state, vae_path)
    extra = {"role": "slice_model" if model == "slice_model" else
             f"{'baseline' if model.startswith('baseline') else 'volume_model'}_stage{2 if want.slice_axis else 1}",
             "schedule": schedule, "pretrained": {"layout": "gem3d-release", "project_yaml": str(run.project_yaml),
                                                  "weights": weights, "latent_channels": c,
                                                  "part": "2D part of a stage-2 network" if run.pseudo3d and not
                                                  want.slice_axis else "whole"}}
    if model == "slice_model":
        extra["position_dim"] = cfg.slice_model.position_dim
    else:
        extra.update(window=cfg.volume_model.window, informed=not model.startswith("baseline"),
                     variant="baseline" if model.startswith("baseline") else "gem3d", injection="concat")
    return {"kind": "unet", "model_args": model_args(net), "step": 0, "ema_state_dict": None, "train_config": None,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "extra": extra,
            "history": {"losses": [], "last_loss": None}}


def _check_architecture(cfg: Config, got, want, run: ReleaseRun, model: str) -> None:
    """The release network's numbers equal the config's (the config key named when not)."""
    section = "slice_model" if model == "slice_model" else "volume_model"
    for name in ARCHITECTURE:
        mine, theirs = getattr(want, name), getattr(got, name)
        if mine != theirs:
            where = {"context_dim": "slice_model.position_dim", "in_channels": "vae.model.latent_channels",
                     "out_channels": "vae.model.latent_channels"}.get(name, f"{section}.model.{name}")
            raise InputError(f"{cfg.source}: config key {where}: {mine!r}, but the {model} network of "
                             f"{run.project_yaml} has {name} {theirs!r}")
    levels = sorted(set(got.attention_levels) | {len(got.channel_mult) - 1})
    for level in levels:
        width = got.model_channels * got.channel_mult[level]
        if want.heads(width) != got.heads(width):
            raise InputError(f"{cfg.source}: config key {section}.model.head_dim: {want.head_dim} gives "
                             f"{want.heads(width)} heads at width {width}, the network of {run.project_yaml} has "
                             f"{got.heads(width)}")


def _check_first_stage(run: ReleaseRun, state: dict[str, torch.Tensor], vae_path: Path) -> None:
    """The run's first stage (first_stage_model.*) is this run's VAE: the network works in its latent space."""
    from gem3d.data.latents import load_vae
    from gem3d.models.vae_import import autoencoder_from_state, detect_layout

    vae = load_vae(vae_path)
    layout, first_stage = detect_layout(state, run.checkpoint)
    mine = vae.model.state_dict()
    theirs = autoencoder_from_state(first_stage, layout, vae.model.config, run.checkpoint)[0].state_dict()
    differs = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape
               or not torch.allclose(theirs[k].float(), mine[k].float(), rtol=0, atol=1e-6)]
    if differs:
        raise InputError(f"{run.checkpoint}: its first stage (first_stage_model.*) differs from this run's VAE "
                         f"{vae_path} (first at {differs[0]}): the network was trained in its own first stage's latent "
                         "space; set vae.pretrained to the same release run")
    if abs(vae.scale_factor - run.scale_factor) > 1e-9 * max(1.0, abs(run.scale_factor)):
        raise InputError(f"{vae_path}: VAE scale factor {vae.scale_factor}, but {run.project_yaml} has scale_factor "
                         f"{run.scale_factor}: set vae.pretrained to the release run (its yaml's factor is used)")



def pretrained_vae(cfg: Config):
    """The VAE of `vae.pretrained` as (gem3d AutoencoderKL, its scale factor or None to measure, provenance).

    A release run: its first stage (first_stage_model.*), whose architecture must be `vae.model`'s (the key
    named when not), and the scale factor of its yaml (`vae.scale_factor`, when set, must equal it). A gem3d
    VAE model file: its weights and scale factor. Any other autoencoder file (KL-f8, diffusers): its weights and
    `vae.scale_factor` (None: measured)."""
    from gem3d.data.latents import load_vae
    from gem3d.models.specs import vae_config
    from gem3d.models.vae_import import import_autoencoder

    path = Path(cfg.vae.pretrained)
    given = cfg.vae.scale_factor
    if run_folder(path) is not None:
        from gem3d.models.release_import import first_stage_config

        run = find_run(path, need_unet=False)
        for name, theirs in first_stage_config(run).items():
            mine = getattr(vae_config(cfg), name)
            if (list(mine) if isinstance(mine, tuple) else mine) != theirs:
                raise InputError(f"{cfg.source}: config key vae.model.{name}: {mine!r}, but the first stage of "
                                 f"{run.project_yaml} has {theirs!r}")
        if given is not None and abs(given - run.scale_factor) > 1e-12:
            raise InputError(f"{cfg.source}: config key vae.scale_factor: {given}, but the release run's networks were "
                             f"trained with its yaml's scale_factor {run.scale_factor} ({run.project_yaml})")
        net, info = import_autoencoder(run.checkpoint, vae_config(cfg))
        return net, run.scale_factor, {"file": str(run.checkpoint), "sha256": sha256_of(run.checkpoint, None),
                                       "layout": "gem3d-release", "project_yaml": str(run.project_yaml)}
    if _is_gem3d_checkpoint(path):
        vae = load_vae(path, cfg=cfg)
        if given is not None and abs(given - vae.scale_factor) > 1e-12:
            raise InputError(f"{cfg.source}: config key vae.scale_factor: {given}, but {path} was made with "
                             f"{vae.scale_factor}")
        return vae.model, vae.scale_factor, {"file": str(path), "sha256": sha256_of(path, None), "layout": "gem3d"}
    net, info = import_autoencoder(path, vae_config(cfg))
    return net, given, {"file": str(path), "sha256": sha256_of(path, None), "layout": info["layout"]}


def _is_gem3d_checkpoint(path: Path) -> bool:
    """A file gem3d wrote (a torch file whose dict has gem3d's checkpoint keys)."""
    from gem3d.models.weights_file import read_weights_file

    obj = read_weights_file(path, "pretrained file")
    return isinstance(obj, dict) and {"kind", "model_args", "checksum"} <= set(obj)
