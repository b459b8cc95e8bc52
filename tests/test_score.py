"""`gem3d score`: two NIfTI folders scored without a config, with Table 1's protocol (slice_space.py
checked against nnU-Net's own preprocessor + the slice store) and Table 1/2's metric code."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import assert_one_error, make_case
from gem3d.cli import main
from gem3d.io import Volume, write_volume

SHAPE = (24, 24, 16)


def write_set(folder: Path, n=4, transform=None, name="case{i}.nii.gz", shape=SHAPE, affine=None) -> Path:
    """n head-like volumes (conftest.make_case), optionally transformed inside the body (zero outside)."""
    for i in range(n):
        image, _ = make_case(shape, seed=i, affine=affine)
        array = image.array if transform is None else transform(image.array, i)
        write_volume(folder / name.format(i=i), Volume(np.where(image.array > 0, array, 0).astype(np.float32),
                                                       image.affine))
    return folder


def noised(array, i):
    return array + 30 * np.random.default_rng(100 + i).standard_normal(array.shape)


def score(capsys, real, synthetic, out, *extra):
    capsys.readouterr()
    rc = main(["score", "--real", str(real), "--synthetic", str(synthetic), "--fid-extractor", "random_conv",
               "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def load(out: Path) -> dict:
    return json.loads((out / "score.json").read_text())


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return write_set(tmp_path_factory.mktemp("score") / "real")


# ----------------------------------------------------------------------------- scores
def test_identical_folders_score_zero_fid_and_perfect_pairs(real, tmp_path, capsys):
    rc, err = score(capsys, real, real, tmp_path / "out")
    assert rc == 0, err
    result = load(tmp_path / "out")
    assert set(result) == {"real", "synthetic", "protocol", "fid", "paired"}
    assert result["real"]["n_volumes"] == result["synthetic"]["n_volumes"] == 4
    assert result["real"]["shapes_xyz"] == [list(SHAPE)] and result["real"]["median_spacing_xyz_mm"] == [1, 1, 1.5]
    fid = result["fid"]
    for key in ("FID-A", "FID-C", "FID-S"):
        assert abs(fid[key]) < 1e-6, fid
    assert set(fid["n_slices_real"]) == {"axial", "coronal", "sagittal"}
    assert fid["n_slices_real"] == fid["n_slices_synthetic"]
    split = fid["real_split_half"]  # 4 real volumes: 4 groups of 1, the 3 splits into 2 vs 2
    assert (split["n_groups"], split["n_splits"], split["n_volumes_per_half"]) == (4, 3, [2, 2])
    for key in ("FID-A", "FID-C", "FID-S"):
        assert 0 < split[key]["min"] <= split[key]["median"] <= split[key]["max"]
    assert fid["weights_free"] and "NOT comparable" in fid["note"] and fid["extractor"].startswith("random_conv")
    protocol = result["protocol"]
    assert protocol["target_spacing_xyz_mm"] == [1, 1, 1.5] and protocol["slice_size"] >= 16
    assert protocol["intensity"].startswith("min-max over the non-zero region to [-1, 1]")
    paired = result["paired"]
    assert paired["computed"] and paired["n_pairs"] == 4 and paired["pairing"] == "file name"
    assert paired["MS-SSIM"] == pytest.approx(1) and paired["SSIM"] == pytest.approx(1)
    assert paired["PSNR"] == "inf"  # paired.py's inf for identical slices (JSON has no infinity)
    assert paired["LPIPS"] == "not computed: no --lpips-backbone-weights given"
    assert [p["key"] for p in paired["per_pair"]] == [f"case{i}.nii.gz" for i in range(4)]
    md = (tmp_path / "out" / "score.md").read_text()
    assert md.startswith("# gem3d score\n") and "NOT comparable" in md and "## Paired metrics" in md
    assert "| synthetic (4 volumes) vs real (4) |" in md and "| inf |" in md
    assert "| real split half (2 vs 2): median [min, max] of 3 splits | " in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["score.json", "score.md"]  # atomic, no leftovers


def test_a_noised_copy_scores_worse_and_an_intensity_rescaled_copy_the_same(real, tmp_path, capsys):
    noisy = write_set(tmp_path / "noisy", transform=noised)
    rc, err = score(capsys, real, noisy, tmp_path / "noisy_out")
    assert rc == 0, err
    result = load(tmp_path / "noisy_out")
    for key in ("FID-A", "FID-C", "FID-S"):
        assert result["fid"][key] > 1e-3, result["fid"]
    assert 0 < result["paired"]["MS-SSIM"] < 0.95 and 0 < result["paired"]["PSNR"] < 40
    # 3 x + 500 inside the body: the protocol's min-max over the non-zero region, applied to both folders, undoes it
    scaled = write_set(tmp_path / "scaled", transform=lambda a, i: 3 * a + 500)
    rc, err = score(capsys, real, scaled, tmp_path / "scaled_out")
    assert rc == 0, err
    same = load(tmp_path / "scaled_out")
    for key in ("FID-A", "FID-C", "FID-S"):
        assert abs(same["fid"][key]) < 1e-3 * result["fid"][key], (same["fid"], result["fid"])
    assert same["paired"]["SSIM"] > 0.999


def test_other_grids_are_resampled_to_the_real_target_spacing(real, tmp_path, capsys):
    """Synthetic volumes on a finer grid (and other names: no pairs) go through the real folder's protocol."""
    fine = write_set(tmp_path / "fine", shape=(36, 36, 24), affine=np.diag([2 / 3, 2 / 3, 1.0, 1.0]), name="gen{i}.nii")
    rc, err = score(capsys, real, fine, tmp_path / "out")
    assert rc == 0, err
    result = load(tmp_path / "out")
    assert result["synthetic"]["shapes_xyz"] == [[36, 36, 24]]
    assert result["protocol"]["target_spacing_xyz_mm"] == [1, 1, 1.5]
    assert result["fid"]["n_slices_synthetic"]["axial"] == pytest.approx(result["fid"]["n_slices_real"]["axial"], abs=4)
    assert result["paired"] == {"computed": False, "reason": f"not computed: no file name is in both {real} and {fine} "
                                                             "(pair by name, or give --pair-regex)"}
    assert "not computed: no file name is in both" in (tmp_path / "out" / "score.md").read_text()
    assert result["protocol"]["slice_fit"].startswith("letterboxed") and "region" in result["protocol"]["intensity"]
    rc, err = score(capsys, real, fine, tmp_path / "stretched", "--slice-fit", "stretch", "--intensity", "volume")
    assert rc == 0, err
    stretched = load(tmp_path / "stretched")
    assert stretched["protocol"]["slice_fit"] == "stretched to a square"
    assert stretched["protocol"]["intensity"].startswith("min-max over the whole crop")
    assert stretched["fid"]["FID-A"] != result["fid"]["FID-A"]
    rc, err = score(capsys, real, fine, tmp_path / "native", "--spacing", "native", "--slice-size", "24")
    assert rc == 0, err
    native = load(tmp_path / "native")
    assert native["protocol"]["target_spacing_xyz_mm"] is None and native["protocol"]["slice_size"] == 24
    assert native["fid"]["n_slices_synthetic"]["axial"] > result["fid"]["n_slices_synthetic"]["axial"]  # 24 vs 16 deep


