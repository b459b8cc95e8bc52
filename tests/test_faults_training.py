"""Fault corpus: training state, checkpoints and model files (issue #15 items 1-4, 8).

Each test builds the fault, runs the real code path (the training loop, a pipeline stage or the
`gem3d` command) and checks the answer (one `error:` line, or a stated recovery) and what is left
on disk. Loop-level faults use the tiny MLP of test_training_loop; stage-level faults a private copy
of the session's tiny trained run.
"""

from __future__ import annotations

import fcntl
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

import test_training_loop as T
from conftest import TINY_CONFIG, assert_one_error
from gem3d import pipeline
from gem3d.cli import main as cli
from gem3d.config import config_from_dict
from gem3d.io import InputError, read_json, write_json
from gem3d.paths import Paths
from gem3d.training.checkpoint import exported_marker, load_checkpoint, previous_path

FP = {"config": {"vae": {"lr": 1.0}}, "inputs": {"slices": "abc"}}


def _run(path, steps=6, fingerprint=FP, **kw):
    warnings = []
    _, result = T.run(path, replace(T.CFG, steps=steps, checkpoint_every=3), fingerprint=fingerprint,
                      log=warnings.append, **kw)
    return result, warnings


def _flip(path, n=400, at=0.5):
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


# ---- loop level ------------------------------------------------------------------------------


def test_state_with_other_fingerprint_is_set_aside_and_training_starts_over(tmp_path):
    path = tmp_path / "a.ckpt"
    _run(path)
    other = {"config": {"vae": {"lr": 2.0}}, "inputs": {"slices": "abc"}}
    result, warnings = _run(path, steps=9, fingerprint=other)
    assert result.start_step == 0 and result.final_step == 9
    assert (tmp_path / "a.ckpt.stale").is_file() and load_checkpoint(tmp_path / "a.ckpt.stale")["step"] == 6
    assert [w for w in warnings if "other settings or data (vae.lr: 1.0 != 2.0" in w and "a.ckpt.stale" in w]
    assert load_checkpoint(path)["fingerprint"] == other


def test_changed_input_digest_starts_over_and_same_fingerprint_resumes(tmp_path):
    path = tmp_path / "a.ckpt"
    _run(path)
    result, _ = _run(path, steps=9)  # same fingerprint, more steps: resume
    assert result.start_step == 6
    result, warnings = _run(path, steps=9, fingerprint={**FP, "inputs": {"slices": "def"}})
    assert result.start_step == 0 and any("inputs.slices: 'abc' != 'def'" in w for w in warnings)


def test_state_without_fingerprint_is_not_resumed(tmp_path):
    path = tmp_path / "a.ckpt"
    _run(path, fingerprint=None)
    result, warnings = _run(path, steps=9)
    assert result.start_step == 0 and any("records no fingerprint" in w for w in warnings)


def test_tampered_tensor_fails_its_checksum(tmp_path):
    path = tmp_path / "m.pt"
    _run(path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.weight"] += 35493.0  # the corrupted EMA scale
    torch.save(payload, path)
    with pytest.raises(InputError, match=r"m.pt: checksum mismatch: the file is corrupt"):
        load_checkpoint(path)


def test_corrupt_state_falls_back_to_the_previous_good_one(tmp_path):
    path = tmp_path / "a.ckpt"
    _run(path, steps=9)  # checkpoints at 3, 6, 9: .prev holds step 6
    assert load_checkpoint(previous_path(path))["step"] == 6
    _flip(path)
    result, warnings = _run(path, steps=12)
    assert result.start_step == 6 and result.final_step == 12
    assert any("a.ckpt" in w and "resuming from the previous good state" in w and "(step 6)" in w for w in warnings)


def test_corrupt_state_without_older_one_is_refused(tmp_path):
    path = tmp_path / "a.ckpt"
    _run(path, steps=3)  # one checkpoint: no .prev
    assert not previous_path(path).exists()
    _flip(path)
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"a.ckpt: .*no older good state exists") as err:
        _run(path, steps=6)
    assert "\n" not in str(err.value) and path.read_bytes() == before  # kept for inspection


def test_second_trainer_of_one_state_is_refused(tmp_path):
    path = tmp_path / "a.ckpt"
    with open(tmp_path / "a.ckpt.lock", "a+") as held:  # another trainer holds the state
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match=r"a.ckpt: another process .* is training this state now"):
            _run(path)
    assert not path.exists()
    _run(path)  # lock released: trains


# ---- stage level (a private copy of the tiny run) -------------------------------------------


def _raw(**sections):
    """TINY_CONFIG with some sections updated key by key."""
    return {**TINY_CONFIG, **{section: {**TINY_CONFIG[section], **values} for section, values in sections.items()}}


def _cfg(**sections):
    return config_from_dict(_raw(**sections), source="tiny.yaml", check_paths=False)


def _write_config(path, **sections):
    path.write_text(yaml.safe_dump(_raw(**sections)))
    return str(path)


