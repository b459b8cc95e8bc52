"""Mask augmentation: determinism, per-axis translation (defect 2), rotation, clipping, abdomen, the
left-right-only flip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA
from gem3d.sampling.augment import (
    LEFT_RIGHT_AXIS,
    augment_mask,
    left_right_axis,
    rotate_nearest,
    rotation_matrix,
    transform_region,
    tumour_shift,
)

SHAPE = (64, 48, 40)  # asymmetric (x, y, z) so axis swaps show
CENTRE = (np.array(SHAPE) - 1) / 2  # (31.5, 23.5, 19.5)
NO_RIGID = dict(flip=False, max_rotation_deg=0.0)


def _grid():
    return np.indices(SHAPE, dtype=np.float64)


def brain_mask(tumour_offset=(15, -10, 0), radii=(5, 3, 1.5), semi=(29, 21, 17)) -> np.ndarray:
    """Ellipsoid brain (0) with -1 outside, nested tumour (2 oedema, 3 rim, 1 centre) at offset."""
    g = _grid() - CENTRE[:, None, None, None]
    lab = np.full(SHAPE, -1, dtype=np.int16)
    lab[((g / np.array(semi)[:, None, None, None]) ** 2).sum(0) < 1] = 0
    r = np.sqrt(((g - np.array(tumour_offset, dtype=float)[:, None, None, None]) ** 2).sum(0))
    for value, radius in zip((2, 3, 1), radii):
        lab[r < radius] = value
    return lab


def _centroid(lab, labels=(1, 2, 3)):
    return np.argwhere(np.isin(lab, labels)).mean(axis=0)


def test_seeded_determinism():
    lab = brain_mask()
    a, pa = augment_mask(lab, np.random.default_rng(5), seed=5)
    b, pb = augment_mask(lab, np.random.default_rng(5), seed=5)
    assert np.array_equal(a, b) and pa == pb and pa["seed"] == 5
    others = [augment_mask(lab, np.random.default_rng(s))[0] for s in (6, 7)]
    assert any(not np.array_equal(a, o) for o in others)
    json.dumps(pa)  # JSON-able
    assert all(type(v) in (float, int) for v in pa["rotation_deg"] + pa["translation_vox"])


@pytest.mark.parametrize("distance", [6.0, 12.0, 40.0])
def test_translation_toward_centre_per_axis(distance):
    """Catches an axis swap: x must move -, y must move +, z must not move; no overshoot."""
    lab = brain_mask(tumour_offset=(15, -10, 0))
    before = _centroid(lab) - CENTRE
    np.testing.assert_allclose(before, (15, -10, 0), atol=1e-9)
    rng = np.random.default_rng(0)
    out, params = augment_mask(lab, rng, translate_range=(distance, distance), **NO_RIGID)
    after = _centroid(out) - CENTRE
    shift = np.array(params["translation_vox"])
    np.testing.assert_allclose(after, before + shift, atol=1e-9)  # rigid: whole tumour moved by shift
    assert shift[0] < 0 and shift[1] > 0 and shift[2] == 0
    assert abs(after[0]) < abs(before[0]) and abs(after[1]) < abs(before[1]) and after[2] == 0
    assert np.all(np.sign(after) * np.sign(before) >= 0)  # never past the centre
    expected = -before / np.linalg.norm(before) * min(distance, np.linalg.norm(before))
    np.testing.assert_allclose(shift, expected, atol=0.5 + 1e-9)
    if distance >= np.linalg.norm(before):
        np.testing.assert_allclose(after, 0, atol=1e-9)  # capped: lands on the centre


def test_translation_other_octant_and_z():
    lab = brain_mask(tumour_offset=(-12, 0, 8), radii=(4, 2.5, 1.2))
    before = _centroid(lab) - CENTRE
    out, p = augment_mask(lab, np.random.default_rng(1), translate_range=(5, 5), **NO_RIGID)
    after = _centroid(out) - CENTRE
    assert after[0] > before[0] and after[1] == before[1] == 0 and after[2] < before[2]
    assert p["translation_vox"] == [4, 0, -3]  # (12, 0, -8)/|.| * 5 = (4.16, 0, -2.77)


def test_nested_structure_moves_rigidly_and_old_place_is_healthy():
    lab = brain_mask()
    out, p = augment_mask(lab, np.random.default_rng(0), translate_range=(10, 10), **NO_RIGID)
    s = p["translation_vox"]
    src = tuple(slice(max(0, -d), n - max(0, d)) for n, d in zip(SHAPE, s))
    dst = tuple(slice(max(0, d), n - max(0, -d)) for n, d in zip(SHAPE, s))
    tum = np.isin(lab, (1, 2, 3))
    moved = np.zeros_like(lab)
    moved[dst] = np.where(tum, lab, 0)[src]
    assert np.array_equal(out[moved > 0], moved[moved > 0])
    old_only = tum & (moved == 0)
    assert np.all(out[old_only] == 0)  # healthy brain
    assert np.array_equal(out == -1, lab == -1)  # no rotation: region unchanged
    for v in (1, 2, 3):
        assert (out == v).sum() == (lab == v).sum()
    assert p["tumour_voxels_clipped"] == 0


def test_rotation_small_change_and_labels_preserved():
    lab = brain_mask()
    for seed in range(3):
        out, p = augment_mask(lab, np.random.default_rng(seed), flip=False, translate_range=(0, 0))
        assert all(abs(a) <= 2.5 for a in p["rotation_deg"])
        assert set(np.unique(out)) == set(np.unique(lab))
        assert (out != lab).mean() < 0.06
        # the -1 outside region rotated with the mask: roughly the same size, corners still outside
        assert abs((out == -1).sum() - (lab == -1).sum()) < 0.02 * lab.size
        assert out[0, 0, 0] == out[-1, -1, -1] == -1


def test_rotation_matrix_and_nearest_rotation():
    r = rotation_matrix([1.0, -2.0, 2.5])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    arr = np.random.default_rng(0).integers(0, 5, size=(10, 10, 6)).astype(np.int16)
    rot = rotate_nearest(arr, [0, 0, 90])
    assert any(np.array_equal(rot, np.rot90(arr, k, axes=(0, 1))) for k in (1, -1))
    assert np.array_equal(rotate_nearest(arr, [0, 0, 0]), arr)


def test_tumour_never_leaves_region():
    # tumour close to the brain edge, big translations, flips and rotations
    lab = brain_mask(tumour_offset=(24, -14, 9), radii=(6, 3, 1.5))
    for seed in range(6):
        out, p = augment_mask(lab, np.random.default_rng(seed), translate_range=(20, 60))
        region = lab >= 0
        for axis, f in enumerate(p["flipped"]):
            region = np.flip(region, axis) if f else region
        region = rotate_nearest(np.ascontiguousarray(region), p["rotation_deg"]).astype(bool)
        assert np.array_equal(out >= 0, region)
        assert set(np.unique(out)) <= set(np.unique(lab))
        assert np.all(region[np.isin(out, (1, 2, 3))])


def test_transform_region_moves_a_body_outline_as_the_mask_moved():
    """The fit guard's mask-side outline of an augmented mask (issue #24.2): a region replayed through the
    augmentation's flips and rotation is the augmented mask's region, on an anisotropic grid too."""
    lab = brain_mask(tumour_offset=(24, -14, 9), radii=(6, 3, 1.5))
    spacing = (1.0, 0.8, 2.5)
    for seed in range(4):
        out, params = augment_mask(lab, np.random.default_rng(seed), spacing=spacing, max_rotation_deg=5.0)
        assert np.array_equal(transform_region(lab >= 0, params, spacing), out >= 0), seed
    out, params = augment_mask(lab.clip(0, None), np.random.default_rng(1), mode="abdomen", spacing=spacing)
    moved = transform_region(lab >= 0, params, spacing)
    assert moved.dtype == bool and not np.array_equal(moved, lab >= 0)  # rotated, the corners new air


def test_explicit_region_mask_clips():
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[50:56, 10:14, 18:22] = 2
    lab[52:54, 11:13, 19:21] = 1
    region = np.zeros(SHAPE, dtype=bool)
    region[32:, :, :] = True  # the tumour lands on the centre (x 29..34): half leaves the region
    rng = np.random.default_rng(0)
    out, p = augment_mask(lab, rng, region_mask=region, translate_range=(25, 25), **NO_RIGID)
    assert out.dtype == np.uint8
    assert np.all(region[out > 0]) and (out > 0).any()
    assert p["tumour_voxels_clipped"] > 0
    assert (out > 0).sum() == (lab > 0).sum() - p["tumour_voxels_clipped"]


def test_abdomen_never_translates():
    lab = np.full(SHAPE, -1, dtype=np.int16)
    lab[8:56, 6:42, 4:36] = 0
    lab[40:50, 10:20, 10:20] = 1  # liver-ish, off-centre
    lab[14:20, 30:36, 22:28] = 3
    for seed in range(4):
        out, p = augment_mask(lab, np.random.default_rng(seed), mode="abdomen")
        assert p["translation_vox"] == [0, 0, 0] and "translate_drawn_vox" not in p
        ref = rotate_nearest(lab, p["rotation_deg"], cval=-1)
        assert np.array_equal(out, ref)
    out, _ = augment_mask(lab, np.random.default_rng(0), mode="abdomen", **NO_RIGID)
    assert np.array_equal(out, lab)


def test_abdomen_never_flips():
    lab = np.zeros(SHAPE, dtype=np.int16)
    lab[40:50, 10:20, 10:20] = 1
    for seed in range(6):
        out, p = augment_mask(lab, np.random.default_rng(seed), mode="abdomen", flip_axes=(0, 1, 2),
                              max_rotation_deg=0)
        assert p["flipped"] == [False, False, False] and p["flip_axes"] == []
        assert np.array_equal(out, lab)


def test_rotation_is_physical_on_anisotropic_grids():
    """A rod along axis 1, rotated 20 degrees about axis 2 on a 2.5 x 1 x 1 mm grid, turns 20
    degrees in mm (a rotation in voxel units would turn it about 42 degrees in mm)."""
    spacing = (2.5, 1.0, 1.0)
    arr = np.zeros((41, 81, 5), dtype=np.int16)
    arr[20, :, 2] = 1

    def angle_mm(a):
        pts = np.argwhere(a == 1) * np.array(spacing)
        pts -= pts.mean(axis=0)
        direction = np.linalg.svd(pts, full_matrices=False)[2][0]
        return np.degrees(np.arccos(min(abs(direction[1]), 1.0)))

    assert angle_mm(arr) == pytest.approx(0.0, abs=1e-6)
    assert angle_mm(rotate_nearest(arr, [0, 0, 20], spacing=spacing)) == pytest.approx(20.0, abs=1.5)
    assert angle_mm(rotate_nearest(arr, [0, 0, 20])) == pytest.approx(42.3, abs=2.0)
    out, p = augment_mask(arr, np.random.default_rng(0), mode="abdomen", spacing=spacing)
    assert "in mm (spacing [2.5, 1.0, 1.0])" in p["rotation_order"]
    with pytest.raises(ValueError, match="spacing"):
        augment_mask(arr, np.random.default_rng(0), mode="abdomen", spacing=(1.0, 0.0, 1.0))


def test_flip_axes_parameter():
    lab = brain_mask()
    seen = set()
    for seed in range(8):
        out, p = augment_mask(lab, np.random.default_rng(seed), flip_axes=(2,), max_rotation_deg=0,
                              translate_range=(0, 0))
        assert p["flipped"][:2] == [False, False]
        seen.add(p["flipped"][2])
        assert np.array_equal(out, lab[:, :, ::-1] if p["flipped"][2] else lab)
    assert seen == {True, False}


def test_default_flip_keeps_slice_axis_and_front_back_profiles():
    """Only the left-right axis flips: with no rotation and no tumour move, the label voxels per slice
    (axis 0) and per front-back row (axis 1) are unchanged, while some seeds do flip (the old "3D
    flip" default turned half the masks upside down, reversing the slice profile)."""
    lab = brain_mask(tumour_offset=(15, -10, 6))  # off-centre on every axis: any flip shows
    profile = [(lab > 0).sum(axis=(1, 2)), (lab > 0).sum(axis=(0, 2))]
    assert not np.array_equal(profile[0], profile[0][::-1])  # a slice-axis flip would change it
    flipped = 0
    for seed in range(8):
        out, p = augment_mask(lab, np.random.default_rng(seed), max_rotation_deg=0, translate_range=(0, 0))
        assert p["flip_axes"] == [LEFT_RIGHT_AXIS]
        np.testing.assert_array_equal((out > 0).sum(axis=(1, 2)), profile[0])
        np.testing.assert_array_equal((out > 0).sum(axis=(0, 2)), profile[1])
        flipped += p["flipped"][LEFT_RIGHT_AXIS]
        assert (not np.array_equal(out, lab)) == p["flipped"][LEFT_RIGHT_AXIS]  # changed exactly when flipped
    assert 0 < flipped < 8


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1, 2)])
def test_slice_axis_and_front_back_flips_are_refused(axes):
    with pytest.raises(ValueError, match="only the left-right axis 2"):
        augment_mask(brain_mask(), np.random.default_rng(0), flip_axes=axes)