def test_pairs_by_regex(real, tmp_path, capsys):
    renamed = write_set(tmp_path / "renamed", name="case{i}_0000.nii.gz")
    rc, err = score(capsys, real, renamed, tmp_path / "out", "--pair-regex", r"^(case\d+)")
    assert rc == 0, err
    paired = load(tmp_path / "out")["paired"]
    assert paired["n_pairs"] == 4 and paired["MS-SSIM"] == pytest.approx(1) and paired["pairing"].startswith("--pair")
    write_set(renamed, n=1, name="case{i}_0001.nii.gz")
    rc, err = score(capsys, real, renamed, tmp_path / "out2", "--pair-regex", r"^(case\d+)")
    assert_one_error(rc, err, str(renamed), "case0_0000.nii.gz and case0_0001.nii.gz have the same pairing key 'case0'")


# ----------------------------------------------------------------------------- refusals
def bad_nifti(folder: Path) -> str:
    write_set(folder, n=2)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti at all")
    return str(folder / "broken.nii.gz")


def empty_volume(folder: Path) -> str:
    write_set(folder, n=2)
    write_volume(folder / "zeros.nii.gz", Volume(np.zeros(SHAPE, np.float32), np.eye(4)))
    return f"{folder / 'zeros.nii.gz'}: no non-zero voxel"


