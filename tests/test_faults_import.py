"""Fault corpus, import: each test builds one bad input (or a full disk), runs `gem3d import` in-process
and checks the one-line error naming the file, the absence of a traceback, and what is left on disk."""

from __future__ import annotations

import errno
import json
import gzip
import shutil
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import SHARED_DATA, assert_one_error, make_case, write_folder_dataset
from gem3d.cli import main
from gem3d.data.importers import BRATS_LABELS
from gem3d.io import InputError, Volume, atomic_dir, read_json, read_volume, write_volume

FOLDER_LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}  # 1..3: the default augmentation.tumour_labels
DATASET = "results/t/nnunet/raw/Dataset901_t"  # preprocess.dataset_id 901 below


def run_import(tmp, capsys, data_path, fmt="folder", labels=FOLDER_LABELS, **data):
    """`gem3d import` on a config for `data_path`; returns (rc, stderr)."""
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "preprocess": {"dataset_id": 901},
                                      "data": {"format": fmt, "path": str(data_path), "labels": labels, **data}}))
    capsys.readouterr()
    rc = main(["import", "--config", str(config)])
    return rc, capsys.readouterr().err


def files_under(root) -> dict:
    """Every file under `root` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def write_with_header(path, array, srows, dtype=np.float32):
    """A NIfTI whose sform rows are written as given (NaN or singular ones included), qform unset."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srows
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype), None, header=hdr), str(path))


CASE1 = ("images/case01.nii.gz", "masks/case01.nii.gz")
NAN_ROWS = ([1, 0, 0, np.nan], [0, 1, 0, 0], [0, 0, 1.5, 0])
SINGULAR_ROWS = ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0])


def _bad_geometry(root, kind):
    image, mask = read_volume(root / CASE1[0]), read_volume(root / CASE1[1])
    if kind == "nan_mask_affine":
        write_with_header(root / CASE1[1], mask.array, NAN_ROWS, np.uint8)
        return root / CASE1[1], "NaN"
    rows = NAN_ROWS if kind == "nan_affines" else SINGULAR_ROWS
    write_with_header(root / CASE1[0], image.array, rows)
    write_with_header(root / CASE1[1], mask.array, rows, np.uint8)
    return root / CASE1[0], "NaN" if kind == "nan_affines" else "singular"


def _bad_voxels(root, kind):
    image = read_volume(root / CASE1[0])
    path = root / CASE1[0]
    if kind == "rgb":
        rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["G"] = np.clip(image.array, 0, 255)
        nib.save(nib.Nifti1Image(rgb, image.affine), str(path))
        return path, "RGB"
    if kind == "vector":  # (x, y, z, 1, 3): a displacement field or RGB stored as a 5D vector
        nib.save(nib.Nifti1Image(np.stack([image.array] * 3, -1)[:, :, :, None], image.affine), str(path))
        return path, "vector or RGB"
    if kind == "all_zero":
        write_volume(path, Volume(np.zeros_like(image.array), image.affine))
        return path, "one value 0 everywhere"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan_mask_affine", "nan_affines", "singular_affines", "rgb", "vector", "all_zero"])
def test_bad_case_file_is_one_line_and_writes_nothing(in_tmp, capsys, kind):
    root = write_folder_dataset(in_tmp / "data")
    bad, words = (_bad_geometry if "affine" in kind else _bad_voxels)(root, kind)
    rc, err = run_import(in_tmp, capsys, root)
    assert_one_error(rc, err, bad, words)
    assert files_under(in_tmp / "results") == {}


