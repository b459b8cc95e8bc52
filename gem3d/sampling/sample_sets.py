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
from gem3d.data.slice_store import (OUTSIDE, SliceStore, body_slices, from_slices, output_intensities, to_original,
                                    to_slices)
from gem3d.io import InputError, Volume, atomic_dir, read_json, remove_leftovers, write_json, write_volume
from gem3d.paths import Paths
from gem3d.sampling.augment import LEFT_RIGHT_AXIS, augment_mask, left_right_axis, transform_region
from gem3d.sampling.generate import VolumeJob, VolumeSampler, stable_seed
from gem3d.methods import registry
from gem3d.sampling.informed import (
    InformedSpec,
    StoreOutlines,
    check_slice,
    choose_fitting,
    choose_ic,
    ic_candidates,
    parse_case_slice,
    relative_slice,
)
from gem3d.sampling.sets import DEENHANCE, TEST_TRUE, SetSpec, set_spec

log = logging.getLogger("gem3d.sampling")

MAX_REDRAWS = 100  # draws of a copy's informed slice before a repeat of an earlier copy's is kept
SET_FOLDERS = ("imagesTr", "labelsTr", "slices")  # of a sample set and of each of its shards


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


def copy_chain(cfg: Config, spec: SetSpec) -> list[tuple[str, int]]:
    """(set name, copy) of the enhancement set's copies 0..spec.copy (a copy avoids the earlier copies'
    informed slices); just the set itself for every other set."""
    if spec.copy == 0:
        return [(spec.name, 0)]
    base = cfg.sampling.enhancement_set
    return [(base, 0)] + [(f"{base}_copy{k}", k) for k in range(1, spec.copy + 1)]


def pick_informed(spec: SetSpec, case_id: str, d: int, rng: np.random.Generator, train_latents,
                  taken: set) -> tuple[int, InformedSpec]:
    """The start slice p of one volume of depth d and its informed slice (IC, IG, true or none).

    p is drawn at random; while the informed slice equals one in `taken` (an earlier copy's of the
    same mask), p and the informed slice are drawn again (at most MAX_REDRAWS times: with too few
    volumes to choose from, a repeat is kept).
    """
    for _ in range(MAX_REDRAWS):
        start = int(rng.integers(d))
        if spec.informed == "IC":
            informed = choose_ic(case_id, start, d, train_latents, rng)
        elif spec.informed == "IG":
            informed = InformedSpec("IG", position=start / max(d - 1, 1))
        elif spec.informed == "true":
            informed = InformedSpec("true", case_id, start)
        else:
            informed = InformedSpec("none")
        if informed_key(informed) not in taken:
            break
    return start, informed


def informed_key(informed: InformedSpec) -> tuple:
    return tuple(sorted(informed.record().items()))


def build_jobs(cfg: Config, spec: SetSpec, store: SliceStore, sampler: VolumeSampler, shard: int = 0,
               shards: int = 1) -> list[VolumeJob]:
    """The jobs of one shard (every shards-th case; seeds depend on the case, not on the shard).

    Per volume, from its seeded generator: the start slice and informed slice first (so the copies of
    the enhancement set can redo the earlier copies' choices and differ from them), then the mask
    augmentation (sets with ``augment``). An IC slice is then scored against the mask's slice and its body
    outline (the case's, moved with the mask when augmented) at the start (``informed.choose_fitting``; with
    ``sampling.fit.min_dice`` set a misfit is replaced by another training case's slice, in an order from a
    generator of its own, so the start, the
    augmentation and the noise stay those of the blind draw); its fit goes to ``job.extra["fit"]``.
    """
    cases = store.case_ids("test" if spec.kind == TEST_TRUE else "train")[shard::shards]
    train_latents = sampler.latents.subset(store.case_ids("train")) if spec.informed == "IC" else None
    fit_cfg = cfg.sampling.fit
    outlines = StoreOutlines(store)
    fixed = fixed_informed(cfg, store) if spec.kind == DEENHANCE else None
    fixed_depth = store.index["cases"][fixed.case]["preprocessed_shape"][0] if fixed is not None else 0
    jobs = []
    for case_id in cases:
        case = store.load(case_id)
        d = case.label.shape[0]
        taken: set = set()
        for name, copy in copy_chain(cfg, spec):
            # test sets share the seed (so the start p and the noise) per case: the ablations differ only in
            # what they ablate; every other set draws its own
            seed = stable_seed(cfg.sampling.seed, "test" if spec.kind == TEST_TRUE else name, case_id, copy)
            rng = np.random.default_rng(seed)
            if fixed is not None:  # de-enhancement: start at the fixed slice's relative depth in this mask
                start, informed = relative_slice(fixed.slice, fixed_depth, d), fixed
            else:
                start, informed = pick_informed(spec, case_id, d, rng, train_latents, taken)
            label, native, params, fit = case.label, None, None, None
            guarded = informed.source == "IC" and fit_cfg.min_dice is not None
            if spec.augment and (copy == spec.copy or guarded):  # an earlier copy's mask only for its guard
                native, params = augmented(cfg, store, case, rng, seed)
                label = to_slices(native, store.slice_size, is_label=True, fit=store.slice_fit)
            if informed.source == "IC":
                order = np.random.default_rng(stable_seed(seed, "informed_fit"))
                candidates = [c for c in ic_candidates(informed, case_id, start, d, train_latents, order,
                                                       fit_cfg.max_tries if guarded else 1)
                              if c is informed or informed_key(c) not in taken]
                body = mask_body(store, case, params)
                informed, fit = choose_fitting(candidates, label[start], body[start], outlines, fit_cfg)
            taken.add(informed_key(informed))
        jobs.append(VolumeJob(f"{case_id}_{spec.name}", case_id, label, start, informed, seed, spec.copy, params,
                              native, extra={} if fit is None else {"fit": fit}))
    return jobs