def text_only(folder: Path) -> str:
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "volume.npy").write_bytes(b"x")
    return f"{folder}: no NIfTI files (.nii, .nii.gz) among its 2 files, e.g. notes.txt (--synthetic)"


def four_d(folder: Path) -> str:
    write_set(folder, n=2)
    write_volume(folder / "four.nii.gz", Volume(np.ones((*SHAPE, 2), np.float32), np.eye(4)))
    return f"{folder / 'four.nii.gz'}: expected a 3D volume"


BAD_SYNTHETIC = {
    "missing": lambda folder: f"{folder}: folder not found (--synthetic)",
    "empty": lambda folder: folder.mkdir() or f"{folder}: empty folder (--synthetic)",
    "not_nifti": text_only,
    "unreadable": bad_nifti,
    "empty_volume": empty_volume,
    "four_d": four_d,
}


@pytest.mark.parametrize("fault", sorted(BAD_SYNTHETIC))
def test_bad_synthetic_folders_are_one_line_errors(fault, real, tmp_path, capsys):
    words = BAD_SYNTHETIC[fault](tmp_path / "synthetic")
    rc, err = score(capsys, real, tmp_path / "synthetic", tmp_path / "out")
    assert_one_error(rc, err, words)
    assert not (tmp_path / "out" / "score.json").exists()


