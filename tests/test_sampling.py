"""Sampling end to end on a tiny trained run: sets, determinism, geometry, shards, counterfactuals, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from gem3d.data.slice_store import SliceStore
from gem3d.io import InputError, Volume, read_json, read_volume, write_volume
from gem3d.paths import Paths
from gem3d.sampling.counterfactual import counterfactual
from gem3d.sampling.sample_sets import merge_shards, sample_set
from gem3d.sampling.sets import set_names

pytestmark = pytest.mark.slow


def _arrays(folder):
    return {p.name: np.load(p)["image"] for p in sorted((folder / "slices").glob("*.npz"))}


def test_set_names_follow_config(in_run):
    names = set_names(in_run)
    assert names[0] == "baseline"
    for n in ("IC", "IC_MA", "IG", "IC_copy1", "deenhanced", "test_gem3d", "test_baseline", "test_no_overlap",
              "test_no_stage2"):
        assert n in names


def test_same_seed_same_volumes_and_geometry(in_run):
    cfg, paths = in_run, Paths(in_run)
    first = _arrays(sample_set(cfg, "IC"))
    again = _arrays(sample_set(cfg, "IC"))
    assert first.keys() == again.keys() and len(first) == len(SliceStore(paths.slices).case_ids("train"))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    out = merge_shards(cfg, "IC", 1)
    manifest = read_json(out / "manifest.json")
    assert read_json(out / "dataset.json")["numTraining"] == len(manifest["volumes"])
    for v in manifest["volumes"]:
        assert v["informed"]["source"] == "IC" and v["informed"]["case"] != v["source_case"]
        assert set(v["checkpoints"]) == {"vae", "volume_stage2"}
        real = read_volume(paths.raw_dataset / "imagesTr" / f"{v['source_case']}_0000.nii.gz")
        gen = read_volume(out / "imagesTr" / f"{v['sample_id']}_0000.nii.gz")
        assert gen.shape == real.shape  # original grid: no stretching, no identity affine
        np.testing.assert_allclose(gen.affine, real.affine)
        label = read_volume(out / "labelsTr" / f"{v['sample_id']}.nii.gz")
        original = read_volume(paths.raw_dataset / "labelsTr" / f"{v['source_case']}.nii.gz")
        np.testing.assert_array_equal(label.array, original.array)
        assert np.isfinite(gen.array).all() and gen.array.min() >= 0 and gen.array.max() <= 1
        # zero background exactly where the real image has it (nnU-Net's non-zero region)
        np.testing.assert_array_equal(gen.array == 0, real.array == 0)


def test_volume_does_not_depend_on_batching(in_run):
    """The manifest's seed alone reproduces a volume: one volume per batch gives the same images as
    the config's batches (up to float rounding of batched convolutions)."""
    import dataclasses

    cfg = in_run
    batched = _arrays(sample_set(cfg, "IG"))
    alone_cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, volumes_per_batch=1))
    alone = _arrays(sample_set(alone_cfg, "IG"))
    assert cfg.sampling.volumes_per_batch > 1 and batched.keys() == alone.keys()
    for k in batched:
        np.testing.assert_allclose(alone[k], batched[k], atol=2e-3)


def test_volume_shorter_than_the_window(in_run):
    """A mask with fewer slices than the window is generated whole (padded with outside-region slices
    that are dropped after), with values only where the mask says the region is."""
    from gem3d.sampling.generate import VolumeJob, VolumeSampler
    from gem3d.sampling.informed import InformedSpec

    cfg = in_run
    store = SliceStore(Paths(cfg).slices)
    case = store.load(store.case_ids("test")[0])
    short = case.label[: cfg.volume_model.window - 1].copy()
    sampler = VolumeSampler(cfg, "gem3d", 2)
    job = VolumeJob("short", case.case_id, short, 1, InformedSpec("true", case.case_id, 1), seed=5)
    image = sampler.generate([job])[0]
    assert image.shape == short.shape and np.isfinite(image).all()
    # the same as generating the mask padded by hand with one outside slice, cut back to its slices
    padded = np.concatenate([short, np.full((1, *short.shape[1:]), -1, dtype=short.dtype)])
    by_hand = sampler.generate([VolumeJob("padded", case.case_id, padded, 1, job.informed, seed=5)])[0]
    np.testing.assert_array_equal(image, by_hand[:-1])
    assert not (image[short >= 0] == -1).all()  # generated values inside the region


