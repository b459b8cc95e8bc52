"""One typed function per pipeline stage, wiring `Paths` to the domain modules.

Each `gem3d <stage>` command (gem3d/cli.py) and each Snakemake rule calls exactly one of these.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gem3d.commands import Arg, Command
from gem3d.config import Config
from gem3d.io import InputError, read_json, remove_leftovers
from gem3d.paths import Paths
from gem3d.methods import registry

log = logging.getLogger("gem3d.pipeline")

IMPORTABLE = ("slice_model", "volume_stage1", "volume_stage2", "baseline_stage1", "baseline_stage2")


def make_phantoms(cfg: Config) -> None:
    """Write the synthetic demo volumes (BraTS folder layout) into `data.path`."""
    from gem3d.data.phantoms import generate_phantoms

    if cfg.phantoms is None:
        raise InputError(f"{cfg.source}: `phantoms` section missing; this config reads real data from {cfg.data.path}")
    p = cfg.phantoms
    remove_leftovers(Paths(cfg).input_data)
    ids = generate_phantoms(Paths(cfg).input_data, n_cases=p.n_cases, shape=p.shape,
                            n_scanners=p.n_scanners, seed=p.seed)
    log.info("wrote %d synthetic phantom cases to %s", len(ids), cfg.data.path)


def import_data(cfg: Config) -> None:
    """Validate the input cases and write the nnU-Net raw dataset and the train/test split."""
    from gem3d.data.importers import import_dataset

    paths = Paths(cfg)
    for output in (paths.raw_dataset, paths.split, paths.import_report):
        remove_leftovers(output)  # a killed import's half-written dataset and JSON files
    report = import_dataset(cfg, paths.raw_dataset.parent, paths.split, paths.import_report)
    log.info("imported %d cases (%d skipped) into %s", len(report["cases"]), len(report["skipped"]),
             paths.raw_dataset)


def preprocess(cfg: Config) -> None:
    """nnU-Net v2 fingerprint and planning on the training cases, then preprocessing of every case with those plans."""
    from gem3d.data.nnunet import plan_and_preprocess

    p, paths = cfg.preprocess, Paths(cfg)
    remove_leftovers(paths.preprocessed_dataset)
    out = plan_and_preprocess(paths.nnunet, p.dataset_id, cfg.nnunet_dataset_name, p.configuration, p.num_processes,
                              plan_cases=read_json(paths.split)["train"])
    log.info("nnU-Net preprocessed dataset at %s", out)


def build_slices(cfg: Config) -> None:
    """Slice store: squared (letterboxed or stretched), resized axial slices in [-1, 1] and masks, with their
    geometry."""
    from gem3d.data.slice_store import build_slice_store

    paths = Paths(cfg)
    remove_leftovers(paths.slices)
    p = cfg.preprocess
    index = build_slice_store(paths.preprocessed_dataset, paths.raw_dataset, paths.slices, p.slice_size,
                              cfg.data.labels, read_json(paths.split), p.configuration, p.slice_fit, p.intensity)
    log.info("slice store with %d cases at %s", len(index["cases"]), paths.slices)


def train_vae(cfg: Config) -> None:
    """Train the VAE on training slices; store the measured latent scale factor with it."""
    from gem3d.data.slice_store import SliceStore
    from gem3d.training.vae_training import train_vae as run

    paths = Paths(cfg)
    run(cfg, SliceStore(paths.slices), paths.train_state("vae"), paths.model("vae"), paths.vae_metrics)


def encode(cfg: Config) -> None:
    """Encode every case's image and mask into the latent cache."""
    from gem3d.data.latents import encode_store, load_vae
    from gem3d.data.slice_store import SliceStore
    from gem3d.device import compute_device

    paths = Paths(cfg)
    remove_leftovers(paths.latents)
    index = encode_store(load_vae(paths.model("vae"), compute_device(), cfg), SliceStore(paths.slices),
                         paths.latents)
    log.info("latent cache with %d cases at %s", len(index["cases"]), paths.latents)


def _train_latents(cfg: Config):
    from gem3d.data.latents import LatentStore

    paths = Paths(cfg)
    return LatentStore(paths.latents, read_json(paths.split)["train"])


def train_slice(cfg: Config) -> None:
    """Slice LDM conditioned on the normalised position (generated informed slices, IG)."""
    from gem3d.training.diffusion_training import train_slice_model

    paths = Paths(cfg)
    _not_pretrained(cfg, "slice_model")
    train_slice_model(cfg, _train_latents(cfg), paths.train_state("slice_model"), paths.model("slice_model"))


def _not_pretrained(cfg: Config, name: str) -> None:
    if cfg.pretrained(name):
        raise InputError(f"{cfg.source}: {name} is given as a file ({cfg.pretrained(name)}), not trained: "
                         f"gem3d import-network --model {name}")


