"""`gem3d generate`: images for masks of your own (gem3d/sampling/new_masks.py), a mask or a folder of
them, in shards.

Output folder (default `results/<name>/generated/`), nnU-Net's raw layout so it can train a network:

    imagesTr/<id>_0000.nii.gz   the generated image on the mask's grid and affine
    labelsTr/<id>.nii.gz        the mask's labels as given (a -1 outside the body written as 0)
    provenance/<id>.json        mask (file and sha256), body region source, informed slice, start, seed,
                                sampling settings and model checksums
    manifest.<i>of<n>.json      what shard i of n holds (written last: the shard is complete)

`<id>` is the mask's file name without its ending, then `_<k>` for copy k. Every input of the
shard (masks, regions, informed slice, models) is checked before the first volume is generated, so
a bad one writes nothing. A rerun skips the volumes whose provenance records the same request
(the same mask content, region, informed slice, seed, settings and models).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from gem3d.config import Config
from gem3d.fingerprint import config_keys
from gem3d.methods.registry import SOLVER_KEYS, WINDOW_KEYS
from gem3d.data.slice_store import SliceStore
from gem3d.io import InputError, Volume, atomic_path, read_json, file_sha256, write_json, write_volume
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeJob, VolumeSampler, stable_seed
from gem3d.sampling.new_masks import (body_region, check_mask, check_user_image, label_slices, list_masks,
                                      nifti_stem, parse_informed, prepare_mask, render, start_and_spec, user_latent)

log = logging.getLogger("gem3d.sampling")


def generated_dir(cfg: Config) -> Path:
    return Paths(cfg).root / "generated"


def manifest_path(out: Path, shard: int, shards: int) -> Path:
    return Path(out) / f"manifest.{shard}of{shards}.json"


def region_for(region: Path | None, mask: Path) -> Path | None:
    """The region file of one mask: `region` itself, or the file of the mask's name in the folder `region`."""
    if region is None or not region.is_dir():
        if region is not None and not region.is_file():
            raise InputError(f"{region}: region file or folder not found")
        return region
    path = region / mask.name
    if not path.is_file():
        raise InputError(f"{path}: no region for mask {mask} in the region folder {region}")
    return path


