"""`gem3d generate` on the tiny trained run: masks on grids no case has (other shape, spacing, rotated
affine) come back on their own grid with their labels unchanged and intensities in the dataset's
convention; nnU-Net's own preprocessing reproduces the dataset's; body regions from every source;
folders in shards, reruns kept; bad inputs are one line naming the file and write nothing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from conftest import SHARED_DATA, TINY_CONFIG
from gem3d.cli import main
from gem3d.data.slice_store import SliceStore
from gem3d.io import InputError, Volume, read_json, read_volume, write_volume
from gem3d.paths import Paths
from gem3d.sampling.new_masks import Informed, body_region, check_mask, prepare_mask
from gem3d.sampling.informed import InformedSpec


def rotated_grid(shape=(22, 27, 13), spacing=(1.5, 1.25, 2.0), degrees=20.0, centre=(0.0, 0.0, 0.0)):
    """An affine whose voxel axes are rotated about z and scaled, its middle voxel at `centre` (mm)."""
    a = np.deg2rad(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return shape, affine


def onto(volume: Volume, shape, affine, order=0) -> np.ndarray:
    m = np.linalg.inv(volume.affine) @ affine
    return ndimage.affine_transform(volume.array.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape,
                                    order=order, cval=0)


@pytest.fixture
def gen(in_run, tmp_path):
    """The config file, a training case's raw image and label, and another case for informed slices."""
    paths = Paths(in_run)
    store = SliceStore(paths.slices)
    case, other = store.case_ids("train")[:2]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    image = read_volume(paths.raw_dataset / "imagesTr" / f"{case}_0000.nii.gz")
    label = read_volume(paths.raw_dataset / "labelsTr" / f"{case}.nii.gz")
    centre = image.affine[:3, :3] @ ((np.asarray(image.shape) - 1) / 2) + image.affine[:3, 3]
    return {"cfg": in_run, "config": config, "tmp": tmp_path, "case": case, "other": other, "image": image,
            "label": label, "store": store, "centre": centre, "out": tmp_path / "out"}


def new_grid_mask(gen, name="new.nii.gz", outside=True, **grid):
    """The case's label and body on a rotated, rescaled grid of another shape; -1 outside the body when `outside`."""
    shape, affine = rotated_grid(centre=gen["centre"], **grid)
    labels = onto(gen["label"], shape, affine).astype(np.int16)
    body = onto(Volume((gen["image"].array != 0).astype(np.float32), gen["image"].affine), shape, affine) > 0
    if outside:
        labels = np.where(body | (labels > 0), labels, -1).astype(np.int16)
    path = gen["tmp"] / name
    write_volume(path, Volume(labels, affine), np.int16)
    return path, labels, body, affine


def run(gen, capsys, *args):
    capsys.readouterr()
    rc = main(["generate", "--config", str(gen["config"]), "--out", str(gen["out"]), *args])
    return rc, capsys.readouterr().err


