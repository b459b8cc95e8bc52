"""Counterfactual synthesis: an edited mask + a chosen informed slice -> a new volume (paper Fig. 3).

The special case of generation for a new mask (gem3d/sampling/new_masks.py) where the mask lies on
the grid of one of the dataset's cases (same shape and affine as that case's image; e.g. a mask
edited in ITK-SNAP on top of the case): its body region is that case's, it goes through nnU-Net's
preprocessing like the case did, and the image is written in the mask's own geometry as one file
with its JSON record. Masks on grids of their own: `gem3d generate`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gem3d.config import Config
from gem3d.data.slice_store import OUTSIDE, SliceStore
from gem3d.io import InputError, atomic_path, write_json, write_volume
from gem3d.paths import Paths
from gem3d.sampling.generate import VolumeJob, VolumeSampler, stable_seed
from gem3d.sampling.informed import parse_slice_index, score_informed
from gem3d.sampling.new_masks import (body_region, check_mask, check_user_image, label_slices, matching_case,
                                      parse_informed, prepare_mask, render, start_and_spec, user_latent)

log = logging.getLogger("gem3d.sampling")


def check_out(out: Path) -> Path:
    """The output NIfTI's path is usable (checked before any work); returns its JSON sidecar's path."""
    name = out.name
    stem = next((name[: -len(ext)] for ext in (".nii.gz", ".nii") if name.endswith(ext)), "")
    if out.is_dir():
        raise InputError(f"{out}: --out is an existing folder; give a file name ending in .nii.gz")
    if not stem:
        raise InputError(f"{out}: --out must be a NIfTI file name ending in .nii.gz or .nii")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{out}: --out lies under {parent}, which is a file, not a folder")
            break
    return out.with_name(stem + ".json")


def counterfactual(cfg: Config, mask_path: Path, informed: str, out: Path, seed: int = 0,
                   start: int | None = None, informed_image: Path | None = None) -> Path:
    """Generate one volume for an edited mask; `informed` is CASE:SLICE or IG (or a slice index with informed_image).

    Every input is checked before the networks load: the output path, the mask's labels and grid,
    the informed slice (a user image is read, checked and resampled to the training grid's in-plane
    spacing, see informed.user_slice). The informed slice is placed at `start` (default: a case's
    slice at its own relative depth, otherwise the middle slice). The volume and its JSON record are
    renamed into place together."""
    out, mask_path = Path(out), Path(mask_path)
    record_path = check_out(out)
    store = SliceStore(Paths(cfg).slices)
    mask = check_mask(mask_path, cfg)
    case_id = matching_case(store, mask, Paths(cfg).raw_dataset)
    if case_id is None:
        raise InputError(f"{mask_path}: edited mask: its shape and affine match no case of the dataset (shape "
                         f"{mask.shape}); draw it on a case's grid (e.g. edit that case's label file), or use "
                         "`gem3d generate` for a mask on a grid of its own")
    if informed_image is not None:
        choice = parse_informed(store, "", informed_image, parse_slice_index(informed, informed_image))
    else:
        choice = parse_informed(store, informed)
    check_user_image(store, choice, cfg)
    region, source = body_region(mask_path, mask, cfg, store, choice)
    prepared = prepare_mask(cfg, store, mask_path, mask, region, source, choice)
    sampler = VolumeSampler(cfg, "gem3d", 2, need_slice_model=choice.spec.source == "IG")
    label = label_slices(prepared, store)
    start, spec = start_and_spec(choice, label.shape[0], start)
    job = VolumeJob(f"counterfactual_{case_id}", case_id, label, start, spec, stable_seed(seed, mask_path.name),
                    extra=user_latent(sampler, store, choice, prepared.geometry))
    # the case's body outline (on CT its stored body, not nnU-Net's whole field of view) while the mask was cropped
    # as the case was; an edit outside the body moves nnU-Net's crop: then the prepared mask's own (-1 outside)
    same_crop = prepared.geometry["bbox"] == store.index["cases"][case_id]["bbox"]
    region = store.body(case_id)[start] if same_crop else label[start] != OUTSIDE
    fit = score_informed(spec, store, label[start], region, cfg.sampling.fit, job.extra.get("user_image"))
    volume = render(prepared, sampler.generate([job])[0], store)
    with atomic_path(record_path) as record_tmp, atomic_path(out) as out_tmp:  # out first, then its record
        write_volume(out_tmp, volume)
        write_json(record_tmp, {
            "mask": str(mask_path), "grid_of_case": case_id, "region": source, "informed": spec.record(),
            "start": start, "seed": job.seed, "fit": None if fit is None else fit.record(),
            "checkpoints": sampler.checkpoints})
    log.info("counterfactual for %s (grid of %s) with informed %s -> %s", mask_path, case_id, spec.record(), out)
    return out
