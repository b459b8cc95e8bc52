"""Generating a sample set (its masks, informed slices and model: gem3d/sampling/sets.py), in shards.

Each shard (one job, e.g. one GPU on a cluster) writes `Paths.sample_shard(...)`; `merge_shards`
joins them into `Paths.samples(name)` with the layout described in gem3d/sampling/sets.py.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from gem3d.config import Config
from gem3d.data.slice_store import OUTSIDE, SliceStore, from_slices, output_intensities, to_original, to_slices
from gem3d.io import InputError, Volume, atomic_dir, read_json, write_json, write_volume
from gem3d.paths import Paths
from gem3d.sampling.augment import augment_mask
from gem3d.sampling.generate import VolumeJob, VolumeSampler, stable_seed
from gem3d.sampling.informed import InformedSpec, check_slice, choose_ic, parse_case_slice
from gem3d.sampling.sets import DEENHANCE, TEST_TRUE, SetSpec, set_spec

log = logging.getLogger("gem3d.sampling")


def fixed_informed(cfg: Config, store: SliceStore) -> InformedSpec:
    if cfg.sampling.deenhance_informed:
        case, index = parse_case_slice(cfg.sampling.deenhance_informed)
        if case not in store.index["cases"]:
            raise InputError(f"{cfg.source}: sampling.deenhance_informed case {case} is not in the dataset")
    else:
        case = store.case_ids("train")[0]
        index = store.index["cases"][case]["preprocessed_shape"][0] // 2
    check_slice(case, index, store.index["cases"][case]["preprocessed_shape"][0])
    return InformedSpec("fixed", case, index)


def build_jobs(cfg: Config, spec: SetSpec, store: SliceStore, sampler: VolumeSampler, shard: int = 0,
               shards: int = 1) -> list[VolumeJob]:
    """The jobs of one shard (every shards-th case; seeds depend on the case, not on the shard)."""
    cases = store.case_ids("test" if spec.kind == TEST_TRUE else "train")[shard::shards]
    train_latents = sampler.latents.subset(store.case_ids("train"))
    aug = cfg.augmentation
    fixed = fixed_informed(cfg, store) if spec.kind == DEENHANCE else None
    jobs = []
    for case_id in cases:
        # test sets share the seed (so the start p and the noise) per case: the ablations differ only in
        # what they ablate; every other set draws its own
        key = "test" if spec.kind == TEST_TRUE else spec.name
        seed = stable_seed(cfg.sampling.seed, key, case_id, spec.copy)
        rng = np.random.default_rng(seed)
        case = store.load(case_id)
        label, native, params = case.label, None, None
        if spec.augment:
            native, params = augment_mask(case.label_native.astype(np.int16), rng, mode=aug.mode,
                                          flip_axes=aug.flip_axes, max_rotation_deg=aug.max_rotation_deg,
                                          translate_range=aug.translate_range, tumour_labels=aug.tumour_labels,
                                          spacing=case.geometry["spacing_preprocessed"], seed=seed)
            label = to_slices(native, store.slice_size, is_label=True)
        d = label.shape[0]
        start = int(rng.integers(d))
        if spec.informed == "IC":
            informed = choose_ic(case_id, start, d, train_latents, rng)
        elif spec.informed == "IG":
            informed = InformedSpec("IG", position=start / max(d - 1, 1))
        elif spec.informed == "true":
            informed = InformedSpec("true", case_id, start)
        elif spec.informed == "fixed":
            informed = fixed
        else:
            informed = InformedSpec("none")
        jobs.append(VolumeJob(f"{case_id}_{spec.name}", case_id, label, start, informed, seed, spec.copy, params,
                              native))
    return jobs


def write_volume_outputs(folder: Path, job: VolumeJob, image: np.ndarray, store: SliceStore, raw_dataset: Path) -> None:
    """Slice-space npz plus image and mask NIfTIs in the mask's original geometry."""
    geometry = store.index["cases"][job.source_case]
    (folder / "slices").mkdir(exist_ok=True)
    np.savez_compressed(folder / "slices" / f"{job.sample_id}.npz", image=image.astype(np.float16), label=job.label)
    native = from_slices(image, geometry, is_label=False)
    label_native = job.label_native if job.label_native is not None else store.load(job.source_case).label_native
    values, fill = output_intensities(native, label_native != OUTSIDE, geometry, store.index["normalization"])
    write_volume(folder / "imagesTr" / f"{job.sample_id}_0000.nii.gz", to_original(values, geometry, False, fill))
    if job.label_native is None:
        shutil.copyfile(raw_dataset / "labelsTr" / f"{job.source_case}.nii.gz",
                        folder / "labelsTr" / f"{job.sample_id}.nii.gz")
    else:
        mask = to_original(job.label_native, geometry, True, 0)
        write_volume(folder / "labelsTr" / f"{job.sample_id}.nii.gz",
                     Volume(np.clip(mask.array, 0, None).astype(np.uint8), mask.affine), np.uint8)


