"""scripts/diagnose_synthetic.py: pairing generated cases with their real source, and the sharpness and contrast
figures on volumes whose answer is known (an identical copy, a blurred copy, a copy without label contrast)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
from scipy import ndimage

from conftest import REPO, make_case
from gem3d.io import Volume, write_volume

SCRIPT = REPO / "scripts" / "diagnose_synthetic.py"


def load():
    spec = importlib.util.spec_from_file_location("diagnose_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pair(root, name, image, label, affine):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    write_volume(root / "imagesTr" / f"{name}_0000.nii.gz", Volume(image.astype(np.float32), affine))
    write_volume(root / "labelsTr" / f"{name}.nii.gz", Volume(label.astype(np.uint8), affine))


def test_known_answers(tmp_path):
    d = load()
    image, label = make_case(shape=(24, 22, 20), seed=3)
    img, lab = np.asarray(image.array, np.float32), np.asarray(label.array)
    img = np.where(lab == 1, img * 0.5, img)  # label 1 darker than its surroundings: a real contrast
    z = d.zscore(img)
    assert d.label_stats(z, lab, 1)[1] < -0.5
    blurred = ndimage.gaussian_filter(img, 1.5)
    assert d.boundary_gradient(d.zscore(blurred), lab) < 0.8 * d.boundary_gradient(z, lab)
    write_pair(tmp_path / "real", "case_7", img, lab, image.affine)
    write_pair(tmp_path / "synth", "case_7_IC", blurred, lab, image.affine)
    write_pair(tmp_path / "synth", "case_7_IC_copy1", img, lab, image.affine)
    found = d.pairs(tmp_path / "real", tmp_path / "synth")
    assert [(c, r.name) for c, _, r, _ in found] == [("case_7_IC", "case_7_0000.nii.gz"),
                                                      ("case_7_IC_copy1", "case_7_0000.nii.gz")]
    res = subprocess.run([sys.executable, str(SCRIPT), "--real", str(tmp_path / "real"), "--synthetic",
                          str(tmp_path / "synth")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "2 pairs" in res.stdout and "| 1 |" in res.stdout and "| 2 |" in res.stdout
    hf = float(res.stdout.split("high-frequency energy, synthetic / real: ")[1].split()[0])
    assert 0.0 < hf < 1.0  # the median of a blurred copy (far below 1) and an identical one (1)


def test_a_synthetic_case_without_its_real_source_is_one_line(tmp_path):
    image, label = make_case(shape=(16, 16, 12))
    write_pair(tmp_path / "real", "case_1", np.asarray(image.array), np.asarray(label.array), image.affine)
    write_pair(tmp_path / "synth", "other_IC", np.asarray(image.array), np.asarray(label.array), image.affine)
    res = subprocess.run([sys.executable, str(SCRIPT), "--real", str(tmp_path / "real"), "--synthetic",
                          str(tmp_path / "synth")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "other_IC_0000.nii.gz: no real case" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