def test_stale_latent_cache_is_refused(in_run):
    from gem3d.io import write_json

    paths = Paths(in_run)
    index_path = paths.latents / "index.json"
    original = index_path.read_text()
    index = read_json(index_path)
    write_json(index_path, {**index, "vae_sha256": "0" * 64})
    try:
        with pytest.raises(InputError, match=r"index.json: made with another VAE than .*vae.pt"):
            sample_set(in_run, "test_gem3d")
    finally:
        index_path.write_text(original)


def test_shards_merge_into_one_set(in_run):
    cfg, paths = in_run, Paths(in_run)
    for shard in range(2):
        sample_set(cfg, "test_gem3d", shard, 2)
    out = merge_shards(cfg, "test_gem3d", 2)
    manifest = read_json(out / "manifest.json")
    test_ids = SliceStore(paths.slices).case_ids("test")
    assert sorted(v["source_case"] for v in manifest["volumes"]) == test_ids
    assert manifest["kind"] == "test_true"
    for v in manifest["volumes"]:
        assert v["informed"] == {"source": "true", "case": v["source_case"], "slice": v["start"]}


def test_augmented_set_records_and_keeps_geometry(in_run):
    cfg, paths = in_run, Paths(in_run)
    sample_set(cfg, "IC_MA")
    out = merge_shards(cfg, "IC_MA", 1)
    manifest = read_json(out / "manifest.json")
    changed = 0
    for v in manifest["volumes"]:
        aug = v["augmentation"]
        assert {"flipped", "rotation_deg", "seed"} <= set(aug) and aug["seed"] == v["seed"]
        label = read_volume(out / "labelsTr" / f"{v['sample_id']}.nii.gz")
        original = read_volume(paths.raw_dataset / "labelsTr" / f"{v['source_case']}.nii.gz")
        assert label.shape == original.shape
        np.testing.assert_allclose(label.affine, original.affine)
        assert set(np.unique(label.array)) <= set(cfg.data.labels.values())
        changed += int(not np.array_equal(label.array, original.array))
    assert changed > 0


def test_ig_and_deenhanced_sets(in_run):
    cfg = in_run
    ig = read_json(sample_set(cfg, "IG") / "manifest.json")
    assert all(v["informed"]["source"] == "IG" and 0 <= v["informed"]["position"] <= 1 for v in ig["volumes"])
    assert all("slice_model" in v["checkpoints"] for v in ig["volumes"])
    de = read_json(sample_set(cfg, "deenhanced") / "manifest.json")
    informed = {(v["informed"]["case"], v["informed"]["slice"]) for v in de["volumes"]}
    assert len(informed) == 1  # one fixed informed slice for the whole dataset


def test_baseline_and_ablation_sets(in_run):
    cfg = in_run
    base = read_json(sample_set(cfg, "baseline") / "manifest.json")
    assert all(v["variant"] == "baseline" and v["informed"] == {"source": "none"} for v in base["volumes"])
    nost2 = read_json(sample_set(cfg, "test_no_stage2") / "manifest.json")
    assert all(v["stage"] == 1 and "volume_stage1" in v["checkpoints"] for v in nost2["volumes"])
    nooi = read_json(sample_set(cfg, "test_no_overlap") / "manifest.json")
    assert all(v["pin"] is False for v in nooi["volumes"])


def _case_label(cfg):
    paths = Paths(cfg)
    case = SliceStore(paths.slices).case_ids("train")[0]
    return case, read_volume(paths.raw_dataset / "labelsTr" / f"{case}.nii.gz")


def test_counterfactual_keeps_mask_geometry(in_run, tmp_path):
    """... and names the case it was edited on, not the first case on the same grid (found in review: the tiny
    run's phantoms share one grid, and an edit of a later case took the first case's body and name)."""
    cfg = in_run
    store = SliceStore(Paths(cfg).slices)
    case = store.case_ids("train")[-1]
    assert case != next(iter(store.index["cases"]))
    assert all(g["affine"] == store.index["cases"][case]["affine"] for g in store.index["cases"].values())
    label = read_volume(Paths(cfg).raw_dataset / "labelsTr" / f"{case}.nii.gz")
    edited = label.array.copy()
    edited[edited == 3] = 1  # turn enhancing tumour into necrotic core
    mask_path = tmp_path / "edited.nii.gz"
    write_volume(mask_path, Volume(edited, label.affine), np.uint8)
    other = SliceStore(Paths(cfg).slices).case_ids("train")[1]
    out = counterfactual(cfg, mask_path, f"{other}:3", tmp_path / "cf.nii.gz", seed=1)
    gen = read_volume(out)
    assert gen.shape == label.shape
    np.testing.assert_allclose(gen.affine, label.affine)
    record = read_json(tmp_path / "cf.json")
    assert record["informed"] == {"source": "fixed", "case": other, "slice": 3}
    assert record["grid_of_case"] == case and case in record["region"]


