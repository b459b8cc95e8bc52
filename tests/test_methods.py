"""The registry of generation methods (issue #23): a method added the documented way (tests/nearest_method.py:
one file, `method_modules`, its name in `comparisons`) runs through the stages, every row's table note states its
budget, and the shipped configs give the comparisons GEM-3D's budget."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_raw
from gem3d import pipeline
from gem3d.config import config_from_dict, load_config
from gem3d.evaluation.stages import budget_notes
from gem3d.io import InputError, read_json
from gem3d.methods import registry
from gem3d.paths import Paths
from gem3d.sampling import sets
from test_comparisons import COMPARISONS

TOY = {"method_modules": ["nearest_method"], "comparisons": [*COMPARISONS["comparisons"], "nearest"]}


@pytest.fixture
def toy(monkeypatch):
    """The registry as it is, given back after the test (the toy's registration does not leak into other tests)."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "_LOADED", set())


def toy_config(**changes):
    raw = tiny_raw(**changes)
    raw.update(copy.deepcopy({**COMPARISONS, **TOY}))
    return config_from_dict(raw, source="tiny-toy", check_paths=False)


def test_a_listed_module_adds_its_method_everywhere(toy):
    from gem3d import resources
    from gem3d.fingerprint import config_digest, stage_keys

    cfg = toy_config()
    method = registry.get("nearest")
    assert method.module == "nearest_method" and [m.name for m in registry.enabled(cfg)][-1] == "nearest"
    assert "nearest" in sets.generation_sets(cfg) and sets.test_sets(cfg)[-1] == "test_nearest"
    assert sets.method_models(cfg)[-1] == "nearest" and sets.model_name("nearest") == "nearest"
    assert sets.set_spec(cfg, "test_nearest").informed == "none"  # mask only
    assert "test_nearest" in sets.figure_sets(cfg)
    assert stage_keys("train_nearest") == ("data.labels",)
    edited = toy_config(**{"data.labels": {"background": 0, "necrotic_core": 1, "edema": 2, "tumour": 3}})
    assert config_digest(edited, "train_nearest") != config_digest(cfg, "train_nearest")
    assert resources.job_size(cfg, "train_nearest").gpu == 0
    # a config that does not list it in comparisons does not run it
    off = config_from_dict({**tiny_raw(), "method_modules": ["nearest_method"]}, source="tiny", check_paths=False)
    assert "nearest" not in sets.set_names(off)


@pytest.mark.parametrize("modules, words", [
    (["no_such_module_xyz"], "cannot import no_such_module_xyz"),
    (["test_methods"], "test_methods defines no METHOD = Method(...)"),
])
def test_a_bad_method_module_is_one_line_naming_the_key(toy, modules, words):
    with pytest.raises(InputError) as info:
        config_from_dict({**tiny_raw(), "method_modules": modules}, source="bad.yaml", check_paths=False)
    message = str(info.value)
    assert message.startswith("bad.yaml: config key method_modules: ") and words in message and "\n" not in message


def test_comparisons_refuses_a_method_no_module_registers(toy):
    with pytest.raises(InputError, match=r"^bad\.yaml: config key comparisons\.0: 'nearest' is not one of"):
        config_from_dict({**tiny_raw(), "comparisons": ["nearest"]}, source="bad.yaml", check_paths=False)


def test_the_toy_method_trains_and_samples_through_the_stages(run_copy, toy):
    from gem3d.data.slice_store import SliceStore
    from gem3d.sampling.sample_sets import merge_shards, sample_set
    from gem3d.sampling.sets import TRAIN_MASKS, SampleSet

    cfg = toy_config()
    paths = Paths(cfg)
    with pytest.raises(InputError, match=r"nearest\.pt: file not found"):  # sampled before its training
        sample_set(cfg, "test_nearest")
    with pytest.raises(InputError, match="method nearest trains nearest; give one with --model"):
        pipeline.train_method(cfg, "nearest", "pix2pix")
    pipeline.train_method(cfg, "nearest")  # what `gem3d train-method --method nearest` runs
    for name in ("nearest", "test_nearest"):
        sample_set(cfg, name)
        merge_shards(cfg, name, 1)
    store = SliceStore(paths.slices)
    manifest = read_json(paths.samples("test_nearest") / "manifest.json")
    assert sorted(v["source_case"] for v in manifest["volumes"]) == store.case_ids("test")
    assert all(v["variant"] == "nearest" and v["sampler"] is None and set(v["checkpoints"]) == {"nearest"}
               for v in manifest["volumes"])
    # for a training mask the nearest training volume is its own: an exact copy inside the mask's region
    generated = SampleSet.open(cfg, "nearest", TRAIN_MASKS)
    assert sorted(generated.by_case()) == store.case_ids("train")
    for entry in generated.volumes:
        image, label = generated.load(entry, store.slice_size)
        real = store.load(entry["source_case"])
        inside = real.label >= 0
        np.testing.assert_array_equal(label, real.label)
        np.testing.assert_allclose(image[inside], np.asarray(real.image, np.float32)[inside], atol=2e-3)
        assert (image[~inside] == -1).all()


def test_every_row_states_its_budget(toy):
    cfg = toy_config()
    notes = budget_notes(cfg, sets.test_sets(cfg))
    gem3d = registry.budget(cfg, "gem3d")
    for method in registry.enabled(cfg):
        note = [n for n in notes if n.startswith(f"Budget of {method.label} (")]
        assert len(note) == 1, (method.name, notes)
        b = registry.budget(cfg, method.name)
        assert f"): {b.text()}" in note[0]
        assert b.text().count("M parameters") >= 1 and "; resampling: " in b.text()
        if method.name != "gem3d":
            assert (f"x{b.parameters / gem3d.parameters:.2f} GEM-3D's parameters, x{b.samples / gem3d.samples:.2f} "
                    "its training items") in note[0]
        if b.slices_per_item:  # a whole volume and a window are both one item: the slices say how much data
            assert f", x{b.slices / gem3d.slices:.2f} its slices" in note[0] or method.name == "gem3d"
    text = "\n".join(notes)
    v = cfg.volume_model
    windows = v.stage1['steps'] * v.stage1['batch_size'] + v.stage2['steps'] * v.stage2['batch_size']
    assert (f"{v.stage1['steps']:,} x {v.stage1['batch_size']} + {v.stage2['steps']:,} x {v.stage2['batch_size']} "
            f"optimizer steps x batch ({windows:,} windows of {v.window} slices seen, {windows * v.window:,} "
            "slices)") in text
    # found in review: GEM-3D's IG rows also sample with the slice model, which no note named
    t = cfg.slice_model.train
    assert (f"IG sets also use the slice model: {registry.budget(cfg, 'gem3d').other.split('slice model: ')[1]}"
            in text and f"{t['steps']:,} x {t['batch_size']} optimizer steps x batch of 2D slices" in text)
    p, l = COMPARISONS["pix2pix"], COMPARISONS["ldm3d"]
    assert f"{p['train']['steps']} x {p['train']['batch_size']} optimizer steps x batch" in text
    assert "resampled to " + "x".join(map(str, p["volume_size"])) in text
    assert f"{l['train']['steps']} x {l['train']['batch_size']} optimizer steps x batch" in text
    assert f"none for volumes of up to {l['depth']} slices" in text
    assert "0.00 M parameters; no optimizer step;" in text  # the toy
    assert "CLIP image embedding" in text and "spatial tokenizer" in text  # the cross-attention deviation
    # only the rows asked for
    assert [n.split(" (")[0] for n in budget_notes(cfg, ["test_pix2pix"])] == ["Budget of 3D Pix2Pix"]


def test_a_network_given_as_a_file_is_not_counted_as_trained(toy):
    """Found in review: with the release's networks imported, the budget still listed 150,000 + 50,000 steps."""
    cfg = toy_config(**{"volume_model.pretrained": {"stage2": "release/brain"}})
    b = registry.budget(cfg, "gem3d")
    assert b.steps == () and "no optimizer step" in b.text()
    assert "stage 1 imported from release/brain" in b.other and "stage 2 imported from release/brain" in b.other
    assert registry.budget(cfg, "baseline").steps != ()  # only the networks given as files


def test_the_cross_attention_note_names_a_frozen_encoder_when_one_is_given(toy):
    cfg = toy_config(**{"volume_model.crossattn_encoder": {"extractor": "inception_v3", "weights": "enc.pt"}})
    text = "\n".join(budget_notes(cfg, ["test_crossattn"]))
    assert "frozen inception_v3" in text and "spatial tokenizer" not in text
    assert "pooled 2048-d embedding of a frozen inception_v3 (not trained, not counted)" in text


COMPARING = [p for p in sorted((REPO / "config").glob("*.yaml")) if re.search(r"^comparisons: \[\w", p.read_text(), re.M)]


@pytest.mark.parametrize("path", COMPARING, ids=lambda p: p.name)
def test_shipped_configs_give_the_comparisons_gem3d_budget(path):
    """Capacity within 1.5x of GEM-3D's volume model; the same training items seen, except in the demo config,
    which says why not (its comparisons section)."""
    assert {p.name for p in COMPARING} >= {"config.yaml", "brats.yaml", "abdomenct1k.yaml", "hippocampus_cpu.yaml"}
    cfg = load_config(path, check_paths=False)
    assert cfg.comparisons
    gem3d = registry.budget(cfg, "gem3d")
    for name in cfg.comparisons:
        b = registry.budget(cfg, name)
        assert 1 / 1.5 <= b.parameters / gem3d.parameters <= 1.5, (name, b.parameters, gem3d.parameters)
        if path.name == "config.yaml" and b.samples != gem3d.samples:  # the config states the figure it gives
            comments = re.sub(r"\n#\s*", " ", path.read_text())
            assert "NOT GEM-3D's" in comments and f"({b.samples:,})" in comments, (name, b.samples)
        else:
            assert b.samples == gem3d.samples, (name, b.samples, gem3d.samples)


def test_budgets_script_prints_every_method():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "budgets.py"), "config/hippocampus_cpu.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "config/hippocampus_cpu.yaml"
    assert [line.split()[0] for line in lines[1:]] == ["gem3d", "baseline", "controlnet", "crossattn", "pix2pix",
                                                        "ldm3d"]
    assert all("optimizer steps x batch" in line and "resampling:" in line for line in lines[1:])
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "budgets.py"), "missing.yaml"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip() == "error: missing.yaml: config file not found"