def _one_error_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert_one_error(rc, err, *needles)
    return err.strip().splitlines()[-1]


def test_changed_network_config_retrains_the_vae(run_copy, caplog):
    paths = Paths(run_copy)
    cfg = _cfg(vae={"model": {**TINY_CONFIG["vae"]["model"], "base_channels": 4}})
    caplog.set_level(logging.WARNING)
    pipeline.train_vae(cfg)
    payload = load_checkpoint(paths.model("vae"))
    assert payload["model_args"]["base_channels"] == 4 and payload["step"] == TINY_CONFIG["vae"]["train"]["steps"]
    assert paths.train_state("vae").with_name("vae.ckpt.stale").is_file()
    assert "vae.model.base_channels: 8 != 4" in caplog.text


def test_changed_slice_store_retrains_the_vae(run_copy, caplog):
    """A re-imported / re-preprocessed case changes the store's content digest: no stale reuse."""
    paths = Paths(run_copy)
    index = read_json(paths.slices / "index.json")
    case = sorted(index["cases"])[0]
    image = np.load(paths.slices / f"{case}_image.npy")
    np.save(paths.slices / f"{case}_image.npy", (image * 0.5).astype(image.dtype))
    index["cases"][case]["digest"] = "0" * 16  # as build_slices records the new content
    write_json(paths.slices / "index.json", index)
    before = load_checkpoint(paths.model("vae"))["checksum"]
    caplog.set_level(logging.WARNING)
    pipeline.train_vae(run_copy)
    assert "inputs.slices" in caplog.text and "training starts over" in caplog.text
    assert load_checkpoint(paths.model("vae"))["checksum"] != before


def test_forced_rerun_retrains_and_plain_rerun_does_nothing(run_copy, caplog):
    paths = Paths(run_copy)
    model = paths.model("volume_stage1")
    stamp = model.stat().st_mtime_ns
    pipeline.train_volume(run_copy, 1)  # finished, model present: nothing to do
    assert model.stat().st_mtime_ns == stamp
    model.unlink()  # what snakemake --forcerun does before it runs the job
    caplog.set_level(logging.WARNING)
    pipeline.train_volume(run_copy, 1)
    assert "was removed after training had finished (a forced rerun)" in caplog.text
    assert paths.train_state("volume_stage1").with_name("volume_stage1.ckpt.stale").is_file()
    assert load_checkpoint(model)["step"] == TINY_CONFIG["volume_model"]["stage1"]["steps"]


def test_killed_between_training_and_export_only_exports(run_copy, caplog):
    paths = Paths(run_copy)
    exported_marker(paths.train_state("slice_model")).unlink()  # the export never happened
    paths.model("slice_model").unlink()
    caplog.set_level(logging.INFO)
    pipeline.train_slice(run_copy)
    assert "nothing to do" in caplog.text and "training starts over" not in caplog.text
    assert load_checkpoint(paths.model("slice_model"))["step"] == TINY_CONFIG["slice_model"]["train"]["steps"]


def test_fresh_runs_with_one_seed_are_identical(run_copy):
    """Network init, data order and noise all come from `seed`: two fresh runs give the same weights."""
    paths = Paths(run_copy)
    weights = {"vae": [], "volume_stage1": []}
    for attempt in range(2):
        for name in weights:
            paths.model(name).unlink()
            for f in paths.train_state(name).parent.glob(f"{name}.ckpt*"):
                f.unlink()
        torch.manual_seed(1000 + attempt)  # whatever ran before in the process must not matter
        pipeline.train_vae(run_copy)
        torch.manual_seed(2000 + attempt)
        pipeline.train_volume(run_copy, 1)
        for name in weights:
            weights[name].append(load_checkpoint(paths.model(name))["state_dict"])
    for name, (first, second) in weights.items():
        T.assert_same(first, second, f"{name} weights")


def test_sampling_refuses_a_model_of_another_config(run_copy, tmp_path, capsys):
    config = _write_config(tmp_path / "wider.yaml", volume_model={
        "model": {**TINY_CONFIG["volume_model"]["model"], "model_channels": 24}})
    shard = Paths(run_copy).root / "samples" / "shards" / "IC.0of1"
    before = sorted(p.relative_to(shard) for p in shard.rglob("*")) if shard.exists() else None
    _one_error_line(capsys, cli(["sample", "--set", "IC", "--config", config]), "volume_stage2.pt: trained with another config", "volume_model.model.model_channels: 16 != 24")
    after = sorted(p.relative_to(shard) for p in shard.rglob("*")) if shard.exists() else None
    assert after == before  # nothing written (a shard sampled by an earlier test stays as it was)


def test_corrupt_model_file_is_refused_by_sampling(run_copy, tmp_path, capsys):
    _flip(Paths(run_copy).model("vae"))
    line = _one_error_line(capsys, cli(["sample", "--set", "IC", "--config", _write_config(tmp_path / "c.yaml")]),
                           "vae.pt")
    assert "checksum mismatch" in line or "cannot read checkpoint" in line