def test_counterfactual_edit_outside_the_body_scores_its_informed_slice_on_its_own_crop(in_run, tmp_path):
    """Found in review: a label drawn outside the case's body grows nnU-Net's crop, but the informed slice's fit was
    scored on the case's body outline, slices apart, and a start slice past the case's depth ended in a traceback."""
    cfg = in_run
    store = SliceStore(Paths(cfg).slices)
    case, other = store.case_ids("train")[:2]
    image = read_volume(Paths(cfg).raw_dataset / "imagesTr" / f"{case}_0000.nii.gz").array
    label = read_volume(Paths(cfg).raw_dataset / "labelsTr" / f"{case}.nii.gz")
    empty = [k for k in range(image.shape[2]) if not image[:, :, k].any()]  # axial slices outside the head
    assert empty, "the phantom fills every axial slice"
    edited = label.array.copy()
    edited[10:14, 10:14, empty[0]] = 2  # a label where the case has no body
    mask_path = tmp_path / "outside.nii.gz"
    write_volume(mask_path, Volume(edited, label.affine), np.uint8)
    depth = store.load(case).label.shape[0]  # the case's own crop depth: one past its last slice
    out = counterfactual(cfg, mask_path, f"{other}:3", tmp_path / "cf.nii.gz", seed=1, start=depth)
    record = read_json(tmp_path / "cf.json")
    assert record["start"] == depth and record["fit"] is not None and read_volume(out).shape == label.shape


