"""Config validation: every shipped config loads; unknown keys, wrong types, missing paths fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from gem3d.config import load_config
from gem3d.io import InputError

CONFIGS = sorted((REPO / "config").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"config.yaml", "brats.yaml", "abdomenct1k.yaml", "hippocampus.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path, check_paths=False)
    assert cfg.name and cfg.data.labels["background"] == 0


def _write(tmp_path, raw) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _demo() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_unknown_key_named(tmp_path):
    raw = _demo()
    raw["preprocess"]["slice_sise"] = 32
    with pytest.raises(InputError, match=r"unknown key at preprocess.*slice_sise"):
        load_config(_write(tmp_path, raw))


def test_unknown_top_level_key(tmp_path):
    raw = _demo()
    raw["samplng"] = {}
    with pytest.raises(InputError, match=r"unknown key.*samplng"):
        load_config(_write(tmp_path, raw))


def test_wrong_type_named(tmp_path):
    raw = _demo()
    raw["preprocess"]["slice_size"] = "big"
    with pytest.raises(InputError, match=r"config key preprocess\.slice_size: 'big' is not of type 'integer'"):
        load_config(_write(tmp_path, raw))


def test_missing_data_path_named(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "brats.yaml").read_text())
    raw["data"]["path"] = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"data\.path .*nowhere does not exist"):
        load_config(_write(tmp_path, raw))


def test_labels_must_be_consecutive(tmp_path):
    raw = _demo()
    raw["data"]["labels"] = {"background": 0, "a": 1, "b": 4}
    with pytest.raises(InputError, match=r"data\.labels"):
        load_config(_write(tmp_path, raw))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(InputError, match="invalid YAML"):
        load_config(bad)
