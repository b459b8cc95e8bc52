"""gem3d.resources: the job sizes the Snakemake rules declare (memory, wall time, GPUs)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import yaml

from conftest import REPO
from gem3d import resources as R
from gem3d.config import config_from_dict, load_config
from gem3d.fingerprint import STAGE_KEYS

RULES = [r for r in STAGE_KEYS]  # every rule of the workflow (train_segmentation_<data>: "train_segmentation")


def _reference(**overrides):
    """The measured setup (gem3d.resources.REFERENCE) with dotted-key overrides, independent of config/*.yaml."""
    raw = {"name": "ref", "data": {"format": "brats", "path": "data", "labels": {"background": 0, "tumour": 1}},
           **copy.deepcopy(R.REFERENCE)}
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(raw, source="reference", check_paths=False)


def test_measured_setup_gets_the_measured_step_times():
    cfg = _reference(**{"volume_model.stage1.steps": 150_000})
    for network, seconds in R.PAPER_STEP_S.items():
        assert R.step_seconds(cfg, network) == pytest.approx(seconds)
    assert R.window_step_seconds(cfg) == pytest.approx(R.WINDOW_STEP_S)
    # 150k stage-1 steps at 0.185 s, with the safety factor and the fixed overhead, in minutes
    size = R.job_size(cfg, "train_volume_stage1")
    assert size.runtime == math.ceil(R.OVERHEAD_MIN + R.SAFETY * 150_000 * 0.185 / 60)
    assert size.gpu == 1


def test_step_time_scales_with_the_work_of_a_step():
    half = _reference(**{"preprocess.slice_size": 256})  # a quarter of the pixels
    for network in ("vae", "volume_stage1", "volume_stage2", "slice_model"):
        assert R.step_seconds(half, network) == pytest.approx(R.PAPER_STEP_S[network] / 4)
    # a global batch of 8 windows (micro-batched on the job's one GPU) costs 8 windows
    batch = _reference(**{"volume_model.stage1.batch_size": 8})
    assert R.step_seconds(batch, "volume_stage1") == pytest.approx(8 * R.PAPER_STEP_S["volume_stage1"])


def test_runtime_follows_the_steps():
    short = R.job_size(_reference(**{"vae.train.steps": 10_000}), "train_vae")
    long = R.job_size(_reference(**{"vae.train.steps": 40_000}), "train_vae")
    assert (long.runtime - R.OVERHEAD_MIN) == pytest.approx(4 * (short.runtime - R.OVERHEAD_MIN), abs=4)


def test_small_networks_get_the_measured_demo_step_time():
    demo = load_config(REPO / "config" / "config.yaml", check_paths=False)
    for network, seconds in R.DEMO_STEP_S.items():
        assert R.step_seconds(demo, network) == pytest.approx(seconds)
    for rule in ("train_vae", "train_slice_model", "train_volume_stage1", "train_volume_stage2", "sample_shard"):
        assert R.job_size(demo, rule).runtime == R.MIN_RUNTIME_MIN, rule  # minutes of CPU work at most


def test_nnunet_runtime_is_epochs_times_iterations():
    seg = {"iterations_per_epoch": 250, "val_iterations": 50}
    a = R.job_size(_reference(**{"evaluation.segmentation": {**seg, "epochs": 500}}), "train_segmentation")
    b = R.job_size(_reference(**{"evaluation.segmentation": {**seg, "epochs": 1000}}), "train_segmentation")
    minutes = R.SAFETY * 500 * (250 + 50) * R.NNUNET_ITERATION_S / 60
    assert b.runtime - a.runtime == pytest.approx(minutes, abs=1)
    assert b.gpu == 1


@pytest.mark.parametrize("config", ["config.yaml", "brats.yaml", "abdomenct1k.yaml"])
def test_every_rule_has_a_size_and_only_gpu_stages_ask_for_a_gpu(config):
    cfg = load_config(REPO / "config" / config, check_paths=False)
    for rule in RULES:
        size = R.job_size(cfg, rule, wildcards={"shards": "8"})
        assert size.runtime >= R.MIN_RUNTIME_MIN and size.mem_mb >= R.BASE_MEM_MB, rule
        assert size.gpu == (rule in R.GPU_RULES), rule
    assert not {"import_data", "preprocess_nnunet", "merge_samples", "evaluate_privacy", "render_tables"} & set(
        R.GPU_RULES)


def test_a_retry_gets_more_memory_and_time():
    cfg = _reference()
    first, second = (R.job_size(cfg, "sample_shard", wildcards={"shards": "8"}, attempt=a) for a in (1, 2))
    assert second.mem_mb == 2 * first.mem_mb and second.runtime == 2 * first.runtime
    # a training resumes on the retry: the same time (a partition's MaxTime stays enough), more memory
    first, second = (R.job_size(cfg, "train_slice_model", attempt=a) for a in (1, 2))
    assert second.mem_mb == 2 * first.mem_mb and second.runtime == first.runtime


def test_more_shards_shorten_each_sampling_job():
    cfg = _reference()
    one, eight = (R.job_size(cfg, "sample_shard", wildcards={"shards": n}).runtime for n in ("1", "8"))
    assert eight < one / 4


def test_data_size_comes_from_the_run_once_it_exists(tmp_path):
    cfg = _reference(**{"data.max_cases": 40, "data.test_fraction": 0.2})
    assert R.data_size(cfg, tmp_path) == R.DataSize(n_train=32, n_test=8, depth=R.DEFAULT_DEPTH)
    (tmp_path / "split.json").write_text(json.dumps({"train": [f"c{i}" for i in range(7)], "test": ["t1", "t2"]}))
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "index.json").write_text(json.dumps(
        {"cases": {"c0": {"shape": [4, 120, 64, 64]}, "c1": {"shape": [4, 150, 64, 64]}}}))
    assert R.data_size(cfg, tmp_path) == R.DataSize(n_train=7, n_test=2, depth=150)
    small = R.job_size(cfg, "sample_shard", tmp_path, {"shards": "1"})
    assert small.runtime < R.job_size(cfg, "sample_shard", None, {"shards": "1"}).runtime


def test_latents_in_memory_set_the_diffusion_trainings_memory(tmp_path):
    cfg = _reference()
    (tmp_path / "split.json").write_text(json.dumps({"train": [f"c{i}" for i in range(1000)], "test": ["t"]}))
    big = R.job_size(cfg, "train_volume_stage1", tmp_path).mem_mb
    (tmp_path / "split.json").write_text(json.dumps({"train": [f"c{i}" for i in range(100)], "test": ["t"]}))
    small = R.job_size(cfg, "train_volume_stage1", tmp_path).mem_mb
    # 900 cases x 160 slices x 4 x 64 x 64 latents x 2 (image, mask) x 2 bytes, x 1.5 held, x SAFETY
    assert big - small == pytest.approx(900 * 160 * 4 * 64 * 64 * 4 / 1e6 * 1.5 * R.SAFETY, rel=0.01)


@pytest.mark.parametrize("env, expected", [
    ({"CUDA_VISIBLE_DEVICES": "0"}, 1),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 1),  # local jobs all compute on the first GPU
    ({"CUDA_VISIBLE_DEVICES": ""}, 0),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
    ({"CUDA_VISIBLE_DEVICES": "0", "GEM3D_DEVICE": "cpu"}, 0),
])
def test_local_gpu_limit(env, expected):
    assert R.local_gpu_limit(env) == expected


@pytest.mark.parametrize("config, threads", [("config.yaml", 1), ("hippocampus_cpu.yaml", 1),
                                             ("hippocampus_study.yaml", 1), ("hippocampus.yaml", 4),
                                             ("brats.yaml", 4), ("brats_release.yaml", 4)])
def test_cpu_scale_networks_get_one_thread_per_job(config, threads):
    """Demo-sized networks run one thread per job (two jobs side by side on 2 cores); GPU-sized ones keep 4."""
    cfg = load_config(REPO / "config" / config, check_paths=False)
    assert R.job_threads(cfg, 4) == threads
    assert R.job_threads(cfg, 2) == min(2, threads)


def test_one_wider_network_makes_the_config_threaded():
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["volume_model"]["model"]["model_channels"] = 224
    raw["volume_model"]["model"]["head_dim"] = 32
    raw["volume_model"]["model"]["norm_groups"] = 32
    assert R.job_threads(config_from_dict(raw, check_paths=False), 4) == 4


def test_jobs_that_hold_whole_files_or_datasets_ask_for_that_memory(tmp_path):
    """Found in review (config/brats.yaml): 3D Pix2Pix holds every training volume at its volume_size (about 9.7 GB
    for 387 cases, it asked for 8 GB whatever the case count), and the training-curves figure reads whole model
    files (6.4 GB for the slice model; it asked for 2 GB)."""
    brats = load_config(REPO / "config" / "brats.yaml", check_paths=False)
    (tmp_path / "split.json").write_text(json.dumps({"train": [f"c{i}" for i in range(387)], "test": ["t"]}))
    voxels = math.prod(brats.pix2pix.volume_size)
    pix2pix = R.job_size(brats, "train_pix2pix", tmp_path).mem_mb
    assert pix2pix >= R.SAFETY * 387 * voxels * 3 / 1e6
    (tmp_path / "split.json").write_text(json.dumps({"train": [f"c{i}" for i in range(38)], "test": ["t"]}))
    assert R.job_size(brats, "train_pix2pix", tmp_path).mem_mb < pix2pix
    (tmp_path / "models").mkdir()
    with open(tmp_path / "models" / "slice_model.pt", "wb") as f:
        f.truncate(20_000_000_000)  # a sparse 20 GB model file
    assert R.job_size(brats, "figure_training_curves", tmp_path).mem_mb >= 20_000 * R.SAFETY
    assert R.job_size(brats, "figure_training_curves", None).mem_mb >= R.IMPORT_MB  # before any model exists