def test_counterfactual_with_a_user_informed_image(in_run, tmp_path):
    """A 3D NIfTI (another case's scan) or a 2D one as the informed slice: the output keeps the mask's geometry,
    the manifest records the file and slice, and the image steers the result."""
    cfg, paths = in_run, Paths(in_run)
    case, label = _case_label(cfg)
    mask_path = tmp_path / "mask.nii.gz"
    write_volume(mask_path, label, np.uint8)
    other = SliceStore(paths.slices).case_ids("train")[1]
    scan = read_volume(paths.raw_dataset / "imagesTr" / f"{other}_0000.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    write_volume(flat, Volume(scan.array[:, :, 5:6] * 0 + 1.0, scan.affine))  # a 2D image of one value
    outs = {}
    for name, image, index in (("scan", paths.raw_dataset / "imagesTr" / f"{other}_0000.nii.gz", "10"),
                               ("flat", flat, "")):
        out = counterfactual(cfg, mask_path, index, tmp_path / f"{name}.nii.gz", seed=1, informed_image=image)
        gen = read_volume(out)
        assert gen.shape == label.shape and np.isfinite(gen.array).all()
        np.testing.assert_allclose(gen.affine, label.affine)
        informed = read_json(tmp_path / f"{name}.json")["informed"]
        assert informed["source"] == "user" and informed["path"] == str(image)
        outs[name] = gen.array
    assert not np.allclose(outs["scan"], outs["flat"])


def test_user_informed_image_is_scaled_like_a_training_volume(tmp_path):
    """Min-max over the non-zero voxels of the whole file (not the slice); CT clipped to the dataset's
    foreground percentiles first."""
    from gem3d.sampling.informed import user_slice_latent

    class Identity:  # stands in for the VAE: returns the slice it would encode
        def encode(self, x):
            return x  # (1, 1, s, s): the caller keeps [0]

    volume = np.zeros((8, 8, 4), np.float32)
    volume[2:6, 2:6, :] = np.arange(4, dtype=np.float32) * 10 + 10  # slice k holds the value 10 k + 10
    path = tmp_path / "vol.nii.gz"
    write_volume(path, Volume(volume, np.eye(4)))
    z = user_slice_latent(path, 1, 8, Identity())  # (1, 8, 8)
    inside = z[0][2:6, 2:6]
    assert float(inside.min()) == pytest.approx((20 - 10) / 30 * 2 - 1)  # the volume's range, not the slice's
    assert float(z.min()) == -1.0
    ct = {"scheme": "CTNormalization", "properties": {"percentile_00_5": 15.0, "percentile_99_5": 30.0}}
    z = user_slice_latent(path, 3, 8, Identity(), ct)  # 40 clipped to 30, the top of the clipped range
    assert float(z[0][2:6, 2:6].min()) == pytest.approx(1.0)


def test_user_informed_image_follows_the_stores_fit_and_intensity(tmp_path):
    """A store made like the authors' release (slice_fit stretch, intensity volume) gets user slices made the same
    way: a non-square slice stretched to the square (no letterbox rows of -1), min-max over every voxel."""
    from gem3d.sampling.informed import user_slice

    volume = np.zeros((16, 8, 3), np.float32)  # (x, y, z): 16 columns, 8 rows
    volume[2:, :, :] = 10.0  # two columns of 0 (outside the anatomy), 10 around a block of 40
    volume[4:12, 2:6, :] = 40.0
    path = tmp_path / "wide.nii.gz"
    write_volume(path, Volume(volume, np.eye(4)))
    boxed = user_slice(path, 1, 16)[0, 0]
    stretched = user_slice(path, 1, 16, fit="stretch")[0, 0]
    bright_rows = lambda x: int((x > 0.5).any(dim=1).sum())  # noqa: E731  rows crossing the 40-valued block
    assert bright_rows(boxed) == 4 and bright_rows(stretched) >= 6  # 4 of 8 rows; stretched twice as tall (edges blur)
    assert float(stretched[1, 8]) == pytest.approx(-1.0)  # 10: the minimum of the non-zero voxels
    whole = user_slice(path, 1, 16, fit="stretch", intensity="volume")[0, 0]
    assert float(whole[1, 8]) == pytest.approx(10 / 40 * 2 - 1, abs=1e-3)  # the file's minimum is 0 now
    assert float(whole.max()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("problem", ["label", "geometry", "slice", "checkpoint"])
def test_counterfactual_bad_input(in_run, tmp_path, problem):
    cfg = in_run
    case, label = _case_label(cfg)
    arr, affine, informed = label.array.copy(), label.affine.copy(), f"{case}:2"
    if problem == "label":
        arr[0, 0, 0] = 9
    if problem == "geometry":
        arr = arr[:-3]
    if problem == "slice":
        informed = f"{case}:999"
    mask_path = tmp_path / "m.nii.gz"
    write_volume(mask_path, Volume(arr, affine), np.uint8)
    model = Paths(cfg).model("volume_stage2")
    moved = model.with_suffix(".moved")
    if problem == "checkpoint":
        model.rename(moved)
    out = tmp_path / "cf.nii.gz"
    try:
        with pytest.raises(InputError) as err:
            counterfactual(cfg, mask_path, informed, out)
    finally:
        if problem == "checkpoint":
            moved.rename(model)
    words = {"label": "outside the trained set", "geometry": "match no case", "slice": "outside the volume",
             "checkpoint": "checkpoint not found"}[problem]
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_swapped_checkpoint_is_refused(in_run, tmp_path):
    import shutil

    cfg, paths = in_run, Paths(in_run)
    model = paths.model("volume_stage2")
    backup = tmp_path / "v2.pt"
    shutil.copyfile(model, backup)
    shutil.copyfile(paths.model("baseline_stage2"), model)
    try:
        with pytest.raises(InputError, match=r"volume_stage2.pt: checkpoint is a baseline_stage2 model"):
            sample_set(cfg, "test_gem3d")
    finally:
        shutil.copyfile(backup, model)


def test_sampling_logs_progress_with_speed_and_eta(in_run, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="gem3d.sampling")
    sample_set(in_run, "IC")  # 4 training masks in batches of 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generated ")]
    assert len(lines) == 2 and "generated 2/4 volumes" in lines[0] and "s per volume, eta " in lines[0], lines
    assert lines[-1].endswith("eta 0s)")


def test_format_duration():
    from gem3d.sampling.generate import format_duration

    assert [format_duration(s) for s in (12.4, 185, 7620)] == ["12s", "3m05s", "2h07m"]