def mask_body(store: SliceStore, case, params: dict | None) -> np.ndarray:
    """(d, s, s) body outline of a case's mask in slice space: the store's (SliceStore.body), or with the
    augmentation `params` of an augmented mask the case's outline moved as the mask was (augment.transform_region)."""
    if params is None:
        return store.body(case.case_id)
    moved = transform_region(store.body_native(case.case_id), params, case.geometry["spacing_preprocessed"])
    return body_slices(moved, store.slice_size, store.slice_fit)


def augmented(cfg: Config, store: SliceStore, case, rng: np.random.Generator, seed: int) -> tuple[np.ndarray, dict]:
    """A case's mask augmented (MA) at nnU-Net resolution with the volume's generator, and its parameters."""
    aug = cfg.augmentation
    if aug.mode == "brain" and aug.flip_axes and left_right_axis(case.geometry) != LEFT_RIGHT_AXIS:
        raise InputError(f"{store.root / 'index.json'}: case {case.case_id}: array axis {LEFT_RIGHT_AXIS} is not "
                         f"left-right (axis {left_right_axis(case.geometry)} is), so augmentation.flip_axes "
                         f"{list(aug.flip_axes)} would not flip left-right; set it to []")
    return augment_mask(case.label_native.astype(np.int16), rng, mode=aug.mode, flip_axes=aug.flip_axes,
                        max_rotation_deg=aug.max_rotation_deg, translate_range=aug.translate_range,
                        tumour_labels=aug.tumour_labels, spacing=case.geometry["spacing_preprocessed"], seed=seed)


def write_volume_outputs(folder: Path, job: VolumeJob, image: np.ndarray, store: SliceStore, raw_dataset: Path) -> None:
    """Slice-space npz plus image and mask NIfTIs in the mask's original geometry."""
    geometry = store.index["cases"][job.source_case]
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


def make_sampler(cfg: Config, spec: SetSpec):
    """The sampler of a set's method (gem3d/methods/registry.py): window propagation for the volume models
    (VolumeSampler), a whole-volume sampler for the others (the same `generate(jobs, pin)`, `solver`, `checkpoints`)."""
    method = registry.get(spec.variant)
    return registry.implementation(method).sampler(cfg, method.name, spec)


def solver_record(solver) -> dict | None:
    """The manifest's record of how a volume was sampled (None: no diffusion solver, e.g. 3D Pix2Pix)."""
    if solver is None:
        return None
    return {"solver": solver.name, "steps": len(solver.timesteps), "eta": solver.eta}


