"""Config validation: every shipped config loads; a value that could only fail in a later stage is
refused when the config loads, in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_raw
from gem3d.config import check_data_path, config_from_dict, load_config, to_dict
from gem3d.io import InputError

CONFIGS = sorted((REPO / "config").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"config.yaml", "brats.yaml", "abdomenct1k.yaml", "hippocampus.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path, check_paths=False)
    assert cfg.name and cfg.data.labels["background"] == 0


def _cpu_scale(path: Path) -> bool:
    from gem3d.resources import cpu_scale

    return cpu_scale(load_config(path, check_paths=False))


@pytest.mark.parametrize("path", [p for p in CONFIGS if _cpu_scale(p)], ids=lambda p: p.name)
def test_cpu_configs_train_without_gradient_checkpointing(path):
    """Recomputing activations saves GPU memory only; on the CPU it cost a third of a demo volume-model training
    (68 -> 47 s, the same losses; docs/benchmarks.md). The paper default (true) must not creep into a CPU config."""
    cfg = load_config(path, check_paths=False)
    sections = {"volume_model.stage1": cfg.volume_model.stage1, "volume_model.stage2": cfg.volume_model.stage2}
    if "ldm3d" in cfg.comparisons:
        sections["ldm3d.train"] = cfg.ldm3d.train
    assert not [name for name, section in sections.items() if section.get("grad_checkpointing")]


def _write(tmp_path, raw) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _demo() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _tiny(**changes) -> dict:
    """TINY_CONFIG with "section.key" -> value changes (a deep copy)."""
    return tiny_raw(**changes)


def _refused(raw, pattern):
    with pytest.raises(InputError, match=pattern) as info:
        config_from_dict(raw, source="c.yaml", check_paths=False)
    assert "\n" not in str(info.value)


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


def test_data_path_is_checked_only_on_request(tmp_path, monkeypatch):
    """Loading (planning) never needs the data; check_data_path (the import command) says relative to what."""
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "config" / "brats.yaml").read_text())
    raw["data"]["path"] = "nowhere/BraTS"
    raw["evaluation"] = {"fid_extractor": "random_conv"}
    cfg = load_config(_write(tmp_path, raw))
    with pytest.raises(InputError, match=rf"data\.path nowhere/BraTS \(relative to the working directory "
                                         rf"{tmp_path}\) does not exist"):
        check_data_path(cfg)
    (tmp_path / "afile").write_text("x")
    raw["data"]["path"] = str(tmp_path / "afile")
    with pytest.raises(InputError, match=r"data\.path .*afile is not a folder"):
        check_data_path(load_config(_write(tmp_path, raw)))
    (tmp_path / "nowhere" / "BraTS").mkdir(parents=True)
    raw["data"]["path"] = "nowhere/BraTS"
    check_data_path(load_config(_write(tmp_path, raw)))


def test_labels_must_be_consecutive(tmp_path):
    raw = _demo()
    raw["data"]["labels"] = {"background": 0, "a": 1, "b": 4}
    with pytest.raises(InputError, match=r"data\.labels"):
        load_config(_write(tmp_path, raw))


@pytest.mark.parametrize("labels, pattern", [
    ({"bg": 0, "a": 1}, r"config key data\.labels: 'background' is a required property"),
    ({"background": 1, "a": 0}, r"config key data\.labels\.background: 0 was expected"),
])
def test_label_map_needs_background_zero(labels, pattern):
    _refused(_tiny(**{"data.labels": labels}), pattern)


@pytest.mark.parametrize("changes, pattern", [
    ({"sampling.overlap": 4}, r"config key sampling\.overlap: 4 must be smaller than volume_model\.window \(4\)"),
    ({"diffusion.beta_end": 1.0}, r"config key diffusion\.beta_end: 1\.0 is greater than or equal to the maximum"),
    ({"diffusion.beta_start": 0.0}, r"config key diffusion\.beta_start: 0\.0 is less than or equal to the minimum"),
    ({"diffusion.beta_start": 0.02, "diffusion.beta_end": 0.01}, r"config key diffusion: betas must satisfy "
                                                                  r"0 < beta_start <= beta_end < 1"),
    ({"diffusion.num_train_timesteps": 1}, r"config key diffusion\.num_train_timesteps: 1 is less than"),
    ({"vae.train.lr": float("inf")}, r"config key vae\.train\.lr: inf is not a finite number"),
    ({"slice_model.train.lr": float("nan")}, r"config key slice_model\.train\.lr: nan is not a finite number"),
    ({"volume_model.stage1.lr": 0}, r"config key volume_model\.stage1\.lr: 0 is less than or equal to the minimum"),
    ({"volume_model.stage2.lr": -1e-4}, r"config key volume_model\.stage2\.lr: -0\.0001 is less than or equal"),
    ({"augmentation.translate_range": [1.0, float("inf")]}, r"augmentation\.translate_range\.1: inf is not finite"
                                                            r"|augmentation\.translate_range\.1: inf is not a finite"),
    ({"augmentation.translate_range": [60, 20]}, r"augmentation\.translate_range: \[60, 20\]: the low end"),
    ({"sampling.steps": 1001}, r"config key sampling\.steps: num_inference_steps must be an integer in "
                               r"\[1, 1000\], got 1001"),
    ({"preprocess.slice_size": 18}, r"config key preprocess\.slice_size: 18 is not divisible by the VAE's "
                                    r"downsampling factor 4"),
    ({"preprocess.slice_size": 20}, r"config key slice_model\.model\.channel_mult: the latent slices are 5x5"),
    ({"vae.train.betas": [0.9, 1.0]}, r"config key vae\.train\.betas\.1: 1\.0 is greater than or equal"),
    ({"sampling.enhancement_multiples": [1, 1]}, r"config key sampling\.enhancement_multiples: .*non-unique"),
    ({"sampling.sets": {}}, r"config key sampling\.sets: \{\} should be non-empty"),
    ({"evaluation.fid_weights": "x.pth"}, r"config key evaluation\.fid_weights: must be null for fid_extractor "
                                          r"random_conv"),
    ({"data.split": "split.txt", "data.test_path": "test_cases"}, r"config keys data\.split and data\.test_path "
                                                                  r"are both set; set one"),
])
def test_values_that_cannot_work_are_refused_at_load(changes, pattern):
    _refused(_tiny(**changes), pattern)


def test_volume_unet_divisibility_named():
    raw = _tiny(**{"volume_model.model.channel_mult": [1, 2, 2, 2]})  # factor 8; the latent is 4x4
    _refused(raw, r"config key volume_model\.model\.channel_mult: the latent slices are 4x4 .*factor 8")


def test_the_tiny_config_is_valid():
    cfg = config_from_dict(_tiny(), check_paths=False)
    assert cfg.sampling.overlap < cfg.volume_model.window


# ----------------------------------------------------------------------------- weights files
def test_configured_weights_must_exist_when_paths_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("lpips_backbone_weights", "lpips_lin_weights"):
        raw = _tiny(**{f"evaluation.{key}": "weights/none.pth"})
        config_from_dict(raw, check_paths=False)  # planning: not checked
        with pytest.raises(InputError, match=rf"config key evaluation\.{key}: weights missing at weights/none.pth "
                                             rf"\(relative to the working directory {tmp_path}\)"):
            config_from_dict(raw, source="c.yaml")
    raw = _tiny(**{"evaluation.fid_extractor": "inception_v3", "evaluation.fid_weights": str(tmp_path / "i.pth")})
    with pytest.raises(InputError, match=r"config key evaluation\.fid_weights: weights missing at /.*i\.pth$"):
        config_from_dict(raw, source="c.yaml")
    (tmp_path / "i.pth").write_bytes(b"weights")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "none.pth").write_bytes(b"weights")
    raw["evaluation"].update(lpips_backbone_weights="weights/none.pth", lpips_lin_weights="weights/none.pth")
    assert config_from_dict(raw).evaluation.fid_weights == str(tmp_path / "i.pth")


def test_missing_lpips_weights_are_an_error_not_not_computed(tmp_path):
    """Only an unset backbone key means "not computed"; a configured file that vanished is an error."""
    from gem3d.evaluation.quality import lpips_or_reason

    unset = config_from_dict(_tiny(), check_paths=False).evaluation
    assert lpips_or_reason(unset) == (None, "not computed: no backbone weights configured")
    gone = config_from_dict(_tiny(**{"evaluation.lpips_backbone_weights": str(tmp_path / "alex.pth")}),
                            check_paths=False).evaluation
    with pytest.raises(InputError, match=r"evaluation\.lpips_backbone_weights: weights missing at .*alex\.pth"):
        lpips_or_reason(gone)


# ----------------------------------------------------------------------------- the file itself
def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  format: [brats\n")
    with pytest.raises(InputError, match=r"bad\.yaml: invalid YAML at line 4, column 1: expected ',' or ']'") as info:
        load_config(bad)
    assert "\n" not in str(info.value) and "started at line 3" not in str(info.value)
    assert "(while parsing a flow sequence at line 3, column 11)" in str(info.value)


@pytest.mark.parametrize("text, pattern", [
    ("name: a\nname: b\n", r"line 2, column 1: duplicate key name \(first given at line 1\)"),
    ("name: a\nvae:\n  train:\n    lr: 1.0e-4\n    steps: 3\n    lr: 2.0e-4\n",
     r"line 6, column 5: duplicate key vae\.train\.lr \(first given at line 4\)"),
    ("sampling:\n  sets:\n    IC: {informed: IC, informed: IG}\n",
     r"line 3, column 24: duplicate key sampling\.sets\.IC\.informed \(first given at line 3\)"),
    ("a: [{b: 1, b: 2}]\n", r"line 1, column 12: duplicate key a\.0\.b"),
])
def test_duplicate_key_is_an_error_naming_key_and_line(tmp_path, text, pattern):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"dup\.yaml: invalid YAML at {pattern}"):
        load_config(path)


def test_yaml_12_exponent_is_a_number(tmp_path):
    raw = yaml.safe_dump(_tiny()) + "diffusion: {beta_start: 1e-4, beta_end: 2E-2}\n"
    path = tmp_path / "c.yaml"
    path.write_text(raw)
    cfg = load_config(path, check_paths=False)
    assert cfg.diffusion.beta_start == 1e-4 and cfg.diffusion.beta_end == 0.02


@pytest.mark.parametrize("kind, pattern", [
    ("folder", r"is a folder, not a config file"),
    ("checkpoint", r"a binary file, not a YAML config file"),
    ("latin1", r"a binary file, not a YAML config file"),
    ("empty", r"the config file is empty"),
    ("list", r"a config is a mapping of keys \(name: \.\.\., data: \.\.\.\), not a list"),
])
def test_config_path_that_is_not_a_config(tmp_path, kind, pattern):
    import torch

    path = tmp_path / "thing"
    if kind == "folder":
        path.mkdir()
    elif kind == "checkpoint":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    elif kind == "latin1":
        path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    else:
        path.write_text({"empty": "", "list": "- a\n- b\n"}[kind])
    with pytest.raises(InputError, match=rf"^{path}: {pattern}$"):
        load_config(path)



# ----------------------------------------------------------------------------- config/README.md
def test_config_readme_is_generated_from_the_schema():
    """config/README.md is what `python -m gem3d.config_doc` writes (regenerate it after a schema change)."""
    from gem3d import config_doc

    assert (REPO / "config" / "README.md").read_text() == config_doc.render()
    assert config_doc.main(["--check"]) == 0


def test_config_readme_lists_every_key_with_type_default_and_description():
    from gem3d import config_doc

    text = config_doc.render()
    for row in ("| `vae.train.lr` | number > 0 | `0.0001` | AdamW learning rate",
                "| `slice_model.train.log_every` | integer >= 1 | `50` |",  # TrainConfig's default, not in the section
                "| `volume_model.stage1.seed` | integer | the top-level seed |",
                "| `phantoms.n_cases` | integer >= 2 | `12` |",
                "| `data.path` | string | required | input folder; a relative path is relative to the working directory",
                "| `sampling.sets.<name>.informed` | IC \\| IG | required |",
                "| `evaluation.segmentation.epochs` | integer >= 1 | `1000` |"):
        assert row in text, row
    defaults = to_dict(config_from_dict({**config_doc.MINIMAL, "phantoms": {}}, check_paths=False))

    def keys(value, prefix):  # every dotted key of the default config (free mappings not entered)
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            if isinstance(item, dict) and path not in ("data.labels", "sampling.sets"):
                yield from keys(item, path)

    internal = ("source", "results_root")  # set by gem3d (the file read; a bundle's folder), never in a config file
    missing = [k for k in keys(defaults, "") if k not in internal and f"| `{k}` |" not in text]
    assert missing == []


def test_a_schema_key_without_description_is_refused(monkeypatch):
    from gem3d import config_doc

    schema = yaml.safe_load(config_doc.SCHEMA_PATH.read_text())
    del schema["properties"]["sampling"]["properties"]["overlap"]["description"]
    monkeypatch.setattr(config_doc, "_schema", lambda: schema)
    with pytest.raises(ValueError, match=r"sampling\.overlap has no description"):
        config_doc.render()