def test_mask_on_a_grid_no_case_has_comes_back_on_its_own_grid(gen, capsys):
    path, labels, body, affine = new_grid_mask(gen)
    rc, err = run(gen, capsys, "--mask", str(path), "--informed", f"{gen['other']}:5", "--seed", "3")
    assert rc == 0, err
    image = read_volume(gen["out"] / "imagesTr" / "new_0_0000.nii.gz")
    label = read_volume(gen["out"] / "labelsTr" / "new_0.nii.gz")
    assert image.shape == labels.shape == label.shape
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    np.testing.assert_allclose(label.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(label.array, np.clip(labels, 0, None))  # the labels as given
    # MRI convention of the dataset: (0, 1] inside the body, exactly 0 well outside it
    values = image.array
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    far_outside = ~ndimage.binary_dilation(body | (labels > 0), iterations=2)
    assert far_outside.any() and (values[far_outside] == 0).all()
    assert (values[ndimage.binary_erosion(body, iterations=2)] > 0).mean() > 0.95
    record = read_json(gen["out"] / "provenance" / "new_0.json")
    assert record["informed"] == {"source": "fixed", "case": gen["other"], "slice": 5}
    assert record["region"] == "the mask's -1 voxels (outside)" and record["mask"] == str(path)
    assert set(record["checkpoints"]) == {"vae", "volume_stage2"} and len(record["mask_sha256"]) == 64
    manifest = read_json(gen["out"] / "manifest.0of1.json")
    assert [v["id"] for v in manifest["volumes"]] == ["new_0"]


def test_nnunet_preprocessing_of_a_case_label_reproduces_the_dataset(gen):
    """A case's own label through nnU-Net's preprocessor (region: the case's grid) gives the slice store's
    label and geometry exactly: the mask goes the way the dataset went."""
    cfg, store, case = gen["cfg"], gen["store"], gen["case"]
    path = gen["tmp"] / "same.nii.gz"
    write_volume(path, gen["label"], np.uint8)
    mask = check_mask(path, cfg)
    informed = Informed(InformedSpec("IG"))
    inside, source = body_region(path, mask, cfg, store, informed)
    assert source == f"case {case} (the mask lies on its grid)"
    prepared = prepare_mask(cfg, store, path, mask, inside, source, informed)
    np.testing.assert_array_equal(prepared.native, store.load(case).label_native)
    saved = store.index["cases"][case]
    for key in ("preprocessed_shape", "bbox", "shape_before_cropping", "shape_after_cropping", "letterbox",
                "spacing_preprocessed", "transpose_backward", "original_shape"):
        assert prepared.geometry[key] == saved[key], key


def test_mask_at_another_spacing_is_resampled_to_the_plans_spacing(gen):
    """2 mm voxels along the slice axis: nnU-Net resamples to the plans' 1 mm, so the mask has about twice
    the slices at the training resolution."""
    path, labels, body, _ = new_grid_mask(gen, spacing=(1.0, 1.0, 2.0), degrees=0.0, shape=(30, 30, 12))
    cfg, store = gen["cfg"], gen["store"]
    mask = check_mask(path, cfg)
    informed = Informed(InformedSpec("IG"))
    prepared = prepare_mask(cfg, store, path, mask, *body_region(path, mask, cfg, store, informed), informed)
    extent = np.flatnonzero((body | (labels > 0)).any(axis=(0, 1)))
    assert abs(prepared.native.shape[0] - 2 * (extent[-1] - extent[0] + 1)) <= 1
    assert set(np.unique(prepared.native)) >= {-1, 0, 1}


def test_a_dataset_nnunet_never_cropped_makes_the_whole_grid_the_body(gen):
    """CT-like data (nothing is zero outside the body): nnU-Net cropped no case, so a labels-only mask with an
    IG informed slice is generated over its whole grid instead of being refused."""
    import copy

    path, labels, *_ = new_grid_mask(gen, outside=False)
    store = SliceStore(Paths(gen["cfg"]).slices)
    informed = Informed(InformedSpec("IG"))
    mask = check_mask(path, gen["cfg"])
    with pytest.raises(InputError, match="no body region"):
        body_region(path, mask, gen["cfg"], store, informed)
    store.index = copy.deepcopy(store.index)
    for geometry in store.index["cases"].values():
        geometry["bbox"] = [[0, n] for n in geometry["shape_before_cropping"]]
    inside, source = body_region(path, mask, gen["cfg"], store, informed)
    assert inside.all() and source.startswith("the whole grid")


@pytest.mark.parametrize("source", ["region_file", "informed_case", "informed_image"])
def test_body_region_of_a_labels_only_mask(gen, capsys, source):
    path, labels, body, affine = new_grid_mask(gen, outside=False)
    if source == "region_file":
        region = gen["tmp"] / "body.nii.gz"
        write_volume(region, Volume(body.astype(np.uint8), affine), np.uint8)
        args, expected = ["--region", str(region)], f"region file {region}"
    elif source == "informed_case":
        args, expected = ["--informed", f"{gen['case']}:4"], f"informed case {gen['case']}"
    else:
        scan = Paths(gen["cfg"]).raw_dataset / "imagesTr" / f"{gen['other']}_0000.nii.gz"
        args, expected = ["--informed-image", str(scan), "--slice", "9"], f"informed image {scan}"
    rc, err = run(gen, capsys, "--mask", str(path), *args)
    assert rc == 0, err
    assert read_json(gen["out"] / "provenance" / "new_0.json")["region"].startswith(expected)
    assert read_volume(gen["out"] / "imagesTr" / "new_0_0000.nii.gz").shape == labels.shape


def test_informed_image_of_another_spacing_is_resampled_not_refused(gen, capsys):
    """Another case's scan at half the in-plane voxel size (twice the voxels) informs a mask on a new grid."""
    scan = read_volume(Paths(gen["cfg"]).raw_dataset / "imagesTr" / f"{gen['other']}_0000.nii.gz")
    fine = torch.nn.functional.interpolate(torch.from_numpy(scan.array)[None, None], scale_factor=(2, 2, 1),
                                           mode="trilinear", align_corners=False)[0, 0].numpy()
    affine = scan.affine.copy()
    affine[:3, :2] /= 2
    informed = gen["tmp"] / "fine.nii.gz"
    write_volume(informed, Volume(fine, affine))
    path, *_ = new_grid_mask(gen)
    rc, err = run(gen, capsys, "--mask", str(path), "--informed-image", str(informed), "--slice", "10")
    assert rc == 0, err
    record = read_json(gen["out"] / "provenance" / "new_0.json")
    assert record["informed"] == {"source": "user", "slice": 10, "path": str(informed)}


def test_folder_of_masks_in_shards_with_copies_and_a_kept_rerun(gen, capsys):
    folder = gen["tmp"] / "masks"
    folder.mkdir()
    for i, degrees in enumerate((0.0, 15.0, -10.0)):
        path, *_ = new_grid_mask(gen, name=f"m{i}.nii.gz", degrees=degrees)
        path.rename(folder / path.name)
    for shard in (0, 1):
        rc, err = run(gen, capsys, "--mask", str(folder), "--informed", "IG", "--copies", "2", "--shard", str(shard),
                      "--shards", "2")
        assert rc == 0, err
    assert [v["id"] for v in read_json(gen["out"] / "manifest.0of2.json")["volumes"]] == ["m0_0", "m0_1", "m2_0",
                                                                                          "m2_1"]
    assert [v["id"] for v in read_json(gen["out"] / "manifest.1of2.json")["volumes"]] == ["m1_0", "m1_1"]
    images = sorted(p.name for p in (gen["out"] / "imagesTr").iterdir())
    assert images == [f"m{i}_{k}_0000.nii.gz" for i in range(3) for k in range(2)]
    a, b = (read_volume(gen["out"] / "imagesTr" / f"m0_{k}_0000.nii.gz").array for k in (0, 1))
    assert not np.array_equal(a, b)  # copies differ (their seeds)
    stamp = (gen["out"] / "imagesTr" / "m0_0_0000.nii.gz").stat().st_mtime_ns
    rc, err = run(gen, capsys, "--mask", str(folder), "--informed", "IG", "--copies", "2", "--shards", "2")
    assert rc == 0 and "already generated" in err, err
    assert (gen["out"] / "imagesTr" / "m0_0_0000.nii.gz").stat().st_mtime_ns == stamp


def bad_input(gen, problem):
    """(arguments, words of the error) of one bad input."""
    path, labels, body, affine = new_grid_mask(gen)
    tmp = gen["tmp"]
    if problem == "unseen_labels":
        labels = labels.copy()
        labels[labels == 2] = 7
        write_volume(path, Volume(labels, affine), np.int16)
        return ["--mask", str(path)], [path, "labels [7] outside the trained set", "never saw"]
    if problem == "empty_mask":
        write_volume(path, Volume(np.where(labels > 0, 0, labels).astype(np.int16), affine), np.int16)
        return ["--mask", str(path)], [path, "mask is empty"]
    if problem == "non_integer":
        write_volume(path, Volume(labels + 0.5, affine))
        return ["--mask", str(path)], [path, "non-integer"]
    if problem == "labels_only_no_region":
        write_volume(path, Volume(np.clip(labels, 0, None), affine), np.int16)
        return ["--mask", str(path), "--informed", "IG"], [path, "no body region", "--region"]
    if problem == "region_off_grid":
        region = tmp / "region.nii.gz"
        write_volume(region, Volume(body[:-2].astype(np.uint8), affine), np.uint8)
        return ["--mask", str(path), "--region", str(region)], [region, "region shape"]
    if problem == "unknown_case":
        return ["--mask", str(path), "--informed", "nosuch:3"], ["case nosuch is not in the dataset"]
    if problem == "slice_without_image":
        return ["--mask", str(path), "--slice", "3"], ["--slice 3 goes with --informed-image"]
    if problem == "empty_folder":
        (tmp / "none").mkdir()
        return ["--mask", str(tmp / "none")], [tmp / "none", "no mask files"]
    if problem == "missing_mask":
        return ["--mask", str(tmp / "nosuch.nii.gz")], [tmp / "nosuch.nii.gz", "not found"]
    if problem == "one_bad_mask_in_a_folder":
        folder = tmp / "masks"
        folder.mkdir()
        path.rename(folder / "a.nii.gz")
        write_volume(folder / "b.nii.gz", Volume(np.zeros(labels.shape, np.int16), affine), np.int16)
        return ["--mask", str(folder)], [folder / "b.nii.gz", "mask is empty"]
    if problem == "same_name_in_another_shard":  # found in review: each shard checked only its own masks
        folder = tmp / "masks"
        folder.mkdir()
        path.rename(folder / "a.nii.gz")  # shard 1 of 2; a.nii (sorted first) shard 0: both write a_0_0000.nii.gz
        write_volume(folder / "a.nii", read_volume(folder / "a.nii.gz"), np.int16)
        return ["--mask", str(folder), "--shard", "1", "--shards", "2"], [folder / "a.nii.gz", "same name as",
                                                                          folder / "a.nii"]
    if problem == "bad_shard":
        return ["--mask", str(path), "--shard", "2", "--shards", "2"], ["--shard 2 is not in 0..1"]
    raise AssertionError(problem)


PROBLEMS = ["unseen_labels", "empty_mask", "non_integer", "labels_only_no_region", "region_off_grid", "unknown_case",
            "slice_without_image", "empty_folder", "missing_mask", "one_bad_mask_in_a_folder", "same_name_in_another_shard",
            "bad_shard"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_generate_input_is_one_line_and_writes_nothing(gen, capsys, problem):
    args, words = bad_input(gen, problem)
    rc, err = run(gen, capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    for word in words:
        assert str(word) in lines[-1], (word, lines[-1])
    assert not gen["out"].exists()


@pytest.mark.skipif(not (SHARED_DATA / "BraTS2015_deepmedic").is_dir(), reason="needs ../shared/data (real scans)")
def test_real_brats_mask_from_another_dataset(gen, capsys):
    """A real BraTS 2013 tumour mask (240 x 240 x 155, its own affine; labels mapped to the model's ids) with
    its brain mask as --region: generated on its own grid, its labels unchanged, zero outside the brain."""
    from gem3d.data.importers import BRATS_LABEL_MAP

    case = SHARED_DATA / "BraTS2015_deepmedic" / "brats_2013_pat0004_1"
    raw = read_volume(case / "OTMultiClass.nii.gz")
    labels = np.vectorize(BRATS_LABEL_MAP.get)(raw.array.astype(int)).astype(np.uint8)
    mask = gen["tmp"] / "pat0004.nii.gz"
    write_volume(mask, Volume(labels, raw.affine), np.uint8)
    rc, err = run(gen, capsys, "--mask", str(mask), "--region", str(case / "brainmask.nii.gz"))
    assert rc == 0, err
    image = read_volume(gen["out"] / "imagesTr" / "pat0004_0_0000.nii.gz")
    assert image.shape == (240, 240, 155)
    np.testing.assert_allclose(image.affine, raw.affine, atol=1e-5)
    np.testing.assert_array_equal(read_volume(gen["out"] / "labelsTr" / "pat0004_0.nii.gz").array, labels)
    brain = read_volume(case / "brainmask.nii.gz").array > 0.5
    assert (image.array[~ndimage.binary_dilation(brain, iterations=2)] == 0).all()
    assert (image.array[brain] > 0).mean() > 0.95


def test_the_config_generation_section_gives_the_defaults(gen, capsys):
    """What the workflow's generate rule runs: `gem3d generate --config C --shard i`, everything else from
    the config's `generation` section; without masks anywhere it is one line."""
    path, *_ = new_grid_mask(gen)
    config = gen["tmp"] / "with_generation.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "generation": {
        "masks": str(path), "informed": f"{gen['other']}:2", "copies": 2, "shards": 1, "seed": 5}}))
    capsys.readouterr()
    out = Paths(gen["cfg"]).root / "generated"
    try:
        rc = main(["generate", "--config", str(config), "--shard", "0"])
        err = capsys.readouterr().err
        assert rc == 0, err
        manifest = read_json(out / "manifest.0of1.json")
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the session's shared run stays as the other tests expect it
    assert [v["id"] for v in manifest["volumes"]] == ["new_0", "new_1"]
    assert all(v["informed"] == {"source": "fixed", "case": gen["other"], "slice": 2} for v in manifest["volumes"])
    rc, err = run(gen, capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ") and "generation.masks" in err, err


@pytest.mark.parametrize("key, value", [("solver", "dpmpp_2m"), ("ddim_spacing", "ldm"), ("precision", "bf16")])
def test_rerun_with_another_sampler_setting_generates_again(gen, capsys, key, value):
    """What the sampler reads is part of what a generated volume is: a rerun with another solver, DDIM grid or
    precision is not 'already generated' (found in review: the grid and the precision kept the old volumes)."""
    path, *_ = new_grid_mask(gen)
    rc, err = run(gen, capsys, "--mask", str(path), "--informed", "IG")
    assert rc == 0, err
    raw = yaml.safe_load(gen["config"].read_text())
    raw["sampling"] = {**raw["sampling"], key: value, **({"eta": 0.0} if value == "dpmpp_2m" else {})}
    gen["config"].write_text(yaml.safe_dump(raw))
    rc, err = run(gen, capsys, "--mask", str(path), "--informed", "IG")
    assert rc == 0 and "already generated" not in err, err
    entry = read_json(gen["out"] / "provenance" / "new_0.json")
    assert entry["sampling"][f"sampling.{key}"] == value


def test_rerun_with_a_replaced_informed_image_generates_again(gen, capsys):
    """Found in review: the request named the user's informed image by its path only, so a replaced image at the
    same path kept the volumes generated from the old one."""
    path, *_ = new_grid_mask(gen)
    informed = gen["tmp"] / "informed.nii.gz"
    for case in (gen["other"], gen["case"]):
        write_volume(informed, read_volume(Paths(gen["cfg"]).raw_dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        rc, err = run(gen, capsys, "--mask", str(path), "--informed-image", str(informed), "--slice", "10")
        assert rc == 0 and "already generated" not in err, err
    rc, err = run(gen, capsys, "--mask", str(path), "--informed-image", str(informed), "--slice", "10")
    assert rc == 0 and "already generated" in err, err  # the same image again: kept
