"""One typed function per pipeline stage, wiring `Paths` to the domain modules.

Each `gem3d <stage>` command (gem3d/cli.py) and each Snakemake rule calls exactly one of these.
"""

from __future__ import annotations

import logging

from gem3d.config import Config
from gem3d.io import InputError, read_json
from gem3d.paths import Paths

log = logging.getLogger("gem3d.pipeline")


def make_phantoms(cfg: Config) -> None:
    """Write the synthetic demo volumes (BraTS folder layout) into `data.path`."""
    from gem3d.data.phantoms import generate_phantoms

    if cfg.phantoms is None:
        raise InputError(f"{cfg.source}: `phantoms` section missing; this config reads real data from {cfg.data.path}")
    p = cfg.phantoms
    ids = generate_phantoms(Paths(cfg).input_data, n_cases=p.n_cases, shape=p.shape,
                            n_scanners=p.n_scanners, seed=p.seed)
    log.info("wrote %d synthetic phantom cases to %s", len(ids), cfg.data.path)


def import_data(cfg: Config) -> None:
    """Validate the input cases and write the nnU-Net raw dataset and the train/test split."""
    from gem3d.data.importers import import_dataset

    paths = Paths(cfg)
    report = import_dataset(cfg, paths.raw_dataset.parent, paths.split, paths.import_report)
    log.info("imported %d cases (%d skipped) into %s", len(report["cases"]), len(report["skipped"]),
             paths.raw_dataset)


def preprocess(cfg: Config) -> None:
    """nnU-Net v2 fingerprint, planning and 3d_fullres preprocessing."""
    from gem3d.data.nnunet import plan_and_preprocess

    p = cfg.preprocess
    out = plan_and_preprocess(Paths(cfg).nnunet, p.dataset_id, cfg.nnunet_dataset_name, p.configuration,
                              p.num_processes)
    log.info("nnU-Net preprocessed dataset at %s", out)


def build_slices(cfg: Config) -> None:
    """Slice store: letterboxed, resized axial slices in [-1, 1] and masks, with their geometry."""
    from gem3d.data.slice_store import build_slice_store

    paths = Paths(cfg)
    index = build_slice_store(paths.preprocessed_dataset, paths.raw_dataset, paths.slices,
                              cfg.preprocess.slice_size, cfg.data.labels, read_json(paths.split),
                              cfg.preprocess.configuration)
    log.info("slice store with %d cases at %s", len(index["cases"]), paths.slices)


STAGES = {
    "phantoms": make_phantoms,
    "import": import_data,
    "preprocess": preprocess,
    "slices": build_slices,
}