@pytest.mark.parametrize("content", ["random_bytes", "pickled_objects"])
def test_foreign_file_as_a_model_never_advises_unsafe_loading(run_copy, tmp_path, capsys, content):
    """torch's message on a file that is not tensors-only advises weights_only=False (running the file's code)."""
    model = Paths(run_copy).model("vae")
    if content == "random_bytes":
        model.write_bytes(b"\x13" + np.random.default_rng(0).bytes(4095))
    else:
        torch.save({"state_dict": np.zeros(3)}, model)
    err_line = _one_error_line(capsys, cli(["sample", "--set", "IC", "--config", _write_config(tmp_path / "c.yaml")]),
                               "vae.pt: cannot read checkpoint")
    assert "weights_only" not in err_line and "trust" not in err_line, err_line


def test_corrupt_latent_cache_file_is_one_line(run_copy, tmp_path, capsys):
    paths = Paths(run_copy)
    case = sorted(read_json(paths.latents / "index.json")["cases"])[0]
    (paths.latents / f"{case}.pt").write_bytes(b"\x00" * 100)
    _one_error_line(capsys, cli(["train-slice", "--config", _write_config(tmp_path / "c.yaml")]), f"{case}.pt: unreadable latent-cache file", "rerun gem3d encode")


@pytest.mark.parametrize("content", ["{}", "[]"])
def test_emptied_latent_index_is_one_line(run_copy, tmp_path, capsys, content):
    """An emptied latent-cache index ended in a KeyError traceback."""
    index = Paths(run_copy).latents / "index.json"
    index.write_text(content)
    state = Paths(run_copy).train_state("slice_model")
    before = state.read_bytes()
    _one_error_line(capsys, cli(["train-slice", "--config", _write_config(tmp_path / "c.yaml")]), f"{index}:",
                    "rerun gem3d encode")
    assert state.read_bytes() == before


def test_corrupt_slice_store_array_is_one_line(run_copy, tmp_path, capsys):
    paths = Paths(run_copy)
    case = sorted(read_json(paths.slices / "index.json")["cases"])[0]
    (paths.slices / f"{case}_label.npy").write_bytes(b"garbage")
    _one_error_line(capsys, cli(["encode", "--config", _write_config(tmp_path / "c.yaml")]), f"{case}_label.npy: unreadable slice-store array")


AGENT_SCRIPT = """
import os, sys
from dataclasses import replace
from pathlib import Path
import test_training_loop as T
from gem3d.training import init_distributed

out = Path(sys.argv[1])
info = init_distributed()


def source(step, generator, items):
    if step == 20:  # in the training loop: its stop-signal handler is installed
        (out / f"pid{info.rank}").write_text(str(os.getpid()))
    return T.batch_source(step, generator, items)


T.run(out / "a.ckpt", replace(T.CFG, steps=10**7, checkpoint_every=10**6, log_every=10**6), batch_source=source)
"""


def test_workers_end_when_their_torchrun_agent_dies(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from gem3d.training.distributed import launch_command

    script = tmp_path / "agent_run.py"
    script.write_text(AGENT_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    agent = subprocess.Popen(launch_command(2, [str(script), str(out)], master_port=T._free_port()),
                             env=T._script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((out / f"pid{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.5)
        pids = [int((out / f"pid{r}").read_text()) for r in (0, 1)]
        agent.send_signal(signal.SIGKILL)  # the agent dies; its workers are orphaned
        agent.wait()

        def alive(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

        deadline = time.monotonic() + 60
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(alive(p) for p in pids), "workers kept running after their agent died"
        assert load_checkpoint(out / "a.ckpt")["step"] > 0  # they checkpointed on the way out
    finally:
        os.killpg(agent.pid, signal.SIGKILL) if agent.poll() is None else None


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty"])
def test_corrupt_state_is_moved_aside_never_kept_as_the_fallback(tmp_path, damage):
    """Training resumes from `.prev` past a corrupt newest state; the corrupt file goes to `.corrupt`, so the
    next save keeps a good `.prev` and a second corruption is recoverable too."""
    path = tmp_path / "a.ckpt"
    _run(path, steps=9)  # checkpoints at 3, 6, 9: .prev holds step 6

    def damage_newest():
        if damage == "flipped":
            _flip(path)
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"")
        return path.read_bytes()

    bad = damage_newest()
    result, warnings = _run(path, steps=9)  # resumes from step 6 and saves step 9 again
    assert result.start_step == 6 and result.final_step == 9
    corrupt = tmp_path / "a.ckpt.corrupt"
    assert corrupt.read_bytes() == bad and any("a.ckpt.corrupt" in w for w in warnings), warnings
    assert load_checkpoint(previous_path(path))["step"] == 6  # the good older state, not the corrupt file
    damage_newest()  # a second corruption
    result, _ = _run(path, steps=12)
    assert result.start_step == 6 and result.final_step == 12
    assert load_checkpoint(path)["step"] == 12
