"""The paper's other methods end to end on the tiny run (issue #16): trained by the pipeline's stages,
sampled into their sets, and in the tables (Table 1 rows, Table 2 rows, the Table 3 injection table)."""

from __future__ import annotations

import copy
import re

import pandas as pd
import pytest

from conftest import tiny_raw
from gem3d import pipeline
from gem3d.config import config_from_dict
from gem3d.evaluation import stages as evaluation
from gem3d.io import read_json
from gem3d.paths import Paths
from gem3d.sampling import sets
from gem3d.sampling.sample_sets import merge_shards, sample_set

COMPARISONS = {
    "comparisons": ["pix2pix", "ldm3d", "controlnet", "crossattn"],
    "pix2pix": {"volume_size": [8, 16, 16],
                "model": {"base_channels": 4, "levels": 2, "disc_base_channels": 4, "disc_layers": 1, "norm_groups": 2},
                "train": {"steps": 3, "batch_size": 1, "log_every": 1, "checkpoint_every": 3, "precision": "fp32"}},
    "ldm3d": {"depth": 8,
              "model": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                        "head_dim": 8, "norm_groups": 4},
              "train": {"steps": 3, "batch_size": 2, "log_every": 1, "checkpoint_every": 3, "precision": "fp32"}},
}


def comparison_config():
    raw = tiny_raw()
    raw.update(copy.deepcopy(COMPARISONS))
    return config_from_dict(raw, source="tiny-comparisons", check_paths=False)


def test_set_names_follow_the_comparisons_key():
    plain = config_from_dict(tiny_raw(), source="tiny", check_paths=False)
    assert not any(name.startswith(("pix2pix", "ldm3d")) for name in sets.set_names(plain))
    assert sets.injection_sets(plain) == {}
    cfg = comparison_config()
    assert sets.generation_sets(cfg)[:3] == ["baseline", "pix2pix", "ldm3d"]
    assert {"test_controlnet", "test_crossattn", "test_pix2pix", "test_ldm3d"} <= set(sets.test_sets(cfg))
    assert sets.injection_sets(cfg) == {"concatenation": "test_gem3d", "control branch": "test_controlnet",
                                        "cross-attention": "test_crossattn"}
    assert sets.set_spec(cfg, "test_pix2pix").informed == "none"  # no informed slice: cannot decouple
    assert sets.set_spec(cfg, "test_crossattn").informed == "true"
    assert sets.model_name("controlnet", 2) == "controlnet_stage2" and sets.model_name("ldm3d") == "ldm3d"
    only_one = config_from_dict({**tiny_raw(), "comparisons": ["pix2pix"]}, source="tiny", check_paths=False)
    assert sets.injection_sets(only_one) == {} and "test_controlnet" not in sets.test_sets(only_one)


def test_comparison_methods_train_sample_and_reach_the_tables(run_copy):
    cfg = comparison_config()
    paths = Paths(cfg)
    for variant in ("controlnet", "crossattn"):
        pipeline.train_volume(cfg, 1, variant)
        pipeline.train_volume(cfg, 2, variant)
    pipeline.train_pix2pix(cfg)
    pipeline.train_ldm3d(cfg)
    for name in ("controlnet", "crossattn"):
        extra = torch_extra(paths.model(f"{name}_stage2"))
        assert extra["variant"] == name and extra["informed"] is True
    for name in sets.test_sets(cfg) + sets.generation_sets(cfg):  # the tables read every set
        sample_set(cfg, name)
        merge_shards(cfg, name, 1)
    manifest = read_json(paths.samples("test_pix2pix") / "manifest.json")
    assert {v["variant"] for v in manifest["volumes"]} == {"pix2pix"}
    assert all(v["sampler"] is None and "pix2pix" in v["checkpoints"] for v in manifest["volumes"])
    manifest = read_json(paths.samples("test_ldm3d") / "manifest.json")
    assert all(v["sampler"]["steps"] == cfg.sampling.steps for v in manifest["volumes"])

    evaluation.evaluate_fidelity(cfg)
    fidelity = pd.read_csv(paths.tables / "test_fidelity.csv")
    assert {"test_controlnet", "test_crossattn", "test_pix2pix", "test_ldm3d"} <= set(fidelity["method"])
    injection = pd.read_csv(paths.tables / "injection.csv")
    assert list(injection["injection"]) == ["concatenation", "control branch", "cross-attention"]
    for _, row in injection.iterrows():  # the Table 3 rows are the test fidelity rows of their sets
        assert row["MS-SSIM"] == pytest.approx(fidelity.set_index("method").loc[row["set"], "MS-SSIM"])
    assert injection["MS-SSIM"].nunique() == 3  # three different networks
    text = (paths.tables / "test_fidelity.md").read_text()
    assert "test_pix2pix, test_ldm3d" in text and "cannot decouple the conditions" in text
    for label in ("GEM-3D", "3D Pix2Pix", "conditional 3D LDM"):  # every row's budget (issue #23)
        assert f"Budget of {label} (" in text
    # the table says whether the paper's order holds (issue #23), with the values it judged
    ms = fidelity.set_index("method")["MS-SSIM"]
    assert re.search(r"The paper's order of Table 2 \(GEM-3D > 3D LDM > 3D Pix2Pix\): (holds|does not hold) here "
                     r"\(MS-SSIM: test_\w+ [\d.]+ > test_\w+ [\d.]+ > test_\w+ [\d.]+\)", text)
    assert f"test_pix2pix {ms['test_pix2pix']:.4f}" in text
    injection = (paths.tables / "injection.md").read_text()  # Table 3: budgets and the deviation from CLIP
    assert "The paper's finding of Table 3 (concatenation best): " in injection
    assert "Budget of GEM-3D, cross-attention injection (test_crossattn)" in injection
    assert "CLIP image embedding" in injection and "spatial tokenizer" in injection

    evaluation.evaluate_generation(cfg)
    generation = pd.read_csv(paths.tables / "generation_quality.csv")
    rows = generation.set_index(generation.columns[0])
    assert {"pix2pix", "ldm3d"} <= set(rows.index)
    assert rows.loc[["pix2pix", "ldm3d"], "FID-A"].notna().all()