def generate_for_masks(cfg: Config, mask: Path | None = None, informed: str | None = None,
                       informed_image: Path | None = None, slice_index: int | None = None, region: Path | None = None,
                       copies: int | None = None, out: Path | None = None, shard: int = 0, shards: int | None = None,
                       seed: int | None = None) -> Path:
    """Generate `copies` volumes per mask of shard `shard` of `shards`; returns the shard's manifest.
    Unset options take the config's `generation` keys."""
    g = cfg.generation
    mask = Path(mask) if mask is not None else Path(g.masks) if g.masks else None
    if mask is None:
        raise InputError(f"{cfg.source}: no masks: give --mask M.nii.gz (or a folder) or set generation.masks")
    if informed is None and informed_image is None:  # no informed slice on the command line: the config's
        informed_image = Path(g.informed_image) if g.informed_image else None
        informed = "" if informed_image is not None else g.informed
        slice_index = g.slice if slice_index is None and informed_image is not None else slice_index
    informed = informed or ""
    region = Path(region) if region is not None else Path(g.region) if g.region else None
    copies = g.copies if copies is None else copies
    shards = g.shards if shards is None else shards
    seed = g.seed if seed is None else seed
    out = Path(out) if out is not None else generated_dir(cfg)
    if not 0 <= shard < shards:
        raise InputError(f"--shard {shard} is not in 0..{shards - 1} (--shards {shards})")
    if copies < 1:
        raise InputError(f"--copies {copies}: give at least 1")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out is a file; give a folder")

    store = SliceStore(Paths(cfg).slices)
    choice = parse_informed(store, informed, informed_image, slice_index)
    check_user_image(store, choice, cfg)
    stems: dict[str, Path] = {}
    for path in list_masks(mask):  # every shard's, so that two shards never write the same output ids
        if nifti_stem(path) in stems:
            raise InputError(f"{path}: same name as {stems[nifti_stem(path)]}; output ids must differ")
        stems[nifti_stem(path)] = path
    masks = list_masks(mask)[shard::shards]
    for path in masks:  # every input checked before any work; the masks are read again when generated
        body_region(path, check_mask(path, cfg), cfg, store, choice, region_for(region, path))
    sampler = VolumeSampler(cfg, "gem3d", 2, need_slice_model=choice.spec.source == "IG")
    # what a kept volume must have been made with: every key the sampler reads and the content of the user's files
    sampling = config_keys(cfg, SOLVER_KEYS + WINDOW_KEYS)
    informed_sha = {"informed_sha256": file_sha256(choice.spec.path)} if choice.spec.source == "user" else {}

    entries, pending, tic = [], [], time.perf_counter()
    total = len(masks) * copies
    for path in masks:
        volume = check_mask(path, cfg)
        region_file = region_for(region, path)
        inside, source = body_region(path, volume, cfg, store, choice, region_file)
        region_sha = {"region_sha256": file_sha256(region_file)} if region_file is not None else {}
        prepared = prepare_mask(cfg, store, path, volume, inside, source, choice)
        extra = user_latent(sampler, store, choice, prepared.geometry)
        label = label_slices(prepared, store)
        mask_sha = file_sha256(path)
        for copy in range(copies):
            job_seed = stable_seed(seed, "generate", nifti_stem(path), copy)
            start, spec = start_and_spec(choice, label.shape[0], None)
            sample_id = f"{nifti_stem(path)}_{copy}"
            request = {"mask": str(path), "mask_sha256": mask_sha, "region": source, **region_sha,
                       "informed": spec.record(), **informed_sha, "start": start, "copy": copy, "seed": job_seed,
                       "checkpoints": sampler.checkpoints, "sampling": sampling}
            entry = {"id": sample_id, **request}
            entries.append(entry)
            record = out / "provenance" / f"{sample_id}.json"
            if record.is_file() and _same_request(record, request):
                log.info("%s: already generated with the same request (%s); kept", sample_id, record)
                continue
            job = VolumeJob(sample_id, nifti_stem(path), label, start, spec, job_seed, copy, extra=extra)
            pending.append((job, prepared, entry))
        if len(pending) >= cfg.sampling.volumes_per_batch or path == masks[-1]:
            _flush(sampler, store, pending, out)
            elapsed = time.perf_counter() - tic
            log.info("generate: %d/%d volumes (%.1f s per volume)", len(entries), total, elapsed / len(entries))
            pending = []
    manifest = manifest_path(out, shard, shards)
    write_json(manifest, {"shard": shard, "shards": shards, "masks": str(mask), "copies": copies, "volumes": entries})
    log.info("generated %d volumes for %d masks -> %s", len(entries), len(masks), out)
    return manifest


def _same_request(record: Path, request: dict) -> bool:
    try:
        saved = read_json(record)
    except InputError:
        return False
    return isinstance(saved, dict) and {k: saved.get(k) for k in request} == request


def _flush(sampler: VolumeSampler, store: SliceStore, pending: list, out: Path) -> None:
    """Generate the pending jobs together and write each volume: its label, image and provenance, renamed
    into place together (the provenance last)."""
    if not pending:
        return
    images = sampler.generate([job for job, _, _ in pending])
    for (job, prepared, entry), image in zip(pending, images):
        volume = render(prepared, image, store)
        labels = Volume(np.clip(prepared.mask.array, 0, None).astype(np.uint8), prepared.mask.affine)
        with atomic_path(out / "provenance" / f"{job.sample_id}.json") as record_tmp, \
                atomic_path(out / "imagesTr" / f"{job.sample_id}_0000.nii.gz") as image_tmp, \
                atomic_path(out / "labelsTr" / f"{job.sample_id}.nii.gz") as label_tmp:
            write_volume(label_tmp, labels, np.uint8)
            write_volume(image_tmp, volume)
            write_json(record_tmp, entry)

