"""Fault cases of the sampling commands (issue #15): each builds the fault, runs the real command through
`gem3d.cli.main`, and checks the return code, the one `error:` line (no traceback) and what is left on
disk."""

from __future__ import annotations

import shutil

import yaml

from conftest import TINY_CONFIG
from gem3d.cli import main
from gem3d.io import read_json, write_json
from gem3d.paths import Paths


def _config_file(tmp_path, **overrides) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_CONFIG, **overrides}))
    return str(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_killed_sample_job_leftovers_are_removed_on_its_next_run(in_run, tmp_path, capsys):
    """A killed `gem3d sample` leaves its hidden temporary folder; the next run of the same job removes
    it, and never another shard's or set's (they may be running)."""
    shards = Paths(in_run).root / "samples" / "shards"
    own = shards / ".IC.0of1.k1ll3d.tmp"
    others = [shards / ".IC.0of2.running.tmp", shards / ".IC.0of10.running.tmp", shards / ".IC_MA.0of1.x.tmp"]
    for folder in [own, *others]:
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "imagesTr" / "half_written.nii.gz").write_bytes(b"\0" * 10)
    merge_own = Paths(in_run).root / "samples" / ".IC.m3rge.tmp"
    merge_other = Paths(in_run).root / "samples" / ".IC_copy1.m3rge.tmp"
    for folder in (merge_own, merge_other):
        folder.mkdir(parents=True)
    try:
        config = _config_file(tmp_path)
        assert main(["sample", "--set", "IC", "--config", config]) == 0
        assert not own.exists() and all(f.exists() for f in others)
        shard = read_json(shards / "IC.0of1" / "manifest.json")
        assert shard["set"] == "IC"
        # one shard: the same run merged it (#26: no merge job), removing the set's own merge leftovers only
        assert not merge_own.exists() and merge_other.exists()
        assert read_json(Paths(in_run).samples("IC") / "manifest.json")["volumes"] == shard["volumes"]
        merge_own.mkdir()
        assert main(["merge-samples", "--set", "IC", "--config", config]) == 0
        assert not merge_own.exists() and merge_other.exists()
    finally:
        for folder in (*others, merge_other):
            shutil.rmtree(folder, ignore_errors=True)
    assert "Traceback" not in capsys.readouterr().err


def test_merging_shards_of_different_checkpoints_is_refused(in_run, tmp_path, capsys):
    """Shard 1 sampled with another volume model (its manifest records another sha256): the merge is
    refused with one line naming the shard and the checkpoint; the previous merged set is kept."""
    paths, config = Paths(in_run), _config_file(tmp_path)
    try:
        for shard in (0, 1):
            assert main(["sample", "--set", "IC", "--shard", str(shard), "--shards", "2", "--config", config]) == 0
        assert main(["merge-samples", "--set", "IC", "--shards", "2", "--config", config]) == 0
        good = (paths.samples("IC") / "manifest.json").read_bytes()
        stale = paths.sample_shard("IC", 1, 2) / "manifest.json"
        manifest = read_json(stale)
        for v in manifest["volumes"]:
            v["checkpoints"]["volume_stage2"] = "0" * 64  # what a shard sampled with an older model records
        write_json(stale, manifest)
        capsys.readouterr()
        assert main(["merge-samples", "--set", "IC", "--shards", "2", "--config", config]) == 2
        line = _one_error_line(capsys)
        assert str(stale) in line and "shard 1" in line and "volume_stage2" in line
        assert (paths.samples("IC") / "manifest.json").read_bytes() == good  # old good state kept
        assert not list((paths.root / "samples").glob(".IC.*.tmp"))  # nothing partial
    finally:
        for shard in (0, 1):
            shutil.rmtree(paths.sample_shard("IC", shard, 2), ignore_errors=True)


def test_more_shards_than_cases_merge(in_run, tmp_path, capsys):
    """Found in review: a shard without cases (sampling.shards above the set's case count) wrote no slices/
    folder and no checkpoint record, and the merge stopped with a traceback or a wrong 'another checkpoint'
    refusal that no resampling could fix."""
    paths, config = Paths(in_run), _config_file(tmp_path)
    try:
        for shard in range(3):  # the tiny run's test split has 2 cases: shard 2 has none
            assert main(["sample", "--set", "test_gem3d", "--shard", str(shard), "--shards", "3", "--config",
                         config]) == 0
        assert read_json(paths.sample_shard("test_gem3d", 2, 3) / "manifest.json")["volumes"] == []
        assert main(["merge-samples", "--set", "test_gem3d", "--shards", "3", "--config", config]) == 0
        merged = paths.samples("test_gem3d")
        assert len(read_json(merged / "manifest.json")["volumes"]) == 2
        assert len(list((merged / "imagesTr").iterdir())) == len(list((merged / "slices").iterdir())) == 2
    finally:
        for shard in range(3):
            shutil.rmtree(paths.sample_shard("test_gem3d", shard, 3), ignore_errors=True)
    assert "Traceback" not in capsys.readouterr().err


def test_merging_with_a_missing_shard_is_refused(in_run, tmp_path, capsys):
    paths, config = Paths(in_run), _config_file(tmp_path)
    assert not paths.sample_shard("IG", 0, 3).exists()
    existed = paths.samples("IG").exists()
    assert main(["merge-samples", "--set", "IG", "--shards", "3", "--config", config]) == 2
    line = _one_error_line(capsys)
    assert str(paths.sample_shard("IG", 0, 3) / "manifest.json") in line and "not found" in line
    assert paths.samples("IG").exists() == existed and not list((paths.root / "samples").glob(".IG.*.tmp"))


def test_slice_axis_flip_in_the_config_is_refused_before_sampling(in_run, tmp_path, capsys):
    paths = Paths(in_run)
    config = _config_file(tmp_path, augmentation={"flip_axes": [0, 2]})
    assert main(["sample", "--set", "IC_MA", "--shard", "0", "--shards", "3", "--config", config]) == 2
    line = _one_error_line(capsys)
    assert "augmentation.flip_axes" in line and config in line
    assert not paths.sample_shard("IC_MA", 0, 3).exists()


def test_flip_on_a_dataset_whose_axis_2_is_not_left_right_is_refused(in_run, tmp_path, capsys):
    """A case stored with left-right on array axis 0 (e.g. a sagittal acquisition, transposed by nnU-Net):
    `flip_axes: [2]` would flip front-back there, so the augmented set is refused before sampling."""
    paths = Paths(in_run)
    index_path = paths.slices / "index.json"
    original = index_path.read_bytes()
    index = read_json(index_path)
    case = sorted(index["split"]["train"])[0]
    index["cases"][case]["transpose_backward"] = [1, 2, 0]  # forward [2, 0, 1]: NIfTI x -> array axis 0
    try:
        write_json(index_path, index)
        config = _config_file(tmp_path)
        assert main(["sample", "--set", "IC_MA", "--shard", "0", "--shards", "4", "--config", config]) == 2
        line = _one_error_line(capsys)
        assert str(index_path) in line and case in line and "augmentation.flip_axes" in line
        assert not paths.sample_shard("IC_MA", 0, 4).exists()
    finally:
        index_path.write_bytes(original)
