"""Images for masks from anywhere: a mask on any grid (its own shape, spacing and orientation) becomes
a generated image on that grid.

A mask goes the way the dataset's cases went: nnU-Net's own preprocessor for one case
(`DefaultPreprocessor.run_case` with the preprocessed dataset's nnUNetPlans.json and dataset.json:
transpose, crop to the non-zero region, resample to the plans' spacing), then into slices, through
the volume model (VolumeSampler) and back the inverse way onto the mask's grid and affine.

nnU-Net's non-zero region (the body or brain) shapes the crop and is the mask's label -1 outside
it, so a mask needs one. It is taken, in this order, from: a region file (`--region`, on the mask's
grid); the mask itself, when its voxels outside the body are -1; the dataset case whose grid the
mask lies on (an edited case label: the counterfactual); the informed slice's case or the 3D
informed image (their non-zero region, carried onto the mask's grid through world coordinates). A
dataset none of whose cases nnU-Net cropped (CT: air is not zero) has no outside: the whole grid is
the body.
The mask's labelled voxels always count as inside. Without any of these the mask is refused.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gem3d.config import Config
from gem3d.data.slice_store import OUTSIDE, SliceStore, case_geometry, from_slices, output_intensities, to_original, \
    to_slices
from gem3d.io import InputError, Volume, nifti_shape, read_volume, write_volume
from gem3d.paths import Paths
from gem3d.sampling.informed import InformedSpec, check_slice, parse_case_slice, relative_slice, user_slice

log = logging.getLogger("gem3d.sampling")

NIFTI_ENDINGS = (".nii.gz", ".nii")


def nifti_stem(path: Path) -> str:
    """The file name without its NIfTI ending ('' when it has none)."""
    return next((path.name[: -len(ext)] for ext in NIFTI_ENDINGS if path.name.endswith(ext)), "")


def list_masks(path: Path) -> list[Path]:
    """A mask file, or the NIfTI files of a folder (sorted; hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: mask file or folder not found")
    masks = sorted(p for p in path.iterdir() if p.is_file() and nifti_stem(p) and not p.name.startswith("."))
    if not masks:
        raise InputError(f"{path}: no mask files (.nii.gz or .nii) in this folder")
    return masks


def check_mask(path: Path, cfg: Config) -> Volume:
    """A mask the model can generate for: integer labels the model was trained on (-1 allowed: outside
    the body) and at least one foreground voxel."""
    mask = read_volume(path)
    values = mask.array
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        raise InputError(f"{path}: mask has non-integer (or NaN) values; a mask holds label ids")
    found = set(np.unique(values).astype(int).tolist())
    allowed = set(cfg.data.labels.values())
    unseen = sorted(found - allowed - {OUTSIDE})
    if unseen:
        names = ", ".join(f"{v} {k}" for k, v in sorted(cfg.data.labels.items(), key=lambda kv: kv[1]))
        raise InputError(f"{path}: labels {unseen} outside the trained set (the model never saw them; it was "
                         f"trained on {names})")
    if not found - {0, OUTSIDE}:
        raise InputError(f"{path}: mask is empty (no foreground label); nothing to generate for")
    return Volume(values.astype(np.int16), mask.affine)


@dataclass(frozen=True)
class Informed:
    """Where the informed slice of every generated volume comes from: IG, a dataset case's slice, or a user image."""

    spec: InformedSpec  # IG (position filled in per mask), fixed (case, slice) or user (path, slice)
    depth: int = 0  # fixed: the informed case's depth (its slices at nnU-Net's resolution)


def parse_informed(store: SliceStore, informed: str, image: Path | None = None, index: int | None = None) -> Informed:
    """`informed` is IG or CASE:SLICE; with `image` (a 2D or 3D NIfTI) it must be empty and `index`
    is the image's slice along its third axis (None: its middle slice)."""
    if image is not None:
        if informed:
            raise InputError(f"--informed {informed!r} with --informed-image {image}: give one; the image's slice "
                             "goes with --slice")
        return Informed(InformedSpec("user", slice=index, path=str(image)))
    if index is not None:
        raise InputError(f"--slice {index} goes with --informed-image (CASE:SLICE names the slice of a case)")
    if informed == "IG":
        return Informed(InformedSpec("IG"))
    case, index = parse_case_slice(informed)
    if case not in store.index["cases"]:
        raise InputError(f"informed slice {informed!r}: case {case} is not in the dataset ({store.root}/index.json)")
    depth = int(store.index["cases"][case]["preprocessed_shape"][0])
    check_slice(case, index, depth)
    return Informed(InformedSpec("fixed", case, index), depth)


def matching_case(store: SliceStore, mask: Volume, raw_dataset: Path, tol: float = 1e-3) -> str | None:
    """The dataset case whose image grid the mask lies on (same shape and affine), if any. Where several cases
    share that grid (co-registered data: BraTS on SRI24, phantoms), the one whose label the mask's labelled voxels
    overlap most (Dice; a mask edited on a case keeps most of that case's label)."""
    on_grid = [case_id for case_id, geometry in store.index["cases"].items()
               if list(mask.shape) == geometry["original_shape"]
               and np.abs(mask.affine - np.asarray(geometry["affine"])).max() < tol]
    if len(on_grid) <= 1:
        return on_grid[0] if on_grid else None
    labelled = mask.array > 0

    def overlap(case_id: str) -> float:
        label = read_volume(raw_dataset / "labelsTr" / f"{case_id}.nii.gz").array > 0
        return 2.0 * float((labelled & label).sum()) / max(int(labelled.sum()) + int(label.sum()), 1)

    return max(on_grid, key=overlap)


def onto_grid(source: Volume, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A boolean volume carried onto another grid through world coordinates (nearest voxel; False outside it)."""
    from scipy import ndimage

    to_source = np.linalg.inv(source.affine) @ affine  # target voxel -> world -> source voxel
    moved = ndimage.affine_transform(source.array.astype(np.uint8), to_source[:3, :3], to_source[:3, 3],
                                     output_shape=shape, order=0, cval=0)
    return moved > 0


def never_cropped(store: SliceStore) -> bool:
    """No case of the dataset had voxels outside nnU-Net's non-zero region (e.g. CT, whose air is not 0): its
    crop box was the whole image every time, so a mask's body is its whole grid. A bundle (no cases) says so in
    its index."""
    if "never_cropped" in store.index:
        return bool(store.index["never_cropped"])
    return all([lo for lo, _ in g["bbox"]] == [0, 0, 0] and [hi for _, hi in g["bbox"]] == g["shape_before_cropping"]
               for g in store.index["cases"].values())


def body_region(path: Path, mask: Volume, cfg: Config, store: SliceStore, informed: Informed,
                region: Path | None = None) -> tuple[np.ndarray, str]:
    """The mask's body region on its grid (see the module doc for the order of sources) and where it came from."""
    from gem3d.data.importers import check_same_grid

    labelled = mask.array > 0
    raw = Paths(cfg).raw_dataset / "imagesTr"
    if region is not None:
        given = read_volume(region)
        check_same_grid(region, given, mask, path, cfg.data.affine_tolerance, "region")
        inside, source = given.array > 0.5, f"region file {region}"
    elif (mask.array == OUTSIDE).any():
        inside, source = mask.array != OUTSIDE, "the mask's -1 voxels (outside)"
    elif never_cropped(store):
        inside, source = np.ones(mask.shape, bool), "the whole grid (nnU-Net cropped none of the dataset's cases)"
    elif (case := matching_case(store, mask, Paths(cfg).raw_dataset)) is not None:
        inside, source = read_volume(raw / f"{case}_0000.nii.gz").array != 0, f"case {case} (the mask lies on its grid)"
    elif informed.spec.source in ("fixed", "user"):
        fixed = informed.spec.source == "fixed"
        file = raw / f"{informed.spec.case}_0000.nii.gz" if fixed else Path(informed.spec.path)
        shape = None if fixed else nifti_shape(file)
        image = read_volume(file) if fixed or (len(shape) == 3 and shape[2] > 1) else None
        if image is None:
            raise InputError(f"{path}: the mask has no body region and the 2D informed image {file} cannot give one; "
                             "give --region R.nii.gz (the body on the mask's grid)")
        inside = onto_grid(Volume(image.array != 0, image.affine), mask.shape, mask.affine)
        source = f"{'informed case ' + informed.spec.case if fixed else 'informed image ' + str(file)} " \
                 "(non-zero region, world coordinates)"
        if not inside.any():
            raise InputError(f"{path}: the non-zero region of {file} does not overlap the mask's grid in world "
                             "coordinates; give --region R.nii.gz (the body on the mask's grid)")
    else:
        raise InputError(f"{path}: the mask has labels only, no body region; give --region R.nii.gz (the brain or "
                         "body on the mask's grid), mark the voxels outside the body -1 in the mask, or inform with "
                         "--informed CASE:SLICE or a 3D --informed-image, whose non-zero region is then taken")
    return inside | labelled, source


@dataclass
class PreparedMask:
    path: Path
    mask: Volume  # labels on the mask's grid, -1 outside the body when the mask says so
    native: np.ndarray  # (d, y, x) int8 at nnU-Net's resolution, -1 outside the non-zero region
    geometry: dict  # the way back to the mask's grid (gem3d.data.slice_store.case_geometry's keys)
    region_source: str


def nnunet_plans(cfg: Config):
    """nnU-Net's PlansManager and ConfigurationManager of the preprocessed dataset, and its dataset.json path."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Paths(cfg).preprocessed_dataset
    plans = folder / "nnUNetPlans.json"
    if not plans.is_file():
        raise InputError(f"{plans}: nnU-Net plans not found (run `gem3d preprocess` first)")
    manager = PlansManager(str(plans))
    return manager, manager.get_configuration(cfg.preprocess.configuration), folder / "dataset.json"


def prepare_mask(cfg: Config, store: SliceStore, path: Path, mask: Volume, region: np.ndarray, source: str,
                 informed: Informed) -> PreparedMask:
    """nnU-Net's preprocessing of one mask (the region as its image), and its geometry."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    plans, configuration, dataset_json = nnunet_plans(cfg)
    with tempfile.TemporaryDirectory(prefix="gem3d-generate-") as tmp:
        image_file, seg_file = Path(tmp) / "mask_0000.nii", Path(tmp) / "mask.nii"  # uncompressed: read once
        write_volume(image_file, Volume(region.astype(np.float32), mask.affine))
        write_volume(seg_file, Volume(np.clip(mask.array, 0, None), mask.affine), np.uint8)
        try:
            _, seg, props = DefaultPreprocessor(verbose=False).run_case(
                [str(image_file)], str(seg_file), plans, configuration, str(dataset_json))
        except Exception as exc:  # nnU-Net asserts and raises many types on geometry it cannot read
            raise InputError(f"{path}: nnU-Net's preprocessing failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        native = np.asarray(seg[0]).astype(np.int8)
        geometry = case_geometry(props, native.shape, plans.transpose_backward, seg_file, configuration.spacing,
                                 store.slice_fit)
    geometry["raw_image"] = str(path)
    geometry["intensity_range"] = intensity_range(store, informed)
    if not (native > 0).any():
        raise InputError(f"{path}: no labelled voxel is left at the training resolution "
                         f"({configuration.spacing} mm); the structures are smaller than one voxel")
    return PreparedMask(Path(path), mask, native, geometry, source)


def intensity_range(store: SliceStore, informed: Informed) -> list[float]:
    """The normalised intensity range that maps generated values back (CT): the fixed informed case's,
    else the median over the training cases'."""
    cases = store.index["cases"]
    if informed.spec.source == "fixed":
        return list(cases[informed.spec.case]["intensity_range"])
    if "intensity_range_median" in store.index:  # a bundle: the training cases' median, without the cases
        return list(store.index["intensity_range_median"])
    ranges = np.array([cases[c]["intensity_range"] for c in store.case_ids("train")])
    return [float(v) for v in np.median(ranges, axis=0)]


def training_spacing(geometry: dict) -> tuple[float, float]:
    """The training grid's voxel size along a NIfTI slice's (y, x) axes: nnU-Net's preprocessed
    spacing, taken from the preprocessed axes the file's y and x axes were transposed to."""
    # preprocessed axis k is the (z, y, x) axis forward[k]; a NIfTI's (x, y, z) are (z, y, x) axes 2, 1, 0
    forward = [int(a) for a in np.argsort(geometry["transpose_backward"])]
    spacing = geometry["spacing_preprocessed"]
    return float(spacing[forward.index(1)]), float(spacing[forward.index(2)])


def user_latent(sampler, store: SliceStore, informed: Informed, geometry: dict) -> dict:
    """The VolumeJob extra of a user informed image (its slice resampled to the training grid and encoded)."""
    if informed.spec.source != "user":
        return {}
    image = user_slice(Path(informed.spec.path), informed.spec.slice, store.slice_size, store.index["normalization"],
                       training_spacing(geometry), store.slice_fit, store.intensity)
    return {"user_latent": sampler.vae.encode(image)[0], "user_image": image}


def check_user_image(store: SliceStore, informed: Informed, cfg: Config) -> None:
    """Check a user informed image before any work (read, checked and resampled once, result dropped)."""
    if informed.spec.source == "user":
        plans, configuration, _ = nnunet_plans(cfg)
        geometry = {"transpose_backward": plans.transpose_backward, "spacing_preprocessed": configuration.spacing}
        user_slice(Path(informed.spec.path), informed.spec.slice, store.slice_size, store.index["normalization"],
                   training_spacing(geometry), store.slice_fit, store.intensity)


def start_and_spec(informed: Informed, d: int, start: int | None) -> tuple[int, InformedSpec]:
    """The first window position in a mask of depth d and the informed slice placed there: a case's
    slice at its own relative depth, IG at the start's position, a user slice in the middle."""
    spec = informed.spec
    if start is None:
        start = relative_slice(spec.slice, informed.depth, d) if spec.source == "fixed" else d // 2
    if not 0 <= start < d:
        raise InputError(f"start slice {start} is outside the mask's {d} slices at the training resolution")
    if spec.source == "IG":
        spec = InformedSpec("IG", position=start / max(d - 1, 1))
    return start, spec


def render(prepared: PreparedMask, image: np.ndarray, store: SliceStore) -> Volume:
    """A generated (d, s, s) image in [-1, 1] -> intensities in the dataset's convention on the mask's grid."""
    geometry = prepared.geometry
    values, fill = output_intensities(from_slices(image, geometry, is_label=False), prepared.native != OUTSIDE,
                                      geometry, store.index["normalization"])
    return Volume(to_original(values, geometry, False, fill).array, prepared.mask.affine)


def label_slices(prepared: PreparedMask, store: SliceStore) -> np.ndarray:
    return to_slices(prepared.native, store.slice_size, is_label=True, fit=store.slice_fit)