def torch_extra(path):
    from gem3d.training.checkpoint import load_checkpoint

    return load_checkpoint(path, expect_kind="unet")["extra"]


@pytest.mark.parametrize("change, key", [
    (("pix2pix.volume_size", [6, 16, 16]), "pix2pix.volume_size"),  # not divisible by 2 ** levels
    (("pix2pix.model", {"disc_layers": 3}), "pix2pix.model.disc_layers"),  # patches larger than the volume
    (("ldm3d.depth", 7), "ldm3d.depth"),
    (("ldm3d.model", {"norm_groups": 3}), "ldm3d.model"),
    (("volume_model.model", {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                             "attention_levels": [], "norm_groups": 4}), "volume_model.model"),  # crossattn
])
def test_comparison_settings_are_refused_when_the_config_loads(change, key):
    from gem3d.io import InputError

    raw = tiny_raw()
    raw.update(copy.deepcopy(COMPARISONS))
    dotted, value = change
    section, leaf = dotted.split(".")
    if isinstance(value, dict) and isinstance(raw[section].get(leaf), dict):
        value = {**raw[section][leaf], **value}
    raw[section][leaf] = value
    with pytest.raises(InputError, match=rf"^bad\.yaml: config key {key.replace('.', '[.]')}"):
        config_from_dict(raw, source="bad.yaml", check_paths=False)
    raw["comparisons"] = []  # the sections of methods not listed are not checked
    config_from_dict(raw, source="bad.yaml", check_paths=False)


def test_paper_order_notes_say_whether_the_order_holds():
    """Table 2's order and Table 3's best row against the paper (issue #23): holds, does not hold, or no note."""
    from gem3d.evaluation.stages import paper_best_note, paper_order_note

    claim = "The paper's order"
    assert paper_order_note(claim, {"a": 0.7, "b": 0.6, "c": 0.5}) == [
        "The paper's order: holds here (MS-SSIM: a 0.7000 > b 0.6000 > c 0.5000)."]
    assert paper_order_note(claim, {"a": 0.7, "b": 0.8, "c": 0.5}) == [
        "The paper's order: does not hold here (MS-SSIM: b 0.8000 > a 0.7000 > c 0.5000)."]
    assert paper_order_note(claim, {"a": 0.7, "b": 0.7}) == [  # a tie is not the paper's strict order
        "The paper's order: does not hold here (MS-SSIM: a 0.7000 > b 0.7000)."]
    assert paper_order_note(claim, {"a": 0.7}) == []  # one row orders nothing
    best = "The paper's finding"
    assert paper_best_note(best, "concatenation", {"concatenation": 0.7083, "control branch": 0.7118,
                                                   "cross-attention": 0.6957}) == [
        "The paper's finding: does not hold here (MS-SSIM: control branch 0.7118 > concatenation 0.7083 > "
        "cross-attention 0.6957)."]
    assert paper_best_note(best, "concatenation", {"concatenation": 0.73, "cross-attention": 0.69})[0].startswith(
        "The paper's finding: holds here")
    assert paper_best_note(best, "concatenation", {"control branch": 0.7, "cross-attention": 0.6}) == []
