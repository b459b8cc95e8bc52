"""A trained generator handed to another lab: `gem3d export` writes a bundle without patient image data, and
`gem3d generate --bundle` on another machine (a fresh folder) makes the same volumes as the original run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import yaml

from conftest import TINY_CONFIG, assert_one_error
from gem3d.cli import main
from gem3d.io import Volume, read_json, read_volume, write_volume
from gem3d.paths import Paths


def mask_with_outside(cfg, case_id: str, path) -> None:
    """A test case's labels with -1 outside its non-zero region (a mask that carries its body region)."""
    raw = Paths(cfg).raw_dataset
    image = read_volume(raw / "imagesTr" / f"{case_id}_0000.nii.gz")
    label = read_volume(raw / "labelsTr" / f"{case_id}.nii.gz")
    mask = np.where(image.array != 0, label.array, -1).astype(np.int16)
    write_volume(path, Volume(mask, label.affine), np.int16)


def test_bundle_generates_the_same_volumes_elsewhere(run_copy, tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    split = read_json(Paths(run_copy).split)
    test_case = split["test"][0]
    # found in review: the run's config went into the bundle verbatim, with its case ids (an inline split, a
    # CASE:SLICE informed slice); the split given inline is the one the run made, so nothing reruns
    inline = {"train": split["train"], "test": split["test"]}
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "data": {**TINY_CONFIG["data"], "split": inline},
                                      "sampling": {**TINY_CONFIG["sampling"], "deenhance_informed": f"{test_case}:2"}}))
    mask_with_outside(run_copy, test_case, tmp_path / "mask.nii.gz")
    request = ["--mask", str(tmp_path / "mask.nii.gz"), "--informed", "IG", "--seed", "3", "--copies", "2"]
    assert main(["generate", "--config", str(config), *request, "--out", str(tmp_path / "here")]) == 0
    assert main(["export", "--config", str(config), "--out", str(tmp_path / "bundle")]) == 0

    bundle = tmp_path / "elsewhere" / "bundle"  # another machine: only the bundle, in a fresh folder
    shutil.copytree(tmp_path / "bundle", bundle)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["generate", "--bundle", str(bundle), *request, "--out", str(tmp_path / "there")]) == 0
    for copy in (0, 1):
        for part in (f"imagesTr/mask_{copy}_0000.nii.gz", f"labelsTr/mask_{copy}.nii.gz"):
            here, there = read_volume(tmp_path / "here" / part), read_volume(tmp_path / "there" / part)
            assert np.array_equal(here.array, there.array) and np.allclose(here.affine, there.affine), part

    bundle_config = (bundle / "config.yaml").read_text()
    assert not [c for c in split["train"] + split["test"] if c in bundle_config], bundle_config
    assert str(tmp_path) not in bundle_config and "phantoms" not in yaml.safe_load(bundle_config)["data"]["path"]
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".npy", ".npz", ".nii", ".nii.gz", ".b2nd"))], files
    assert {"config.yaml", "model_card.md", "model_card.json", "checksums.sha256", "tiny/models/vae.pt",
            "tiny/models/volume_stage2.pt", "tiny/models/slice_model.pt", "tiny/slices/index.json"} <= set(files)
    index = read_json(bundle / "tiny" / "slices" / "index.json")
    assert index["cases"] == {} and index["split"] == {"train": [], "test": []}
    card = read_json(bundle / "model_card.json")
    assert card["data"]["training_cases"] == len(read_json(tmp_path / "results" / "tiny" / "split.json")["train"])
    assert card["networks"]["volume_stage2"]["steps"] == TINY_CONFIG["volume_model"]["stage2"]["steps"]
    assert "psnr" in card["measured"]["vae_test_reconstruction"]

    capsys.readouterr()
    ic = ["generate", "--bundle", str(bundle), "--mask", str(tmp_path / "mask.nii.gz"), "--informed",
          f"{test_case}:3", "--out", str(tmp_path / "ic")]
    assert_one_error(main(ic), capsys.readouterr().err, "not in the dataset")
    model = bundle / "tiny" / "models" / "volume_stage2.pt"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    assert_one_error(main(["generate", "--bundle", str(bundle), *request, "--out", str(tmp_path / "x")]),
                     capsys.readouterr().err, "volume_stage2.pt", "differs from", "checksums.sha256")
    assert_one_error(main(["generate", *request]), capsys.readouterr().err, "give --config FILE or --bundle DIR")
    assert json.loads((tmp_path / "there" / "provenance" / "mask_0.json").read_text())["seed"] == \
        json.loads((tmp_path / "here" / "provenance" / "mask_0.json").read_text())["seed"]


def test_export_never_replaces_a_folder_that_is_not_a_bundle(run_copy, tmp_path, capsys):
    """Found in review: `--out` was replaced whatever it held (a folder of documents, the run's models, `.`)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    models = sorted(p.name for p in Paths(run_copy).model("vae").parent.iterdir())
    for out in (documents, Paths(run_copy).model("vae").parent, Paths(run_copy).root):
        capsys.readouterr()
        assert_one_error(main(["export", "--config", str(config), "--out", str(out)]), capsys.readouterr().err,
                         f"{out}: --out is a folder with files that is not a gem3d bundle")
    assert (documents / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in Paths(run_copy).model("vae").parent.iterdir()) == models
    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty folder, then the bundle written there: both are replaced
        assert main(["export", "--config", str(config), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "checksums.sha256").is_file()
