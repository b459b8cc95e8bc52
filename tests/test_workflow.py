"""The Snakemake DAG: a dry run for every shipped config, and the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from gem3d.cli import main

CONFIGS = sorted((REPO / "config").glob("*.yaml"))
BIN = Path(sys.executable).parent


def snakemake(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`snakemake` of the venv on the repository's Snakefile in `cwd` (`env`: variables beside os.environ's)."""
    env = dict(os.environ, **(env or {}), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(cwd), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def stand_in_weights(cfg_path: Path, workdir: Path) -> None:
    """Empty files where the config expects its weights and released networks (a release run: its checkpoint and
    project yaml); they are inputs of the rules; a dry run loads none. A split file the config names (relative to
    the repository root, where users run Snakemake) is copied to the same place in the working directory."""
    raw = yaml.safe_load(cfg_path.read_text())
    split = raw.get("data", {}).get("split")
    if isinstance(split, str):
        (workdir / split).parent.mkdir(parents=True, exist_ok=True)
        (workdir / split).write_bytes((REPO / split).read_bytes())
    evaluation = raw.get("evaluation", {})
    for key in ("fid_weights", "lpips_backbone_weights", "lpips_lin_weights"):
        if evaluation.get(key):
            (workdir / evaluation[key]).parent.mkdir(parents=True, exist_ok=True)
            (workdir / evaluation[key]).touch()
    runs = [raw.get("vae", {}).get("pretrained"), raw.get("slice_model", {}).get("pretrained")]
    for key in ("pretrained", "baseline_pretrained"):
        runs += list((raw.get("volume_model", {}).get(key) or {}).values())
    for run in filter(None, runs):
        for part in ("checkpoints/last.ckpt", "configs/2024-01-01T00-00-00-project.yaml"):
            (workdir / run / part).parent.mkdir(parents=True, exist_ok=True)
            (workdir / run / part).touch()


def lint_findings(output: str) -> set[str]:
    """Titles of `snakemake --lint`'s findings."""
    return {line.strip()[2:].rstrip(":") for line in output.splitlines() if line.startswith("    * ")}


# The rules run in the environment Snakemake runs in (no `conda:` directive, see tests/test_envs.py): the
# linter's only complaint, once per rule.
NO_SOFTWARE_LINT = "Specify a conda environment or container for each rule."


@pytest.mark.parametrize("cfg_path", CONFIGS, ids=lambda p: p.name)
def test_dry_run_every_config(tmp_path, cfg_path):
    """Every shipped config plans its whole DAG before its data exist (data.path is the import job's check)."""
    stand_in_weights(cfg_path, tmp_path)
    res = snakemake(["-n", "--configfile", str(cfg_path)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = res.stdout + res.stderr
    for rule in ("import_data", "preprocess_nnunet", "build_slices", "train_vae", "sample_shard", "render_tables"):
        assert rule in out


def test_planning_commands_work_without_the_data(tmp_path):
    cfg = REPO / "config" / "brats.yaml"
    stand_in_weights(cfg, tmp_path)
    assert not (tmp_path / yaml.safe_load(cfg.read_text())["data"]["path"]).exists()
    for args in (["-n"], ["--dag"], ["--list-rules"]):
        res = snakemake([*args, "--configfile", str(cfg)], tmp_path)
        assert res.returncode == 0, (args, res.stderr[-3000:])
    assert "digraph" in snakemake(["--dag", "--configfile", str(cfg)], tmp_path).stdout
    lint = snakemake(["--lint", "--configfile", str(cfg)], tmp_path)
    assert lint_findings(lint.stdout + lint.stderr) == {NO_SOFTWARE_LINT}, (lint.stdout + lint.stderr)[-3000:]
    # the report needs a finished run; without one it names the first missing figure, not the data
    report = snakemake(["--report", "report.html", "--configfile", str(cfg)], tmp_path)
    out = report.stdout + report.stderr
    assert "marked for report but does not exist" in out and "data.path" not in out, out[-3000:]


def test_import_job_checks_the_data_path(tmp_path):
    cfg = REPO / "config" / "brats.yaml"
    stand_in_weights(cfg, tmp_path)
    res = snakemake(["results/brats/split.json", "--cores", "1", "--configfile", str(cfg)], tmp_path)
    assert res.returncode != 0
    data_path = yaml.safe_load(cfg.read_text())["data"]["path"]
    log = (tmp_path / "results" / "brats" / "logs" / "import_data.log").read_text().strip().splitlines()
    assert log[-1].startswith("error:") and "data.path" in log[-1] and data_path in log[-1], log[-3:]


def test_missing_weights_file_fails_the_plan(tmp_path):
    """A configured weights file is an input of the evaluation that reads it: the dry run names it."""
    res = snakemake(["-n", "--configfile", str(REPO / "config" / "brats.yaml")], tmp_path)
    assert res.returncode != 0
    assert "weights/RadImageNet-ResNet50_notop.pth" in res.stdout + res.stderr


def test_an_extractor_without_its_weights_fails_the_plan_that_holds_table_1(tmp_path):
    """Found in the ninth session: radimagenet_resnet50 / inception_v3 with no evaluation.fid_weights planned, ran
    every training and failed in evaluate_generation at the end. Refused at load it would refuse every config without
    an evaluation section (the default extractor loads weights), so the plan of Table 1 refuses it."""
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["evaluation"]["fid_extractor"] = "radimagenet_resnet50"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = snakemake(["-n", "--configfile", str(cfg)], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert f"{cfg}: evaluation.fid_weights is not set: the radimagenet_resnet50 extractor" in out, out[-3000:]
    # a plan without Table 1 (the downstream study) needs no extractor
    res = snakemake(["-n", f"results/{raw['name']}/tables/segmentation.csv", "--configfile", str(cfg)], tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]


def test_weights_files_are_inputs_of_the_evaluations(tmp_path):
    cfg = REPO / "config" / "brats.yaml"
    stand_in_weights(cfg, tmp_path)
    res = snakemake(["-n", "--configfile", str(cfg)], tmp_path)
    inputs = dict(re.findall(r"rule (\w+):\n    input: ([^\n]*)", res.stdout))
    assert "weights/RadImageNet-ResNet50_notop.pth" in inputs["evaluate_generation"]
    assert "weights/alexnet-owt-7be5be79.pth" in inputs["evaluate_fidelity"]
    assert "weights/" not in inputs["evaluate_privacy"]


def test_configfile_that_is_a_target_is_named(tmp_path):
    """`--configfile CONFIG TARGET` makes TARGET a second config file: the error says to put targets first."""
    target = tmp_path / "results" / "demo" / "samples" / "IC" / "manifest.json"
    target.parent.mkdir(parents=True)
    target.write_text('{"volumes": []}')  # an existing JSON file: Snakemake reads it as a config
    config = str(REPO / "config" / "config.yaml")
    for args in (["--configfile", config, "results/demo/samples/IC/manifest.json"],
                 ["--configfile", "results/demo/samples/IC/manifest.json"]):
        res = snakemake(["-n", *args], tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "looks like a target" in out and "BEFORE --configfile" in out, out[-2000:]


def test_rules_declare_the_resources_of_gem3d_resources(tmp_path):
    from gem3d import resources
    from gem3d.config import load_config

    cfg_path = REPO / "config" / "brats.yaml"
    stand_in_weights(cfg_path, tmp_path)
    res = snakemake(["-n", "--configfile", str(cfg_path)], tmp_path)
    declared = dict(re.findall(r"rule (\w+):\n(?:    [^\n]*\n)*?    resources: ([^\n]*)", res.stdout))
    cfg = load_config(cfg_path, check_paths=False)
    for rule, key in (("train_vae", "train_vae"), ("train_volume_stage1", "train_volume_stage1"),
                      ("train_segmentation_real", "train_segmentation"), ("evaluate_privacy", "evaluate_privacy")):
        size = resources.job_size(cfg, key, wildcards={"data": "real"})
        assert f"runtime={size.runtime}," in declared[rule] and f"mem_mb={size.mem_mb}," in declared[rule], (
            rule, declared[rule])


LOCAL_GPU_PROBE = """\
include: "{snakefile}"


rule probe_a:
    output: "probe/a.txt"
    resources: gpu=1
    shell: "touch probe/running.a; sleep 3; ls probe | grep running > {{output}}; rm probe/running.a"


rule probe_b:
    output: "probe/b.txt"
    resources: gpu=1
    shell: "touch probe/running.b; sleep 3; ls probe | grep running > {{output}}; rm probe/running.b"
"""


@pytest.mark.parametrize("extra, alone", [([], True), (["--resources", "gpu=2"], False)])
def test_local_gpu_jobs_share_no_card(tmp_path, monkeypatch, extra, alone):
    """Locally, with a GPU visible, `gpu=1` jobs run one at a time unless `--resources gpu=N` says otherwise."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("GEM3D_DEVICE", raising=False)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe.smk").write_text(LOCAL_GPU_PROBE.format(snakefile=REPO / "workflow" / "Snakefile"))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    cmd = [str(BIN / "snakemake"), "-s", "probe.smk", "probe/a.txt", "probe/b.txt", "--cores", "2", "--configfile",
           str(REPO / "config" / "config.yaml"), *extra]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [(tmp_path / "probe" / f"{p}.txt").read_text().split() for p in "ab"]
    assert all(len(s) == 1 for s in seen) == alone, seen


def test_dry_run_rejects_bad_config(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["preprocess"]["bogus"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = snakemake(["-n", "--configfile", str(bad)], tmp_path)
    assert res.returncode != 0
    assert "unknown key at preprocess" in res.stderr + res.stdout and "bogus" in res.stderr + res.stdout


def test_cli_lists_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("phantoms", "import", "preprocess", "slices"):
        assert stage in out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "data": {"format": "folder", "path": str(tmp_path / "missing"),
                                                         "labels": {"background": 0, "a": 1}}}))
    assert main(["import", "--config", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "missing does not exist" in err[0]


def test_cli_stage_options_reach_the_function(monkeypatch, tmp_path):
    """`--stage` of train-volume must not clash with the subcommand name."""
    import gem3d.pipeline as pipeline
    from gem3d.cli import all_commands

    seen = {}
    command = all_commands()["train-volume"]
    monkeypatch.setitem(pipeline.COMMANDS, "train-volume",
                        type(command)(lambda cfg, **kw: seen.update(kw), command.help, command.args))
    assert main(["train-volume", "--stage", "2", "--model", "baseline", "--config",
                 str(REPO / "config" / "config.yaml")]) == 0
    assert seen == {"stage": 2, "model": "baseline"}


def test_readme_quick_start_has_two_blocks_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    assert len(blocks) == 2, "Quick start must hold exactly two fenced code blocks"
    run_demo, run_tests = (b.split("\n", 1)[1].strip() for b in blocks)
    assert "snakemake" in run_demo and "pip install" in run_demo
    assert run_tests in (REPO / ".ci" / "run").read_text(), "CI must run the README's test command"


def job_counts(res: subprocess.CompletedProcess) -> dict[str, int]:
    """A `snakemake -n`'s jobs per rule (its 'Job stats' table); empty for 'Nothing to be done'."""
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    if "Nothing to be done" in out:
        return {}
    match = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal\s+\d+", out, re.S)
    assert match, out[-3000:]
    return {line.split()[0]: int(line.split()[1]) for line in match.group(1).splitlines() if line.strip()}


def test_generation_masks_plan_one_generate_job_per_shard(tmp_path):
    """generation.masks makes `gem3d generate` a target: one job per shard, after the networks it samples with."""
    masks = tmp_path / "my_masks"
    masks.mkdir()
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["generation"] = {"masks": str(masks), "shards": 2}
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    counts = job_counts(snakemake(["generate_all", "-n", "--configfile", str(cfg)], tmp_path))
    assert counts.get("generate") == 2 and counts.get("train_volume_stage2") == 1, counts
    assert "sample_shard" not in counts  # the Table-1 sets are not needed for it


def test_the_generate_rule_reruns_for_an_edited_mask_in_its_folder(tmp_path):
    """Found in review: generation.masks is a folder input, whose time does not move when a mask in it is rewritten,
    so an edited mask generated nothing new; the rule's params now hold the content of the masks, the region and
    the informed image (content_digest, as the import's input digest), and a touch changes nothing."""
    import os
    import time

    from gem3d.data.input_digest import content_digest

    masks, cache = tmp_path / "masks", tmp_path / "cache.json"
    masks.mkdir()
    (masks / "a.nii.gz").write_bytes(b"mask a")
    image = tmp_path / "informed.nii.gz"
    image.write_bytes(b"image")

    def digest():
        return content_digest({"masks": str(masks), "region": None, "informed_image": str(image)}, cache)

    first = digest()
    for path in (masks / "a.nii.gz", image):
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert digest() == first  # touched: the same content
    (masks / "a.nii.gz").write_bytes(b"mask a, edited")
    edited = digest()
    assert edited != first
    image.write_bytes(b"another image")
    assert digest() != edited
    assert 'content_digest({"masks": CFG.generation.masks' in (REPO / "workflow" / "rules" / "sampling.smk").read_text()


@pytest.mark.parametrize("shards", [1, 3])
def test_a_set_of_one_shard_needs_no_merge_job(tmp_path, shards):
    """#26: every set of the demo had a merge job of its one shard (18 jobs, 3 s of start-up each); with one
    shard the sampling job writes the set, with more each set gets its shards and one merge."""
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["sampling"]["shards"] = shards
    cfg = tmp_path / "shards.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = snakemake(["-n", "-p", "--configfile", str(cfg)], tmp_path)
    counts = job_counts(res)
    sets = counts["sample_shard"] // shards
    assert sets >= 10 and counts["sample_shard"] == sets * shards, counts
    assert counts.get("merge_samples", 0) == (sets if shards > 1 else 0), counts
    # each job samples the shard its output names
    jobs = re.findall(r"gem3d sample --set (\w+) --shard (\d+) --shards (\d+) .*sample_shard/(\w+)\.(\d+)of(\d+)\.log",
                      res.stdout)
    assert len(jobs) == sets * shards and all(j[:3] == j[3:] and j[2] == str(shards) for j in jobs), jobs[:3]


def _set_digests(edit=None) -> dict[str, str]:
    """Every sample set's shard fingerprint (the Snakefile's param) for the tiny run with the comparisons."""
    from conftest import tiny_raw
    from test_comparisons import COMPARISONS
    from gem3d.config import config_from_dict
    from gem3d.fingerprint import config_digest
    from gem3d.sampling.sets import set_config_keys, set_names

    raw = {**tiny_raw(), **COMPARISONS}
    raw["sampling"]["sets"]["IG_MA"] = {"informed": "IG", "augment": True}
    if edit:
        edit(raw)
    cfg = config_from_dict(raw, source="tiny", check_paths=False)
    return {name: config_digest(cfg, "sample_shard", set_config_keys(cfg, name)) for name in set_names(cfg)}


def test_each_sample_set_hashes_only_what_it_reads():
    """Issue #24.6: an augmentation or fit-guard edit resampled every set (test sets, Pix2Pix, the 3D LDM) at
    DDIM 200 on a cluster; each set's fingerprint now holds the keys it reads."""
    base = _set_digests()
    assert {"test_gem3d", "test_pix2pix", "pix2pix", "ldm3d", "deenhanced", "IC_copy1"} <= set(base)

    def changed(edit) -> set[str]:
        return {name for name, value in _set_digests(edit).items() if name in base and value != base[name]}

    assert changed(lambda raw: raw.setdefault("augmentation", {}).update(max_rotation_deg=2.0)) == {"IC_MA", "IG_MA"}
    assert changed(lambda raw: raw["sampling"].update(fit={"min_dice": 0.85})) == {"IC", "IC_MA", "IC_copy1"}
    assert changed(lambda raw: raw["sampling"].update(deenhance_informed="synthetic_000:3")) == {"deenhanced"}
    assert changed(lambda raw: raw["sampling"].update(overlap=2)) == set(base) - {"pix2pix", "test_pix2pix",
                                                                                   "ldm3d", "test_ldm3d"}
    assert changed(lambda raw: raw["sampling"].update(steps=3)) == set(base) - {"pix2pix", "test_pix2pix"}
    assert changed(lambda raw: raw["sampling"].update(seed=1)) == set(base)
    # found in review: the DDIM timestep grid (the release configs' "ldm") was in no set's fingerprint
    assert changed(lambda raw: raw["sampling"].update(ddim_spacing="ldm")) == set(base) - {"pix2pix", "test_pix2pix"}
    assert changed(lambda raw: raw["sampling"].update(volumes_per_batch=3)) == set()  # how it runs, not what
    assert changed(lambda raw: raw["sampling"]["sets"].update(IG_2={"informed": "IG"})) == set()  # a set added


def test_merging_reads_no_sampling_key():
    """Adding a set to sampling.sets merged every other set again (and so reran their evaluations)."""
    from conftest import tiny_raw
    from gem3d.config import config_from_dict
    from gem3d.fingerprint import config_digest

    raw = tiny_raw()
    more = tiny_raw(**{"sampling.sets.IG_2": {"informed": "IG"}, "sampling.fit": {"min_dice": 0.9}})
    assert config_digest(config_from_dict(raw, source="a", check_paths=False), "merge_samples") == \
        config_digest(config_from_dict(more, source="b", check_paths=False), "merge_samples")


def test_every_preprocessing_key_but_the_worker_count_reruns_the_slice_store():
    """preprocess.slice_fit and preprocess.intensity change every stored slice (stretch or letterbox, min-max over
    the volume or the region) but were outside build_slices' fingerprint: an edit reran nothing and every model and
    table stayed stale."""
    import dataclasses

    from conftest import tiny_raw
    from gem3d.config import PreprocessConfig, config_from_dict
    from gem3d.fingerprint import config_digest

    other = {"dataset_id": 902, "num_processes": 1, "slice_size": 64, "slice_fit": "stretch",
             "intensity": "volume"}
    assert set(other) | {"configuration"} == {f.name for f in dataclasses.fields(PreprocessConfig)}  # one value

    def digests(**changes):
        cfg = config_from_dict(tiny_raw(**changes), source="tiny", check_paths=False)
        return config_digest(cfg, "preprocess_nnunet"), config_digest(cfg, "build_slices")

    base = digests()
    for key, value in other.items():
        changed = digests(**{f"preprocess.{key}": value})
        assert (changed != base) == (key != "num_processes"), key
        if key not in ("dataset_id", "num_processes"):
            assert changed[1] != base[1], key  # the slice store itself, not only the nnU-Net step before it


def test_a_training_whose_lr_decays_does_not_resume_into_more_steps():
    """Found in review: the resume fingerprint drops `steps` (an N-step state starts an M-step run), but with
    `lr_decay` > 0 the schedule depends on the total: the first N steps of the M-step run had decayed already, and
    the resumed run differed from an uninterrupted one (pix2pix by default)."""
    from conftest import tiny_raw
    from gem3d.config import config_from_dict
    from gem3d.fingerprint import stage_fingerprint

    def resume_key(rule, **changes):
        return stage_fingerprint(config_from_dict(tiny_raw(**changes), source="tiny", check_paths=False), rule)

    assert resume_key("train_pix2pix", **{"pix2pix.train.steps": 8}) != resume_key("train_pix2pix")  # lr_decay 0.5
    assert resume_key("train_pix2pix", **{"pix2pix.train.steps": 8, "pix2pix.train.lr_decay": 0.0}) == \
        resume_key("train_pix2pix", **{"pix2pix.train.lr_decay": 0.0})
    assert resume_key("train_volume_stage1", **{"volume_model.stage1.steps": 99}) == resume_key("train_volume_stage1")


def test_vae_fingerprint_holds_its_micro_batch():
    """Issue #24.6: the VAE's posterior noise and adaptive adversarial weight are per micro-batch, so its split
    defines it (the other trainings' micro_batch stays execution-only)."""
    from conftest import tiny_raw
    from gem3d.config import config_from_dict
    from gem3d.fingerprint import config_digest, stage_fingerprint

    def digests(**changes):
        cfg = config_from_dict(tiny_raw(**changes), source="tiny", check_paths=False)
        return config_digest(cfg, "train_vae"), stage_fingerprint(cfg, "train_vae"), config_digest(
            cfg, "train_volume_stage1")

    vae, state, volume = digests()
    vae_micro, state_micro, _ = digests(**{"vae.train.micro_batch": 2})
    assert vae_micro != vae and state_micro != state
    assert digests(**{"volume_model.stage1.micro_batch": 1})[2] == volume