def test_header_claiming_more_than_the_file_holds_is_refused_before_loading(in_tmp, capsys):
    """A 4 KB .nii.gz whose header says 1500^3 float32 (13.5 GB): refused from the sizes alone."""
    root = write_folder_dataset(in_tmp / "data")
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((1500, 1500, 1500))
    hdr.set_sform(np.eye(4), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + np.ones(900, np.float32).tobytes()
    bad = root / CASE1[0]
    bad.write_bytes(gzip.compress(raw))
    assert bad.stat().st_size < 4096
    tracemalloc.start()
    rc, err = run_import(in_tmp, capsys, root)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert_one_error(rc, err, bad, "header claims 1500x1500x1500 float32", "13.5 GB")
    assert peak < 200e6  # nothing near the claimed size was allocated
    assert files_under(in_tmp / "results") == {}


def test_truncated_uncompressed_nifti_is_refused(in_tmp, capsys):
    root = write_folder_dataset(in_tmp / "data")
    image = read_volume(root / CASE1[0])
    (root / CASE1[0]).unlink()
    bad = root / "images" / "case01.nii"
    nib.save(nib.Nifti1Image(image.array, image.affine), str(bad))
    bad.write_bytes(bad.read_bytes()[:-100])
    shutil.move(root / CASE1[1], root / "masks" / "case01.nii")
    rc, err = run_import(in_tmp, capsys, root, image_glob="images/*.nii*")
    assert_one_error(rc, err, bad, "but the file holds")
    assert files_under(in_tmp / "results") == {}


def test_multi_member_gzip_is_read(in_tmp, capsys):
    """A valid .nii.gz in two gzip members (as pigz/bgzip write them): its trailer counts only the last
    member, so the size check counts the stream instead, and the case imports."""
    root = write_folder_dataset(in_tmp / "data")
    raw = gzip.decompress((root / CASE1[0]).read_bytes())
    (root / CASE1[0]).write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    rc, err = run_import(in_tmp, capsys, root)
    assert rc == 0, err
    imported = read_volume(in_tmp / DATASET / "imagesTr" / "case01_0000.nii.gz")
    np.testing.assert_array_equal(imported.array, read_volume(root / CASE1[0]).array)


def test_brats_brain_mask_off_the_image_grid_is_refused(in_tmp, capsys):
    root = in_tmp / "brats"
    for i in range(3):
        image, mask = make_case(seed=i, labels=(1, 2, 4))
        write_volume(root / f"case{i}" / f"BraTS_{i}_flair.nii.gz", image)
        write_volume(root / f"case{i}" / f"BraTS_{i}_seg.nii.gz", mask, np.uint8)
        shifted = image.affine.copy()
        shifted[0, 3] += 30.0 if i == 1 else 0.0  # case1's brain mask 30 mm off
        write_volume(root / f"case{i}" / "brainmask.nii.gz", Volume((image.array > 0).astype(np.uint8), shifted))
    rc, err = run_import(in_tmp, capsys, root, "brats", BRATS_LABELS)
    assert_one_error(rc, err, root / "case1" / "brainmask.nii.gz", "brain mask affine differs", "by 30")
    assert files_under(in_tmp / "results") == {}


@pytest.mark.parametrize("role", ["flair", "seg"])
def test_two_candidate_files_in_a_case_folder_are_refused(in_tmp, capsys, role):
    root = in_tmp / "brats"
    for i in range(3):
        image, mask = make_case(seed=i, labels=(1, 2, 4))
        write_volume(root / f"case{i}" / f"BraTS_{i}_flair.nii.gz", image)
        write_volume(root / f"case{i}" / f"BraTS_{i}_seg.nii.gz", mask, np.uint8)
    extra = {"flair": ("Flair_subtrMeanDivStd.nii.gz", image), "seg": ("OTMultiClass.nii.gz", mask)}[role]
    write_volume(root / "case2" / extra[0], extra[1])
    rc, err = run_import(in_tmp, capsys, root, "brats", BRATS_LABELS)
    first = f"BraTS_2_{role}.nii.gz"
    assert_one_error(rc, err, root / "case2", "2 files", first, extra[0])
    assert files_under(in_tmp / "results") == {}


def test_mask_without_image_is_refused_or_reported(in_tmp, capsys):
    root = write_folder_dataset(in_tmp / "data")
    (root / CASE1[0]).unlink()
    rc, err = run_import(in_tmp, capsys, root)
    assert_one_error(rc, err, root / CASE1[1], "no image for this mask")
    assert files_under(in_tmp / "results") == {}
    rc, err = run_import(in_tmp, capsys, root, on_bad_case="skip")
    assert rc == 0, err
    skipped = read_json(in_tmp / "results/t/import_report.json")["skipped"]
    assert [s["case"] for s in skipped] == ["case01"] and "no image for this mask" in skipped[0]["reason"]


def test_msd_label_without_image_is_refused(in_tmp, capsys):
    root = in_tmp / "Task99"
    for i in range(3):
        image, mask = make_case(seed=i)
        write_volume(root / "imagesTr" / f"hip_{i:03d}.nii.gz", image)
        write_volume(root / "labelsTr" / f"hip_{i:03d}.nii.gz", mask, np.uint8)
    write_volume(root / "labelsTr" / "hip_009.nii.gz", mask, np.uint8)
    rc, err = run_import(in_tmp, capsys, root, "msd")
    assert_one_error(rc, err, root / "labelsTr" / "hip_009.nii.gz", "no image for this mask")


def test_two_files_for_one_msd_case_are_refused(in_tmp, capsys):
    root = in_tmp / "Task99"
    for i in range(3):
        image, mask = make_case(seed=i)
        write_volume(root / "imagesTr" / f"hip_{i:03d}.nii.gz", image)
        write_volume(root / "labelsTr" / f"hip_{i:03d}.nii.gz", mask, np.uint8)
    nib.save(nib.Nifti1Image(image.array, image.affine), str(root / "imagesTr" / "hip_002.nii"))
    rc, err = run_import(in_tmp, capsys, root, "msd")
    assert_one_error(rc, err, root / "imagesTr" / "hip_002.nii", root / "imagesTr" / "hip_002.nii.gz", "keep one")
    assert files_under(in_tmp / "results") == {}


class DiskFull:
    """Stands in for nibabel.save: writes half a file, then fails like a full disk on call `at`."""

    def __init__(self, at: int):
        self.at, self.calls, self.save = at, 0, nib.save

    def __call__(self, img, filename):
        self.calls += 1
        if self.calls == self.at:
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.save(img, filename)


def test_disk_full_during_import_is_one_line_and_writes_nothing(in_tmp, capsys, monkeypatch):
    root = write_folder_dataset(in_tmp / "data")
    monkeypatch.setattr(nib, "save", DiskFull(at=3))  # case00's image and label, then case01's image
    rc, err = run_import(in_tmp, capsys, root)
    assert_one_error(rc, err, "no space left on device while writing",
                     f"{DATASET}/imagesTr/case01_0000.nii.gz")
    assert ".tmp" not in err.strip().splitlines()[-1]
    assert files_under(in_tmp / "results") == {}


def test_disk_full_before_the_first_byte_is_one_line(in_tmp, capsys, monkeypatch):
    """The disk is already full: creating the temporary dataset folder fails."""
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    root = write_folder_dataset(in_tmp / "data")
    monkeypatch.setattr(tempfile, "mkdtemp", full)
    rc, err = run_import(in_tmp, capsys, root)
    assert_one_error(rc, err, f"no space left on device while writing {DATASET}")
    assert files_under(in_tmp / "results") == {}


@pytest.mark.parametrize("fault", ["bad_case", "disk_full"])
def test_failed_reimport_keeps_the_previous_dataset_byte_identical(in_tmp, capsys, monkeypatch, fault):
    root = write_folder_dataset(in_tmp / "data")
    rc, err = run_import(in_tmp, capsys, root)
    assert rc == 0, err
    before = files_under(in_tmp / "results")
    assert "t/nnunet/raw/Dataset901_t/dataset.json" in before and "t/split.json" in before
    write_folder_dataset(in_tmp / "data", n=5)  # a new case: the re-import would change everything
    if fault == "bad_case":
        (root / CASE1[0]).write_bytes(b"broken")
    else:
        monkeypatch.setattr(nib, "save", DiskFull(at=6))
    rc, err = run_import(in_tmp, capsys, root)
    assert_one_error(rc, err, "case01" if fault == "bad_case" else "no space left on device")
    assert files_under(in_tmp / "results") == before


def test_interrupted_swap_is_put_back(tmp_path):
    """A job killed between moving the old dataset aside and renaming the new one in leaves `.<name>.old`
    and no dataset; the next write of the same folder starts from the old dataset again."""
    final = tmp_path / "Dataset500_t"
    (tmp_path / ".Dataset500_t.old").mkdir()
    (tmp_path / ".Dataset500_t.old" / "dataset.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(final):
            raise RuntimeError("the new import fails")
    assert (final / "dataset.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset500_t"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_imported_files_get_the_umask_permissions(in_tmp, capsys, mask):
    import os

    root = write_folder_dataset(in_tmp / "data")
    old = os.umask(mask)
    try:
        rc, err = run_import(in_tmp, capsys, root)
    finally:
        os.umask(old)
    assert rc == 0, err
    dataset = in_tmp / DATASET
    files = (dataset / "dataset.json", dataset / "imagesTr" / "case00_0000.nii.gz", in_tmp / "results/t/split.json")
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert dataset.stat().st_mode & 0o777 == 0o777 & ~mask


@pytest.mark.skipif(not (SHARED_DATA / "BraTS2015_deepmedic").is_dir(), reason="needs ../shared/data (real scans)")
def test_real_brats_brain_mask_shifted_30mm_is_refused(in_tmp, capsys):
    """Real BraTS 2013 cases (240x240x155 with a brain mask): the second case's brain mask moved 30 mm."""
    root = in_tmp / "brats"
    cases = sorted((SHARED_DATA / "BraTS2015_deepmedic").iterdir())[:2]
    for case in cases:
        shutil.copytree(case, root / case.name)
    region = root / cases[0].name / "brainmask.nii.gz"
    img = nib.load(str(region))
    affine = img.affine.copy()
    affine[1, 3] += 30.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(region))
    rc, err = run_import(in_tmp, capsys, root, "brats", BRATS_LABELS)
    assert_one_error(rc, err, region, "brain mask affine differs", "by 30")
    assert files_under(in_tmp / "results") == {}


def write_4d_msd(root, channels=("FLAIR", "T1w", "t1gd", "T2w"), dataset_json=True, key="modality"):
    """A tiny Decathlon Task01-like folder: 4-D images (one channel per name), Task01 labels 1..3."""
    for i in range(3):
        image, mask = make_case(seed=i, labels=(1, 2, 3))
        stack = np.stack([image.array * (k + 1) for k in range(len(channels))], -1)
        write_volume(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", Volume(stack, image.affine))
        write_volume(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", mask, np.uint8)
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({key: {str(k): n for k, n in enumerate(channels)}}))
    return root


@pytest.mark.parametrize("problem", ["wrong_name", "no_channel", "index_too_big", "name_without_dataset_json",
                                     "no_channel_no_dataset_json", "channel_of_a_3d_file"])
def test_bad_channel_choice_is_one_line_and_writes_nothing(in_tmp, capsys, problem):
    root = write_4d_msd(in_tmp / "Task01", dataset_json=problem not in ("name_without_dataset_json",
                                                                        "no_channel_no_dataset_json"))
    channel = {"wrong_name": "T1c", "index_too_big": 4, "name_without_dataset_json": "FLAIR"}.get(problem)
    fmt = "msd_brats"
    if problem == "channel_of_a_3d_file":
        root, fmt, channel = write_folder_dataset(in_tmp / "data"), "folder", 0
    extra = {} if channel is None else {"channel": channel}
    rc, err = run_import(in_tmp, capsys, root, fmt, BRATS_LABELS if fmt == "msd_brats" else FOLDER_LABELS,
                         **extra)
    words = {
        "wrong_name": [root / "dataset.json", "no channel named 'T1c'", "0 FLAIR, 1 T1w, 2 t1gd, 3 T2w"],
        "no_channel": [root / "dataset.json", "4 channels (0 FLAIR, 1 T1w, 2 t1gd, 3 T2w)", "data.channel"],
        "index_too_big": [root / "dataset.json", "data.channel 4 does not exist", "3 T2w"],
        "name_without_dataset_json": [root, "'FLAIR' is a name", "give the channel's index"],
        "no_channel_no_dataset_json": [root / "imagesTr" / "BRATS_000.nii.gz", "4 channels", "data.channel"],
        "channel_of_a_3d_file": [root / "images" / "case00.nii.gz", "the image is 3D"],
    }[problem]
    assert_one_error(rc, err, *words)
    assert files_under(in_tmp / "results") == {}


def test_channel_names_of_a_v2_dataset_json(in_tmp, capsys):
    """nnU-Net v2's `channel_names` names the channels as v1's `modality` does."""
    root = write_4d_msd(in_tmp / "Task01", key="channel_names")
    rc, err = run_import(in_tmp, capsys, root, "msd_brats", BRATS_LABELS, channel="T2w")
    assert rc == 0, err
    image = read_volume(in_tmp / DATASET / "imagesTr" / "BRATS_001_0000.nii.gz").array
    np.testing.assert_array_equal(image, make_case(seed=1, labels=(1, 2, 3))[0].array * 4)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_dataset_json_saved_by_windows_tools_is_read(in_tmp, capsys, encoding):
    """Found in review: a UTF-16 dataset.json (PowerShell's default) ended the import with a traceback."""
    root = write_4d_msd(in_tmp / "Task01", key="channel_names")
    text = (root / "dataset.json").read_text()
    (root / "dataset.json").write_bytes(text.encode(encoding))
    rc, err = run_import(in_tmp, capsys, root, "msd_brats", BRATS_LABELS, channel="T2w")
    assert rc == 0, err
    image = read_volume(in_tmp / DATASET / "imagesTr" / "BRATS_001_0000.nii.gz").array
    np.testing.assert_array_equal(image, make_case(seed=1, labels=(1, 2, 3))[0].array * 4)


def test_dataset_json_that_is_no_json_text_is_one_line(in_tmp, capsys):
    root = write_4d_msd(in_tmp / "Task01", dataset_json=False)
    (root / "dataset.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    rc, err = run_import(in_tmp, capsys, root, "msd_brats", BRATS_LABELS, channel="T2w")
    assert_one_error(rc, err, root / "dataset.json", "not a JSON text file")
    assert files_under(in_tmp / "results") == {}
    (in_tmp / "folder.json").mkdir()
    with pytest.raises(InputError, match="folder.json: is a folder, not a JSON file"):
        read_json(in_tmp / "folder.json")


def test_brats_format_with_other_label_ids_is_refused(in_tmp, capsys):
    root = write_4d_msd(in_tmp / "Task01")
    rc, err = run_import(in_tmp, capsys, root, "msd_brats", {"background": 0, "tumour": 1}, channel=0)
    assert_one_error(rc, err, "config key data.labels", "format msd_brats imports the labels")
    assert files_under(in_tmp / "results") == {}


def killed_in(stage, patch_target, name, at=1):
    """Run `stage()` in a forked child that dies (os._exit, no cleanup: what SIGKILL leaves) on the `at`-th
    call of `patch_target.name`; returns the child's exit status."""
    import os

    pid = os.fork()
    if pid == 0:  # the child: the real stage, killed part-way
        calls = [0]
        real = getattr(patch_target, name)

        def die(*args, **kwargs):
            calls[0] += 1
            if calls[0] >= at:
                os._exit(137)
            return real(*args, **kwargs)

        setattr(patch_target, name, die)
        try:
            stage()
        finally:
            os._exit(1)  # not killed where expected
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def hidden_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def test_killed_import_and_preprocessing_leave_no_temporaries_after_their_next_run(in_tmp, capsys):
    """A killed import leaves a hidden half-written dataset and two hidden JSON files, a killed nnU-Net
    preprocessing its hidden dataset folder; the next run of each stage removes its own."""
    from gem3d.data import nnunet

    root = write_folder_dataset(in_tmp / "data")
    config = in_tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "preprocess": {"dataset_id": 901, "num_processes": 1},
                                      "data": {"format": "folder", "path": str(root), "labels": FOLDER_LABELS}}))
    results = in_tmp / "results"
    assert killed_in(lambda: main(["import", "--config", str(config)]), nib, "save", at=3) == 137
    left = hidden_under(results)
    assert any(p.startswith("t/nnunet/raw/.Dataset901_t.") for p in left), left
    assert any(p.startswith("t/.split.") for p in left) and any(p.startswith("t/.import_report.") for p in left)
    assert main(["import", "--config", str(config)]) == 0
    assert hidden_under(results) == []
    # preprocessing killed twice while nnU-Net runs: the second run removed the first one's folder before
    # it started (only its own is left, which its next run removes in turn)
    preprocess = lambda: main(["preprocess", "--config", str(config)])  # noqa: E731
    assert killed_in(preprocess, nnunet, "run_logged") == 137
    first = hidden_under(results)
    assert len(first) == 1 and first[0].startswith("t/nnunet/preprocessed/.Dataset901_t."), first
    assert killed_in(preprocess, nnunet, "run_logged") == 137
    second = hidden_under(results)
    assert len(second) == 1 and second != first and second[0].startswith("t/nnunet/preprocessed/.Dataset901_t.")


@pytest.mark.parametrize("entry, cause", [("loop", "symbolic link loop"), ("self_link", "symbolic link loop"),
                                          ("folder", "a folder, not a file"), ("dangling", "which does not exist")])
def test_image_entry_that_is_no_file_is_named_with_its_cause(in_tmp, capsys, entry, cause):
    """An image entry that is a symlink loop, a link to itself, a folder or a dangling link was reported as
    'no image for this mask'; the error names the entry and why it is not a file."""
    import os

    root = write_folder_dataset(in_tmp / "data")
    image = root / CASE1[0]
    image.unlink()
    if entry == "loop":
        os.symlink("other.nii.gz", image)
        os.symlink("case01.nii.gz", image.with_name("other.nii.gz"))
    elif entry == "self_link":
        os.symlink("case01.nii.gz", image)
    elif entry == "folder":
        image.mkdir()
    else:
        os.symlink("/nonexistent/case01.nii.gz", image)
    rc, err = run_import(in_tmp, capsys, root)
    assert_one_error(rc, err, image, cause)
    assert "no image for this mask" not in err
    assert files_under(in_tmp / "results") == {}


def test_msd_labels_folder_that_links_to_itself_is_named(in_tmp, capsys):
    import os

    root = in_tmp / "Task99"
    for i in range(3):
        image, _ = make_case(seed=i)
        write_volume(root / "imagesTr" / f"hip_{i:03d}.nii.gz", image)
    os.symlink("labelsTr", root / "labelsTr")
    rc, err = run_import(in_tmp, capsys, root, "msd")
    assert_one_error(rc, err, root / "labelsTr", "symbolic link loop")
    assert "MSD folder missing" not in err
    assert files_under(in_tmp / "results") == {}


def test_huge_label_value_is_printed_as_it_is(in_tmp, capsys):
    """A label of 1e20 printed as -9223372036854775808 after a numpy cast warning."""
    root = write_folder_dataset(in_tmp / "data")
    mask = read_volume(root / CASE1[1])
    mask.array[0, 0, 0] = 1e20
    write_volume(root / CASE1[1], mask, np.float32)
    rc, err = run_import(in_tmp, capsys, root)
    assert_one_error(rc, err, root / CASE1[1], "unexpected label(s) [1e+20]")
    assert "Warning" not in err and "-9223372036854775808" not in err, err
    assert files_under(in_tmp / "results") == {}


def test_killed_table_write_leaves_nothing_after_the_next_write(in_tmp):
    """Every atomic write removes the temporaries a killed write of the same file left (an evaluation table
    here: its csv and md), and never another file's."""
    import pandas as pd

    from gem3d.evaluation import tables

    csv = in_tmp / "tables" / "privacy.csv"
    other = in_tmp / "tables" / ".privacy_old.k1ll3d.tmp.csv"  # another file's temporary
    other.parent.mkdir(parents=True)
    other.write_text("x")
    df = pd.DataFrame({"a": [1.0]})
    write = lambda: tables.write_table(df, csv, "Privacy")  # noqa: E731
    assert killed_in(write, tables, "markdown_document") == 137  # the csv written, the md's temporary left
    assert [p.name for p in csv.parent.glob(".privacy.*.tmp.md")]
    write()
    assert sorted(p.name for p in csv.parent.iterdir()) == [other.name, "privacy.csv", "privacy.md"]
