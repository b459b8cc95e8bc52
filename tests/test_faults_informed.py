"""Fault corpus, counterfactual with an informed image: each test builds one bad informed image or bad
argument, runs `gem3d counterfactual` in-process on the tiny trained run, and checks the one-line error
naming the file (or both arguments), no traceback, and nothing written where the output would go."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_CONFIG, assert_one_error
from gem3d.cli import main
from gem3d.data.slice_store import SliceStore
from gem3d.io import Volume, read_json, read_volume, write_volume
from gem3d.paths import Paths
from gem3d.sampling.informed import user_slice


@pytest.fixture
def cf(in_run, tmp_path):
    """Inputs of a counterfactual on the tiny run: the config file, an edited mask on a case's grid, another
    case's raw scan (a good 3D informed image), and an empty output folder."""
    paths = Paths(in_run)
    store = SliceStore(paths.slices)
    case, other = store.case_ids("train")[:2]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    mask = tmp_path / "mask.nii.gz"
    write_volume(mask, read_volume(paths.raw_dataset / "labelsTr" / f"{case}.nii.gz"), np.uint8)
    scan = read_volume(paths.raw_dataset / "imagesTr" / f"{other}_0000.nii.gz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return {"config": config, "mask": mask, "scan": scan, "out": out_dir / "cf.nii.gz", "tmp": tmp_path,
            "other": other}


def run_cf(cf, capsys, *extra, out=None):
    capsys.readouterr()
    rc = main(["counterfactual", "--config", str(cf["config"]), "--mask", str(cf["mask"]),
               "--out", str(out or cf["out"]), *extra])
    return rc, capsys.readouterr().err


def nothing_written(cf):
    return sorted(p.name for p in cf["out"].parent.iterdir()) == []


def informed_file(cf, name, array, affine=None):
    path = cf["tmp"] / name
    write_volume(path, Volume(np.asarray(array, np.float32), cf["scan"].affine if affine is None else affine))
    return path


def bad_image(cf, kind):
    """One bad informed image; returns (path, extra CLI args, words the error must hold)."""
    scan = cf["scan"].array
    if kind == "thin_300x7x3":
        return informed_file(cf, "thin.nii.gz", np.ones((300, 7, 3)), np.eye(4)), [], "in-plane size 300x7"
    if kind == "all_zero":
        return informed_file(cf, "zero.nii.gz", np.zeros_like(scan)), [], "all zero"
    if kind == "4d":
        return informed_file(cf, "4d.nii.gz", np.stack([scan, scan], -1)), [], "expected a 2D image or a 3D volume"
    if kind == "rgb":
        path = cf["tmp"] / "rgb.nii.gz"
        rgb = np.zeros(scan.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, cf["scan"].affine), str(path))
        return path, [], "RGB"
    if kind == "nan_values":
        arr = scan.copy()
        arr[3, 3, 3] = np.nan
        return informed_file(cf, "nan.nii.gz", arr), [], "NaN"
    if kind == "nan_affine":
        path = cf["tmp"] / "nanaff.nii.gz"
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(np.float32)
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, np.nan], [0, 1, 0, 0], [0, 0, 1, 0]
        hdr["sform_code"], hdr["qform_code"] = 1, 0
        nib.save(nib.Nifti1Image(scan, None, header=hdr), str(path))
        return path, [], "affine has NaN"
    if kind == "index_too_big":
        return informed_file(cf, "scan.nii.gz", scan), ["--informed", "999"], "slice index 999 is outside"
    if kind == "index_negative":
        return informed_file(cf, "scan.nii.gz", scan), ["--informed", "-1"], "slice index -1 is outside"
    if kind == "empty_slice":
        arr = scan.copy()
        arr[:, :, 0] = 0
        return informed_file(cf, "scan.nii.gz", arr), ["--informed", "0"], "slice 0 is all zero"
    if kind == "tiny_voxels":  # 0.001 mm voxels: resampled to the training grid it would be 0 voxels wide
        affine = np.diag([0.001, 0.001, 1.0, 1.0])
        return informed_file(cf, "tiny.nii.gz", scan, affine), [], "cannot resample"
    raise AssertionError(kind)


BAD_IMAGES = ["thin_300x7x3", "all_zero", "4d", "rgb", "nan_values", "nan_affine", "index_too_big",
              "index_negative", "empty_slice", "tiny_voxels"]


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_informed_image_is_one_line_and_writes_nothing(cf, capsys, kind):
    path, extra, words = bad_image(cf, kind)
    rc, err = run_cf(cf, capsys, "--informed-image", str(path), *extra)
    assert_one_error(rc, err, path, words)
    assert nothing_written(cf)


@pytest.mark.parametrize("problem", ["informed_and_image", "unknown_case", "bad_case_slice", "out_is_folder",
                                     "out_not_nifti", "out_under_a_file"])