def sample_set(cfg: Config, name: str, shard: int = 0, shards: int = 1) -> Path:
    """Generate one shard of a set into its shard folder (atomic)."""
    if not 0 <= shard < shards:
        raise InputError(f"shard {shard} is not in 0..{shards - 1}")
    paths = Paths(cfg)
    spec = set_spec(cfg, name)
    store = SliceStore(paths.slices)
    sampler = VolumeSampler(cfg, spec.variant, spec.stage, need_slice_model=spec.informed == "IG")
    jobs = build_jobs(cfg, spec, store, sampler, shard, shards)
    out = paths.sample_shard(name, shard, shards)
    with atomic_dir(out) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        images = sampler.generate(jobs, pin=spec.pin)
        entries = []
        for job, image in zip(jobs, images):
            write_volume_outputs(tmp, job, image, store, paths.raw_dataset)
            entries.append({"sample_id": job.sample_id, "source_case": job.source_case, "copy": job.copy,
                            "informed": job.informed.record(), "start": job.start, "augmentation": job.augmentation,
                            "seed": job.seed, "variant": spec.variant, "stage": spec.stage, "pin": spec.pin,
                            "checkpoints": sampler.checkpoints})
        write_json(tmp / "manifest.json", {"set": name, "kind": spec.kind, "shard": shard, "shards": shards,
                                           "volumes": entries})
    log.info("sample set %s shard %d/%d: %d volumes -> %s", name, shard + 1, shards, len(jobs), out)
    return out


def merge_shards(cfg: Config, name: str, shards: int) -> Path:
    """Merge the shard folders of a set into `samples/<set>/` with one manifest and dataset.json."""
    paths = Paths(cfg)
    spec = set_spec(cfg, name)
    volumes = []
    with atomic_dir(paths.samples(name)) as tmp:
        for sub in ("imagesTr", "labelsTr", "slices"):
            (tmp / sub).mkdir()
        for shard in range(shards):
            folder = paths.sample_shard(name, shard, shards)
            manifest = read_json(folder / "manifest.json")
            for sub in ("imagesTr", "labelsTr", "slices"):
                for f in (folder / sub).iterdir():
                    shutil.copyfile(f, tmp / sub / f.name)
            volumes += manifest["volumes"]
        write_json(tmp / "manifest.json", {"set": name, "kind": spec.kind, "volumes": volumes})
        write_json(tmp / "dataset.json", {
            "channel_names": {"0": cfg.data.modality}, "labels": dict(sorted(cfg.data.labels.items(), key=lambda kv: kv[1])),
            "numTraining": len(volumes), "file_ending": ".nii.gz", "name": f"{cfg.name}_{name}",
            "description": f"gem3d sample set {name} (synthetic images generated from masks)"})
    return paths.samples(name)