def test_cross_attention_with_a_frozen_encoder_trains_samples_and_refuses_another(run_copy, tmp_path):
    """volume_model.crossattn_encoder (the paper's CLIP-like frozen image embedding instead of the trained tokenizer):
    both stages train with it, the model file and every sampled volume record its weights file's digest, and
    sampling with another weights file is refused."""
    import torch
    from torchvision.models import resnet50

    from gem3d.io import file_sha256
    from gem3d.sampling.sample_sets import merge_shards, sample_set
    from gem3d.training.checkpoint import load_checkpoint

    def encoder_file(name, seed):
        torch.manual_seed(seed)
        path = tmp_path / name
        torch.save(resnet50(weights=None).state_dict(), path)  # random weights in torchvision's layout
        return path

    def config(weights):
        raw = tiny_raw(**{"volume_model.crossattn_encoder": {"extractor": "radimagenet_resnet50",
                                                              "weights": str(weights)}})
        raw["comparisons"] = ["crossattn"]
        return config_from_dict(raw, source="tiny-frozen", check_paths=True)

    weights = encoder_file("encoder.pth", 0)
    cfg = config(weights)
    assert "frozen radimagenet_resnet50" in registry.budget(cfg, "crossattn").text()
    pipeline.train_volume(cfg, 1, "crossattn")
    pipeline.train_volume(cfg, 2, "crossattn")
    payload = load_checkpoint(Paths(cfg).model("crossattn_stage2"), expect_kind="unet")
    assert payload["model_args"]["injection"] == "crossattn_frozen"
    assert payload["extra"]["crossattn_encoder"]["sha256"] == file_sha256(weights)
    sample_set(cfg, "test_crossattn")
    merge_shards(cfg, "test_crossattn", 1)
    manifest = read_json(Paths(cfg).samples("test_crossattn") / "manifest.json")
    assert {v["checkpoints"]["crossattn_encoder"] for v in manifest["volumes"]} == {file_sha256(weights)}
    with pytest.raises(InputError, match=r"crossattn_stage2\.pt: trained with another frozen encoder"):
        sample_set(config(encoder_file("other.pth", 1)), "test_crossattn")