def sample_set(cfg: Config, name: str, shard: int = 0, shards: int = 1) -> Path:
    """Generate one shard of a set into its shard folder (atomic)."""
    if not 0 <= shard < shards:
        raise InputError(f"shard {shard} is not in 0..{shards - 1}")
    paths = Paths(cfg)
    spec = set_spec(cfg, name)
    store = SliceStore(paths.slices)
    sampler = make_sampler(cfg, spec)
    jobs = build_jobs(cfg, spec, store, sampler, shard, shards)
    out = paths.sample_shard(name, shard, shards)
    remove_leftovers(out)
    with atomic_dir(out) as tmp:
        for sub in SET_FOLDERS:  # all three even in a shard without cases (more shards than cases)
            (tmp / sub).mkdir()
        images = sampler.generate(jobs, pin=spec.pin)
        entries = []
        for job, image in zip(jobs, images):
            write_volume_outputs(tmp, job, image, store, paths.raw_dataset)
            entries.append({"sample_id": job.sample_id, "source_case": job.source_case, "copy": job.copy,
                            "informed": job.informed.record(), "start": job.start, "augmentation": job.augmentation,
                            "seed": job.seed, "variant": spec.variant, "stage": spec.stage, "pin": spec.pin,
                            "sampler": solver_record(sampler.solver),
                            **({"fit": job.extra["fit"]} if "fit" in job.extra else {}),
                            "checkpoints": sampler.checkpoints})
        write_json(tmp / "manifest.json", {"set": name, "kind": spec.kind, "shard": shard, "shards": shards,
                                           "volumes": entries})
    log.info("sample set %s shard %d/%d: %d volumes -> %s", name, shard + 1, shards, len(jobs), out)
    return out


def read_shard_manifest(folder: Path, name: str) -> dict:
    path = folder / "manifest.json"
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("volumes"), list) or manifest.get("set") != name:
        raise InputError(f"{path}: not a shard manifest of sample set {name} (needs 'set': {name!r} and a 'volumes' "
                         f"list)")
    return manifest


def check_same_checkpoints(first: dict, manifest: dict, path: Path, shard: int, first_shard: int) -> None:
    """Refuse a shard sampled with other model files than the first shard with volumes (their manifests record
    the files' sha256; a shard without volumes records none and is not compared)."""
    a = next((v.get("checkpoints") or {} for v in first["volumes"]), {})
    if not manifest["volumes"]:
        return
    b = manifest["volumes"][0].get("checkpoints") or {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise InputError(f"{path}: shard {shard} was sampled with another {key} checkpoint than shard "
                             f"{first_shard} (sha256 {str(b.get(key))[:12]} != {str(a.get(key))[:12]}); sample the "
                             f"stale shards again")


def merge_shards(cfg: Config, name: str, shards: int) -> Path:
    """Merge the shard folders of a set into `samples/<set>/` with one manifest and dataset.json.

    Every shard must have been sampled with the same model files (checkpoint sha256 in its manifest),
    else nothing is written and the previous merged set is kept.
    """
    paths = Paths(cfg)
    spec = set_spec(cfg, name)
    folders = [paths.sample_shard(name, shard, shards) for shard in range(shards)]
    manifests = [read_shard_manifest(folder, name) for folder in folders]
    first = next((shard for shard, m in enumerate(manifests) if m["volumes"]), 0)
    for shard, (folder, manifest) in enumerate(zip(folders, manifests)):
        check_same_checkpoints(manifests[first], manifest, folder / "manifest.json", shard, first)
    remove_leftovers(paths.samples(name))
    volumes = []
    with atomic_dir(paths.samples(name)) as tmp:
        for sub in SET_FOLDERS:
            (tmp / sub).mkdir()
        for folder, manifest in zip(folders, manifests):
            for sub in SET_FOLDERS:
                if not manifest["volumes"] and not (folder / sub).is_dir():
                    continue  # a shard without cases sampled before every shard made all three folders
                for f in (folder / sub).iterdir():
                    shutil.copyfile(f, tmp / sub / f.name)
            volumes += manifest["volumes"]
        write_json(tmp / "manifest.json", {"set": name, "kind": spec.kind, "volumes": volumes})
        write_json(tmp / "dataset.json", {
            "channel_names": {"0": cfg.data.modality}, "labels": dict(sorted(cfg.data.labels.items(), key=lambda kv: kv[1])),
            "numTraining": len(volumes), "file_ending": ".nii.gz", "name": f"{cfg.name}_{name}",
            "description": f"gem3d sample set {name} (synthetic images generated from masks)"})
    return paths.samples(name)