def test_left_right_axis_from_geometry():
    """BraTS (LPS affine, nnU-Net's identity transpose for 1 mm isotropic data): axis 2 of the (z, y, x)
    arrays is the NIfTI's first axis, left-right. A sagittal acquisition transposed with x first
    puts left-right on axis 0."""
    lps = [[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    assert left_right_axis({"affine": lps, "transpose_backward": [0, 1, 2]}) == 2
    assert left_right_axis({"affine": lps, "transpose_backward": [1, 2, 0]}) == 0  # forward [2, 0, 1]
    oblique = np.eye(4)
    oblique[:3, :3] = rotation_matrix([0.0, 0.0, 20.0])  # 20 degrees in-plane: still mostly left-right
    assert left_right_axis({"affine": oblique.tolist(), "transpose_backward": [0, 1, 2]}) == 2


@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"shared real data not found at {SHARED_DATA}")
def test_left_right_axis_of_real_brats_case():
    """A real BraTS case: its brain is mirror-symmetric along the axis found (and less so along the others)."""
    from gem3d.io import read_volume

    case = SHARED_DATA / "BraTS2015_deepmedic" / "brats_2013_pat0001_1"
    brain = read_volume(case / "brainmask.nii.gz")
    axis = left_right_axis({"affine": brain.affine.tolist(), "transpose_backward": [0, 1, 2]})
    assert axis == LEFT_RIGHT_AXIS
    zyx = brain.array.transpose(2, 1, 0) > 0.5  # SimpleITK's (z, y, x) order = the slice store's here
    mirror = [np.corrcoef(zyx.sum(axis=tuple(i for i in range(3) if i != a)),
                          zyx.sum(axis=tuple(i for i in range(3) if i != a))[::-1])[0, 1] for a in range(3)]
    assert mirror[axis] > 0.99 and mirror[1] < 0.9  # left-right symmetric; front-back is not


def test_tumour_shift_no_overshoot_half_voxel():
    t = np.zeros((8, 8, 8), dtype=bool)
    t[4, 4, 4] = True  # centre 3.5: 0.5 voxel off on every axis; rounding must not jump past it
    shift, _, _, _ = tumour_shift(t, 10.0)
    assert shift.tolist() == [0, 0, 0]


def test_phantom_mask_round_trip():
    from gem3d.data.phantoms import _scanner_params, synthesise_case

    _, seg, _ = synthesise_case(0, 0, (48, 48, 40), (1.0, 1.0, 1.0), _scanner_params(0, 0))
    out, p = augment_mask(seg, np.random.default_rng(0), tumour_labels=(1, 2, 4), flip_axes=(2,))
    assert set(np.unique(out)) <= {0, 1, 2, 4}
    with pytest.raises(ValueError, match="tumour_labels"):
        augment_mask(seg, np.random.default_rng(0))  # label 4 would be left behind


def test_bad_arguments():
    lab = brain_mask()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="mode"):
        augment_mask(lab, rng, mode="lung")
    with pytest.raises(ValueError, match="integer"):
        augment_mask(lab.astype(float), rng)
    with pytest.raises(ValueError, match="translate_range"):
        augment_mask(lab, rng, translate_range=(60, 20))
    with pytest.raises(ValueError, match="flip_axes"):
        augment_mask(lab, rng, flip_axes=(3,))
    with pytest.raises(ValueError, match="region_mask"):
        augment_mask(lab, rng, region_mask=np.ones((2, 2, 2), bool))
