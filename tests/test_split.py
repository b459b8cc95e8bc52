"""User-chosen test sets: data.split (a text or JSON file, or a mapping in the config) and data.test_path
(a second folder of test cases); the seeded split stays the default; bad splits are one line naming the
file (or key) and write nothing."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import assert_one_error, write_folder_dataset
from gem3d.cli import main
from gem3d.io import read_json, read_volume

LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}
RESULTS = "results/t"
IDS = ["case00", "case01", "case02", "case03", "case04"]


def run_import(tmp, capsys, data_path, **data):
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "preprocess": {"dataset_id": 901},
                                      "data": {"format": "folder", "path": str(data_path), "labels": LABELS,
                                               **data}}))
    capsys.readouterr()
    rc = main(["import", "--config", str(config)])
    return rc, capsys.readouterr().err


def split_json(tmp):
    return read_json(tmp / RESULTS / "split.json")


def imported(tmp):
    return sorted(p.name.split("_0000")[0] for p in (tmp / RESULTS / "nnunet/raw/Dataset901_t/imagesTr").iterdir())


@pytest.fixture
def data(in_tmp):
    return write_folder_dataset(in_tmp / "data", n=5)


def test_seeded_split_stays_the_default(in_tmp, capsys, data):
    rc, err = run_import(in_tmp, capsys, data)
    assert rc == 0, err
    split = split_json(in_tmp)
    assert split["source"] == "seeded" and split["seed"] == 0 and len(split["test"]) == 1 and len(split["train"]) == 4


def test_text_file_names_the_test_cases(in_tmp, capsys, data):
    path = in_tmp / "test_cases.txt"
    path.write_text("# held-out scanner\ncase03\n\ncase01\n")
    rc, err = run_import(in_tmp, capsys, data, split=str(path))
    assert rc == 0, err
    split = split_json(in_tmp)
    assert split["test"] == ["case01", "case03"] and split["train"] == ["case00", "case02", "case04"]
    assert split["source"] == f"data.split {path}"
    assert read_json(in_tmp / RESULTS / "import_report.json")["split"] == f"data.split {path}"


def test_json_with_both_sides_imports_only_the_named_cases(in_tmp, capsys, data):
    path = in_tmp / "split.json"
    path.write_text(json.dumps({"train": ["case00", "case02"], "test": ["case04"]}))
    rc, err = run_import(in_tmp, capsys, data, split=str(path))
    assert rc == 0, err
    assert split_json(in_tmp)["train"] == ["case00", "case02"] and split_json(in_tmp)["test"] == ["case04"]
    assert imported(in_tmp) == ["case00", "case02", "case04"]
    assert read_json(in_tmp / RESULTS / "import_report.json")["not_in_split"] == ["case01", "case03"]


def test_json_list_and_config_mapping_and_an_earlier_split_json(in_tmp, capsys, data):
    listing = in_tmp / "test.json"
    listing.write_text(json.dumps(["case02"]))
    rc, err = run_import(in_tmp, capsys, data, split=str(listing))
    assert rc == 0 and split_json(in_tmp)["test"] == ["case02"], err
    rc, err = run_import(in_tmp, capsys, data, split={"test": ["case00", "case04"]})
    assert rc == 0 and split_json(in_tmp)["test"] == ["case00", "case04"], err
    assert split_json(in_tmp)["source"] == "data.split (config)"
    earlier = in_tmp / "earlier_split.json"
    earlier.write_text((in_tmp / RESULTS / "split.json").read_text())  # an earlier run's record, reused
    rc, err = run_import(in_tmp, capsys, data, split=str(earlier))
    assert rc == 0, err
    assert split_json(in_tmp)["test"] == ["case00", "case04"] and len(split_json(in_tmp)["train"]) == 3


def test_test_path_cases_are_the_test_set(in_tmp, capsys, data):
    tests = write_folder_dataset(in_tmp / "hospital", n=2)
    for folder in ("images", "masks"):
        for i, p in enumerate(sorted((tests / folder).iterdir())):
            p.rename(p.with_name(f"scanner2_{i}.nii.gz"))
    rc, err = run_import(in_tmp, capsys, data, test_path=str(tests))
    assert rc == 0, err
    split = split_json(in_tmp)
    assert split["test"] == ["scanner2_0", "scanner2_1"] and split["train"] == IDS
    assert split["source"] == f"data.test_path {tests}"
    assert imported(in_tmp) == IDS + ["scanner2_0", "scanner2_1"]
    image = read_volume(in_tmp / RESULTS / "nnunet/raw/Dataset901_t/imagesTr/scanner2_1_0000.nii.gz")
    assert (image.array == read_volume(tests / "images" / "scanner2_1.nii.gz").array).all()


def bad_split(tmp, data, problem):
    """(data keys, words the error must hold) of one bad split."""
    path = tmp / "split.txt"
    if problem == "unknown_case":
        path.write_text("case01\ncase99\n")
        return {"split": str(path)}, [path, "test case case99 is not in", data]
    if problem == "both_sides":
        path.write_text(json.dumps({"train": ["case00", "case01"], "test": ["case01"]}))
        return {"split": str(path)}, [path, "case case01 is on both sides"]
    if problem == "empty_test":
        path.write_text("# nothing\n")
        return {"split": str(path)}, [path, "the test side is empty"]
    if problem == "empty_train":
        path.write_text("\n".join(IDS))
        return {"split": str(path)}, [path, "the train side is empty"]
    if problem == "named_twice":
        return {"split": {"test": ["case01", "case01"]}}, ["config key data.split", "case01 is named twice"]
    if problem == "missing_file":
        return {"split": str(tmp / "nosuch.txt")}, [tmp / "nosuch.txt", "file not found"]
    if problem == "bad_json":
        path.write_text('{"test": ["case01",]}')
        return {"split": str(path)}, [path, "invalid JSON"]
    if problem == "other_keys":
        path.write_text(json.dumps({"validation": ["case01"]}))
        return {"split": str(path)}, [path, "names 'test'", "validation"]
    if problem == "split_and_test_path":
        path.write_text("case01\n")
        return {"split": str(path), "test_path": str(data)}, ["data.split and data.test_path are both set"]
    if problem == "test_path_missing":
        return {"test_path": str(tmp / "nowhere")}, ["config key data.test_path", tmp / "nowhere", "not a folder"]
    if problem == "test_path_same_ids":
        other = write_folder_dataset(tmp / "other", n=2)
        return {"test_path": str(other)}, [other / "images" / "case00.nii.gz", "also in data.path", "must differ"]
    if problem == "test_side_only_bad_cases":
        (data / "images" / "case01.nii.gz").write_bytes(b"broken")
        path.write_text("case01\n")
        return {"split": str(path), "on_bad_case": "skip"}, [path, "the test side is empty", "1 bad case(s) skipped"]
    raise AssertionError(problem)


PROBLEMS = ["unknown_case", "both_sides", "empty_test", "empty_train", "named_twice", "missing_file", "bad_json",
            "other_keys", "split_and_test_path", "test_path_missing", "test_path_same_ids", "test_side_only_bad_cases"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_split_is_one_line_and_writes_nothing(in_tmp, capsys, data, problem):
    keys, words = bad_split(in_tmp, data, problem)
    rc, err = run_import(in_tmp, capsys, data, **keys)
    assert_one_error(rc, err, *words)
    assert not (in_tmp / "results").exists() or not any(p.is_file() for p in (in_tmp / "results").rglob("*"))


def test_a_bad_split_keeps_the_previous_import(in_tmp, capsys, data):
    rc, err = run_import(in_tmp, capsys, data)
    assert rc == 0, err
    before = (in_tmp / RESULTS / "split.json").read_bytes()
    path = in_tmp / "split.txt"
    path.write_text("case77\n")
    rc, err = run_import(in_tmp, capsys, data, split=str(path))
    assert_one_error(rc, err, path, "case77")
    assert (in_tmp / RESULTS / "split.json").read_bytes() == before