def import_network(cfg: Config, model: str) -> None:
    """A network given as a file (`slice_model.pretrained`, `volume_model.pretrained`, `baseline_pretrained`:
    a release run of the GEM-3D authors or a gem3d model file) -> this run's model file."""
    from gem3d.training.imported import import_network as run

    paths = Paths(cfg)
    run(cfg, model, paths.model("vae"), paths.model(model))


def train_volume(cfg: Config, stage: int, model: str = "gem3d") -> None:
    """Volume LDM stage 1 (2D over windows) or stage 2 (slice-axis layers only) of a variant: GEM-3D, the
    Make-A-Volume baseline, or an injection variant of Table 3 (controlnet, crossattn)."""
    from gem3d.sampling.sets import model_name

    train_method(cfg, model, model_name(model, stage))


def train_method(cfg: Config, method: str, model: str | None = None) -> None:
    """One model file of a generation method (gem3d/methods/registry.py), by the method's own training."""
    entry = registry.get(method)
    models = [t.model for t in entry.trainings]
    model = model or (models[0] if len(models) == 1 else None)
    if model not in models:
        raise InputError(f"method {method} trains {', '.join(models) or 'no model file'}; give one with --model")
    registry.implementation(entry).train(cfg, method, model)


def train_pix2pix(cfg: Config) -> None:
    """3D Pix2Pix (mask volume -> image volume), one of the paper's comparison methods."""
    train_method(cfg, "pix2pix")


def train_ldm3d(cfg: Config) -> None:
    """Conditional 3D LDM on whole-volume latents, one of the paper's comparison methods."""
    train_method(cfg, "ldm3d")


def export(cfg: Config, out) -> None:
    """The run's trained generator as a bundle for another machine or lab (gem3d/bundle.py): networks, config,
    nnU-Net plans, model card and checksums; no patient image data."""
    from gem3d.bundle import export_bundle

    export_bundle(cfg, out)


COMMANDS = {
    "phantoms": Command(make_phantoms, "write the synthetic demo volumes (BraTS layout) into data.path"),
    "import": Command(import_data, "validate input cases; write the nnU-Net raw dataset and the train/test split",
                      needs_data_path=True),
    "preprocess": Command(preprocess, "nnU-Net v2 fingerprint, planning and 3d_fullres preprocessing"),
    "slices": Command(build_slices, "build the slice store (square axial slices in [-1, 1], masks, geometry)"),
    "train-vae": Command(train_vae, "train the KL autoencoder; measure and store the latent scale factor",
                         data_parallel=True),
    "encode": Command(encode, "encode every case's image and mask into the latent cache"),
    "train-slice": Command(train_slice, "train the position-conditioned slice LDM (generated informed slices, IG)",
                           data_parallel=True),
    "train-volume": Command(
        train_volume, "train the volume LDM: stage 1 (2D) or stage 2 (slice-axis layers); GEM-3D or baseline",
        args=(Arg(("--stage",), dict(type=int, choices=(1, 2), required=True, dest="stage",
                                    help="1: 2D layers on windows; 2: slice-axis layers only")),
              Arg(("--model",), dict(choices=[m.name for m in registry.BUILT_IN if m.window], default="gem3d",
                                     dest="model",
                                     help="gem3d: mask + informed slice by concatenation; baseline: Make-A-Volume, "
                                          "mask only; controlnet, crossattn: the injection variants of Table 3"))),
        data_parallel=True),
    "import-network": Command(
        import_network, "a network given as a file (a release run of the GEM-3D authors, or a gem3d model file) -> "
                        "this run's model file, instead of a training",
        args=(Arg(("--model",), dict(choices=IMPORTABLE, required=True, dest="model",
                                     help="the model file it becomes (the config key naming the file: "
                                          "slice_model.pretrained, volume_model.pretrained.stageN, "
                                          "volume_model.baseline_pretrained.stageN)")),)),
    "export": Command(
        export, "write the run's trained generator as a bundle (networks, config, plans, model card; no patient "
                "image data) for `gem3d generate --bundle`",
        args=(Arg(("--out",), dict(type=Path, required=True, dest="out", help="the bundle folder to write")),)),
    "train-pix2pix": Command(train_pix2pix, "train 3D Pix2Pix on whole resampled volumes (comparison method)",
                             data_parallel=True),
    "train-ldm3d": Command(train_ldm3d, "train the conditional 3D LDM on whole-volume latents (comparison method)",
                           data_parallel=True),
    "train-method": Command(
        train_method, "train a model file of any generation method of the registry (gem3d/methods/registry.py; a "
                      "config's method_modules add methods)",
        args=(Arg(("--method",), dict(required=True, dest="method", metavar="NAME",
                                      help="the method's registry name (pix2pix, ldm3d, a method_modules one, ...)")),
              Arg(("--model",), dict(default=None, dest="model", metavar="MODEL",
                                     help="the model file to train (default: the method's only one)"))),
        data_parallel=True),
}