def test_a_bad_real_folder_is_named_as_real(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    rc, err = score(capsys, tmp_path / "real", tmp_path / "real", tmp_path / "out")
    assert_one_error(rc, err, f"{tmp_path / 'real'}: empty folder (--real)")


def test_pairs_asked_for_but_absent_or_on_other_grids(real, tmp_path, capsys):
    other = write_set(tmp_path / "other", n=2, name="gen{i}.nii.gz")
    rc, err = score(capsys, real, other, tmp_path / "out", "--paired")
    assert_one_error(rc, err, f"no pairs: no file name is in both {real} and {other} (pairs were asked for)")
    rc, err = score(capsys, real, other, tmp_path / "out", "--pair-regex", "^(nothing)")
    assert_one_error(rc, err, "no key of --pair-regex '^(nothing)' is in both")
    bigger = write_set(tmp_path / "bigger", n=2, shape=(28, 24, 16))
    rc, err = score(capsys, real, bigger, tmp_path / "out", "--paired")
    assert_one_error(rc, err, "pair case0.nii.gz:", "has shape (24, 24, 16)", "has (28, 24, 16)", "voxel by voxel")
    assert not (tmp_path / "out").exists()


def test_a_pair_stored_in_another_voxel_order_is_refused_unless_the_affine_is_to_be_ignored(real, tmp_path, capsys):
    """Found in review: the same world images stored with the x axis reversed (affine adjusted, e.g. an LPS export)
    passed the shape check and were compared with the wrong voxels (MS-SSIM 0.58 for identical images)."""
    from gem3d.io import read_volume

    flipped = tmp_path / "flipped"
    for path in sorted(real.iterdir()):
        volume = read_volume(path)
        reverse_x = np.diag([-1.0, 1.0, 1.0, 1.0])
        reverse_x[0, 3] = volume.shape[0] - 1  # voxel i of the new file is voxel n-1-i of the old: the same place
        write_volume(flipped / path.name, Volume(volume.array[::-1].copy(), volume.affine @ reverse_x))
    rc, err = score(capsys, real, flipped, tmp_path / "out", "--paired")
    assert_one_error(rc, err, "pair case0.nii.gz:", f"the affine of {flipped / 'case0.nii.gz'} differs", "--ignore-affine")
    assert not (tmp_path / "out").exists()
    rc, err = score(capsys, real, flipped, tmp_path / "out", "--paired", "--ignore-affine")
    assert rc == 0, err
    assert load(tmp_path / "out")["paired"]["MS-SSIM"] < 0.9  # compared voxel by voxel, as asked


def test_settings_are_checked_like_the_config_keys(real, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["score", "--real", str(real), "--synthetic", str(real), "--out", str(tmp_path)])  # the default extractor
    assert_one_error(rc, capsys.readouterr().err, "--fid-weights is not set: the radimagenet_resnet50 extractor loads "
                                                  "a local weights file")
    rc, err = score(capsys, real, real, tmp_path, "--fid-weights", str(tmp_path / "w.pth"))
    assert_one_error(rc, err, "--fid-weights must be left out for --fid-extractor random_conv")
    rc, err = score(capsys, real, real, tmp_path, "--lpips-backbone-weights", str(tmp_path / "alex.pth"))
    assert_one_error(rc, err, f"--lpips-backbone-weights: weights missing at {tmp_path / 'alex.pth'}")
    for extra, words in ((("--spacing", "1,1"), "--spacing '1,1': expected median, native or X,Y,Z"),
                         (("--spacing", "1,0,1"), "must be three positive numbers"),
                         (("--clip", "5", "-5"), "clip [5.0, -5.0] must be two finite numbers, low < high"),
                         (("--slice-size", "8"), "--slice-size 8: must be >= 16"),
                         (("--pair-regex", "(unclosed"), "not a regular expression")):
        rc, err = score(capsys, real, real, tmp_path / "out", *extra)
        assert_one_error(rc, err, words)
    assert not list(tmp_path.glob("**/score.json"))
    with pytest.raises(SystemExit) as info:  # no config file: --config is not an option of score
        main(["score", "--config", "c.yaml", "--real", str(real), "--synthetic", str(real)])
    assert info.value.code == 2


# ----------------------------------------------------------------------------- the protocol is Table 1's
def test_slice_space_is_nnunet_preprocessing_then_the_slice_store():
    """to_slice_space against nnU-Net's DefaultPreprocessor (3d_fullres resampling of its default planner) followed by
    the slice store's scaling and slicing, with and without a transpose and the mask-based normalisation."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    from gem3d.data.slice_store import scale_intensities, to_slices
    from gem3d.evaluation.slice_space import SliceSpace, to_slice_space

    image, _ = make_case((24, 26, 14), seed=3, affine=np.diag([0.8, 0.9, 2.9, 1.0]))
    zyx, spacing = image.array.transpose(2, 1, 0), (2.9, 0.9, 0.8)
    data_fn, data_kwargs, seg_fn, seg_kwargs = ExperimentPlanner.determine_resampling(None)
    for target, mask_for_norm, transpose in (((1.0, 1.0, 1.0), True, (0, 1, 2)), ((2.0, 1.1, 0.7), False, (0, 1, 2)),
                                             ((2.5, 1.2, 0.6), True, (2, 0, 1))):
        plans = SimpleNamespace(transpose_forward=list(transpose),
                                foreground_intensity_properties_per_channel={"0": {}})
        configuration = SimpleNamespace(spacing=list(target), normalization_schemes=["ZScoreNormalization"],
                                        use_mask_for_norm=[mask_for_norm],
                                        resampling_fn_data=functools.partial(data_fn, **data_kwargs),
                                        resampling_fn_seg=functools.partial(seg_fn, **seg_kwargs))
        data, seg, _ = DefaultPreprocessor(verbose=False).run_case_npy(
            zyx[None].copy(), None, {"spacing": list(spacing)}, plans, configuration, None)
        expected = to_slices(scale_intensities(data[0], seg[0] != -1), 20, False)
        got, label, _ = to_slice_space(zyx, spacing, SliceSpace(target, transpose, 20, None, mask_for_norm), Path("x"))
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-3  # float16, as the store keeps it
        assert (label == to_slices(seg[0], 20, True)).all()
        # the slice store's preprocess.intensity: volume and preprocess.slice_fit: stretch (the release configs)
        expected = to_slices(scale_intensities(data[0], np.ones_like(seg[0], bool)), 20, False, "stretch")
        space = SliceSpace(target, transpose, 20, None, mask_for_norm, fit="stretch", intensity="volume")
        got, label, _ = to_slice_space(zyx, spacing, space, Path("x"))
        assert np.abs(got - expected).max() < 1e-3 and (label == to_slices(seg[0], 20, True, "stretch")).all()


def test_target_spacing_and_transpose_follow_nnunets_planner():
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from gem3d.evaluation.slice_space import target_spacing, transpose_forward

    cases = {"isotropic": ([[1.0, 1.0, 1.0], [1.2, 0.9, 0.9], [0.8, 1.1, 1.0]], [[100, 120, 110]] * 3),
             "anisotropic": ([[5.0, 0.7, 0.7], [6.0, 0.8, 0.8], [3.5, 0.7, 0.7], [4.0, 0.75, 0.75]],
                             [[20, 256, 256]] * 4),
             "coarse_x": ([[1.0, 1.0, 4.0], [1.0, 1.0, 4.0]], [[200, 200, 30]] * 2)}
    for name, (spacings, shapes) in cases.items():
        planner = SimpleNamespace(overwrite_target_spacing=None, anisotropy_threshold=3,
                                  dataset_fingerprint={"spacings": spacings, "shapes_after_crop": shapes})
        expected = ExperimentPlanner.determine_fullres_target_spacing(planner)
        assert np.allclose(target_spacing(spacings, shapes), expected), name
        worst = int(np.argmax(expected))
        assert transpose_forward(expected) == (worst, *[i for i in range(3) if i != worst])
    assert transpose_forward([1.0, 1.0, 4.0]) == (2, 0, 1)


def test_split_half_reference_over_groups_of_the_real_volumes():
    """The split-half FIDs are those of merged group moments, every split once; too few volumes: a reason."""
    from gem3d.evaluation.quality import RunningMoments, fid_between
    from gem3d.evaluation.score import split_half_fid

    rng = np.random.default_rng(0)
    features = [{p: rng.normal(size=(5, 3)) + g for p in ("axial", "coronal", "sagittal")} for g in range(6)]
    groups = []
    for group in features:
        moments = {p: RunningMoments() for p in group}
        for p, f in group.items():
            moments[p].update(f)
        groups.append(moments)
    result = split_half_fid(groups, [2] * 6)
    assert (result["n_splits"], result["n_groups"], result["n_volumes_per_half"]) == (10, 6, [6, 6])

    def stacked(indices, plane):
        m = RunningMoments()
        m.update(np.concatenate([features[i][plane] for i in indices]))
        return m

    fids = [fid_between({p: stacked(a, p) for p in ("axial", "coronal", "sagittal")},
                        {p: stacked([i for i in range(6) if i not in a], p) for p in ("axial", "coronal", "sagittal")})
            for a in ((0, 1, 2), (0, 1, 3), (0, 1, 4), (0, 1, 5), (0, 2, 3), (0, 2, 4), (0, 2, 5), (0, 3, 4), (0, 3, 5),
                      (0, 4, 5))]
    axial = [f["axial"] for f in fids]
    assert result["FID-A"] == pytest.approx({"median": np.median(axial), "min": min(axial), "max": max(axial)})
    assert split_half_fid(groups[:2], [1, 0]) == "not computed: fewer than 2 real volumes"
    eight = split_half_fid(groups + groups[:2], [3, 3, 2, 2, 2, 2, 2, 2])  # 35 splits: MAX_SPLITS drawn (seeded)
    assert eight["n_splits"] == 12 and eight == split_half_fid(groups + groups[:2], [3, 3, 2, 2, 2, 2, 2, 2])
    assert eight["n_volumes_per_half"] == [8, 10]
