"""A run on the authors' released networks, no training: the release files (here the shared fixture's runs,
tiny and random, made consistent: one first stage for all, as the real release has) become the run's model
files, which sample like trained ones, with the files' SHA-256 in every volume's provenance."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_FIXTURES, tiny_raw, with_changes
from gem3d import pipeline
from gem3d.config import config_from_dict
from gem3d.io import InputError, read_json
from gem3d.models.weights_file import read_state_dict
from gem3d.paths import Paths
from gem3d.sampling import stages
from gem3d.sampling.generate import load_unet
from gem3d.sampling.sets import SampleSet
from gem3d.training.checkpoint import sha256_of

RELEASE = SHARED_FIXTURES / "gem3d-release-layout"
NET = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "head_dim": 8,
       "norm_groups": 32}

pytestmark = pytest.mark.skipif(not (RELEASE / "reference.pt").is_file(),
                                reason=f"release-layout fixture absent at {RELEASE} (set GEM3D_SHARED_FIXTURES)")


def consistent_release(root):
    """The fixture's runs with brain_stage2's first stage in all of them (each fixture run has its own)."""
    first = {k: v for k, v in read_state_dict(RELEASE / "brain_stage2/checkpoints/last.ckpt").items()
             if k.startswith("first_stage_model.")}
    for name in ("brain_stage1", "brain_stage2", "brain_base_stage2", "brain_slice"):
        shutil.copytree(RELEASE / name, root / name)
        state = {**read_state_dict(RELEASE / name / "checkpoints/last.ckpt"), **first}
        torch.save({"state_dict": state}, root / name / "checkpoints" / "last.ckpt")
    return root


def release_raw(release) -> dict:
    return tiny_raw(**{
        "vae.model": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "latent_channels": 4},
        "vae.pretrained": str(release / "brain_stage2"),
        "slice_model.model": NET, "slice_model.position_dim": 32,
        "slice_model.pretrained": str(release / "brain_slice"),
        "volume_model.window": 16, "volume_model.model": {**NET, "ff_mult": 0},
        "volume_model.pretrained": {"stage1": str(release / "brain_stage1"), "stage2": str(release / "brain_stage2")},
        "volume_model.baseline_pretrained": {"stage2": str(release / "brain_base_stage2")},
        "sampling.solver": "ddim", "sampling.ddim_spacing": "ldm", "sampling.steps": 4, "sampling.eta": 1.0,
        "sampling.sets": {"IC": {"informed": "IC"}, "IG": {"informed": "IG"}},
        "sampling.enhancement_multiples": [1]})


def test_a_run_on_release_networks_imports_instead_of_training(run_copy, tmp_path):
    release = consistent_release(tmp_path / "release")
    cfg = config_from_dict(release_raw(release), source="release", check_paths=False)
    paths = Paths(cfg)
    pipeline.train_vae(cfg)
    assert read_json(paths.vae_metrics)["scale_factor"] == pytest.approx(0.18215)  # the yaml's, not measured
    pipeline.encode(cfg)
    for model in ("slice_model", "volume_stage1", "volume_stage2", "baseline_stage2"):
        pipeline.import_network(cfg, model)
    with pytest.raises(InputError, match=r"volume_stage2 is given as a file .*gem3d import-network --model"):
        pipeline.train_volume(cfg, 2, "gem3d")

    net, extra = load_unet(paths.model("volume_stage2"), "cpu", cfg, "volume")
    assert net.config.attention == "ldm" and net.config.slice_axis and extra["window"] == 16
    source_sha = sha256_of(release / "brain_stage2/checkpoints/last.ckpt", None)
    assert extra["pretrained"]["sha256"] == source_sha and extra["pretrained"]["weights"] == "live"

    for name in ("IC", "IG", "test_gem3d", "baseline"):
        stages.sample(cfg, name)
        stages.merge_samples(cfg, name)
    volume = read_json(paths.samples("IC") / "manifest.json")["volumes"][0]
    assert volume["checkpoints"]["volume_stage2.pretrained"] == source_sha
    assert volume["checkpoints"]["vae.pretrained"] == source_sha  # the VAE is that run's first stage

    # DPM-Solver++ (SDE) on the release networks: gem3d's faster solver with its exact pinning
    fast = config_from_dict(with_changes(release_raw(release), {"sampling.solver": "dpmpp_2m", "sampling.steps": 3}),
                            source="release", check_paths=False)
    stages.sample(fast, "test_gem3d")
    stages.merge_samples(fast, "test_gem3d")
    assert read_json(paths.samples("test_gem3d") / "manifest.json")["volumes"][0]["checkpoints"][
        "volume_stage2.pretrained"] == source_sha

    # a stage 1 not given is the given stage 2's 2D part (stage 2 trains only the slice-axis layers)
    only_stage2 = with_changes(release_raw(release), {"volume_model.pretrained": {"stage2": str(release / "brain_stage2")}})
    pipeline.import_network(config_from_dict(only_stage2, source="release", check_paths=False), "volume_stage1")
    stage1, _ = load_unet(paths.model("volume_stage1"), "cpu", cfg, "volume")
    assert not stage1.config.slice_axis
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in stage1.state_dict().items())
    ig = read_json(paths.samples("IG") / "manifest.json")["volumes"][0]["checkpoints"]
    assert ig["slice_model.pretrained"] == sha256_of(release / "brain_slice/checkpoints/last.ckpt", None)
    image, label = SampleSet.open(cfg, "IC").load(volume)
    assert image.shape == label.shape and -1 <= image.min() and image.max() <= 1


def test_release_networks_that_do_not_fit_the_run_are_one_line(run_copy, tmp_path):
    release = consistent_release(tmp_path / "release")
    raw = release_raw(release)
    cfg = config_from_dict(raw, source="release", check_paths=False)
    pipeline.train_vae(cfg)
    pipeline.encode(cfg)
    other = tmp_path / "other" / "brain_stage2"  # the same network with another run's first stage
    shutil.copytree(release / "brain_stage2", other)
    state = read_state_dict(other / "checkpoints/last.ckpt")
    state.update({k: v for k, v in read_state_dict(RELEASE / "brain_slice/checkpoints/last.ckpt").items()
                  if k.startswith("first_stage_model.")})
    torch.save({"state_dict": state}, other / "checkpoints" / "last.ckpt")
    cases = [
        ({"volume_model.model": {**NET, "ff_mult": 0, "model_channels": 64}},
         r"config key volume_model\.model\.model_channels: 64, but the volume_stage2 network of .* has model_channels 32"),
        ({"volume_model.window": 8}, r"config key volume_model\.window: 8, but the authors' pseudo-3D layers"),
        ({"diffusion.beta_end": 0.02}, r"config key diffusion\.beta_end: 0\.02, but the network of .* 0\.012"),
        ({"volume_model.pretrained": {"stage2": str(other)}},
         r"its first stage \(first_stage_model\.\*\) differs from this run's VAE"),
        ({"volume_model.pretrained": {"stage2": str(release / "brain_stage1")}},
         r"a 2D \(stage 1 or slice\) network, but volume_model\.pretrained\.stage2 is the volume_stage2"),
        ({"volume_model.pretrained": {"stage2": str(release / "brain_base_stage2")}},
         r"has in_channels 8"),
    ]
    for changes, match in cases:
        bad = config_from_dict(with_changes(raw, changes), source="release", check_paths=False)
        with pytest.raises(InputError, match=match) as err:
            pipeline.import_network(bad, "volume_stage2")
        assert "\n" not in str(err.value)


def test_the_dag_imports_the_given_networks_and_trains_none(tmp_path):
    """`snakemake -n`: with every network given, no train rule runs but train_vae (which only imports and
    measures the VAE); the import rules read the release files."""
    import yaml

    release = consistent_release(tmp_path / "release")
    raw = release_raw(release)
    raw["comparisons"] = []
    (tmp_path / "release.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--quiet", "rules",
                          "--snakefile", str(REPO / "workflow" / "Snakefile"),
                          "--configfile", str(tmp_path / "release.yaml")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = out.stdout
    assert "import_network" in plan and "train_vae" in plan
    for rule in ("train_slice_model", "train_volume_stage1", "train_volume_stage2"):
        assert rule not in plan, (rule, plan)