def test_bad_counterfactual_argument_is_one_line(cf, capsys, problem):
    scan = informed_file(cf, "scan.nii.gz", cf["scan"].array)
    out = None
    if problem == "informed_and_image":
        args, words = ["--informed", "x", "--informed-image", str(scan)], ["--informed 'x'", "--informed-image", scan]
    elif problem == "unknown_case":
        args, words = ["--informed", "nosuch:3"], ["case nosuch is not in the dataset"]
    elif problem == "bad_case_slice":
        args, words = ["--informed", f"{cf['other']}:x"], ["expected CASE:SLICE"]
    elif problem == "out_is_folder":
        out = cf["out"].parent / "a_folder"
        out.mkdir()
        args, words = ["--informed", f"{cf['other']}:3"], [out, "existing folder"]
    elif problem == "out_not_nifti":
        out = cf["out"].parent / "cf.png"
        args, words = ["--informed", f"{cf['other']}:3"], [out, ".nii.gz or .nii"]
    else:
        (cf["out"].parent / "file").write_text("x")
        out = cf["out"].parent / "file" / "cf.nii.gz"
        args, words = ["--informed", f"{cf['other']}:3"], [out, "which is a file"]
    rc, err = run_cf(cf, capsys, *args, out=out)
    assert_one_error(rc, err, *words)
    left = sorted(p.name for p in cf["out"].parent.iterdir())
    assert left == {"out_is_folder": ["a_folder"], "out_under_a_file": ["file"]}.get(problem, [])
    if problem == "out_is_folder":
        assert list(out.iterdir()) == []


def test_informed_image_at_another_spacing_is_resampled_and_generates(cf, capsys):
    """The scan at half the voxel size in-plane (twice the voxels): accepted through the CLI, the volume
    and its record written; on the training grid it is the same slice as the scan at its own spacing."""
    scan = cf["scan"]
    fine = torch.nn.functional.interpolate(torch.from_numpy(scan.array)[None, None], scale_factor=(2, 2, 1),
                                           mode="trilinear", align_corners=False)[0, 0].numpy()
    affine = scan.affine.copy()
    affine[:3, :2] /= 2
    path = informed_file(cf, "fine.nii.gz", fine, affine)
    rc, err = run_cf(cf, capsys, "--informed-image", str(path), "--informed", "10")
    assert rc == 0 and "error" not in err, err
    assert sorted(p.name for p in cf["out"].parent.iterdir()) == ["cf.json", "cf.nii.gz"]
    assert read_json(cf["out"].with_name("cf.json"))["informed"] == {"source": "user", "slice": 10, "path": str(path)}
    np.testing.assert_allclose(read_volume(cf["out"]).affine, read_volume(cf["mask"]).affine)


def test_anisotropic_informed_image_is_resampled_by_spacing():
    """A slice stored with 2 mm voxels along y (half the rows) is brought to the training grid's 1 mm before
    it is made square, so it matches the same slice stored at 1 mm; unresampled it would be squashed."""
    import tempfile
    from pathlib import Path

    y, x = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 40), indexing="ij")
    disk = np.where(x ** 2 + (y / 0.6) ** 2 < 0.8, 1 + x + 2 * y, 0).astype(np.float32).T[:, :, None]  # (x, y, 1)
    with tempfile.TemporaryDirectory() as tmp:
        iso, aniso = Path(tmp) / "iso.nii.gz", Path(tmp) / "aniso.nii.gz"
        write_volume(iso, Volume(disk, np.eye(4)))
        write_volume(aniso, Volume(disk[:, ::2], np.diag([1.0, 2.0, 1.0, 1.0])))
        reference = user_slice(iso, None, 32, spacing=(1.0, 1.0))
        resampled = user_slice(aniso, None, 32, spacing=(1.0, 1.0))
        squashed = user_slice(aniso, None, 32)
    assert float((resampled - reference).abs().mean()) < 0.05
    assert float((squashed - reference).abs().mean()) > 0.15


@pytest.mark.parametrize("problem", ["unseen_labels", "empty_mask", "other_grid"])
def test_bad_counterfactual_mask_is_one_line_naming_it(cf, capsys, problem):
    """The edited mask itself: labels the model never saw, no foreground, or a grid no case has (which
    `gem3d generate` takes instead)."""
    mask = read_volume(cf["mask"])
    arr, affine = mask.array.copy(), mask.affine
    if problem == "unseen_labels":
        arr[arr == 2] = 5
        words = ["labels [5] outside the trained set", "never saw"]
    elif problem == "empty_mask":
        arr[:] = 0
        words = ["mask is empty"]
    else:
        arr = arr[:, :, :-2]
        words = ["match no case of the dataset", "gem3d generate"]
    write_volume(cf["mask"], Volume(arr, affine), np.int16)
    rc, err = run_cf(cf, capsys, "--informed", f"{cf['other']}:3")
    assert_one_error(rc, err, cf["mask"], *words)
    assert nothing_written(cf)


def test_counterfactual_with_a_generated_informed_slice(cf, capsys):
    """--informed IG (the slice model) works for a counterfactual as for `gem3d generate`."""
    rc, err = run_cf(cf, capsys, "--informed", "IG")
    assert rc == 0, err
    record = read_json(cf["out"].with_name("cf.json"))
    assert record["informed"]["source"] == "IG" and 0 <= record["informed"]["position"] <= 1
    assert record["region"].startswith("case ")
