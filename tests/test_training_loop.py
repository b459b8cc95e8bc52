"""The shared training loop: exact resume, checkpoint errors, frozen parameters, SIGTERM, DDP, logging.

Everything trains a few-hundred-parameter MLP for a handful of steps on CPU. The model has dropout
(global torch RNG) and the loss adds noise drawn from the loop generator (like diffusion noise), so
a resume is only bit-exact if every RNG state is saved and restored.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gem3d.io import InputError
from gem3d.training import (
    EMA,
    TrainConfig,
    distributed_env,
    inference_state_dict,
    init_distributed,
    launch_command,
    load_checkpoint,
    save_checkpoint,
    sha256_of,
    train,
)

TESTS_DIR = Path(__file__).resolve().parent
KIND = "tiny_mlp"
ARGS = {"hidden": 8, "levels": [1, 2]}
CFG = TrainConfig(steps=12, lr=1e-2, weight_decay=0.01, batch_size=8, grad_clip=1.0, ema_decay=0.9,
                  ema_start=2, log_every=2, checkpoint_every=4, seed=3)


# ----------------------------------------------------------------------------------------------
# tiny model and data (also imported by the subprocess scripts below)


class TinyNet(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.encoder = nn.Linear(4, hidden)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.encoder(x))))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(ARGS["hidden"])


_g = torch.Generator().manual_seed(1234)
DATA_X = torch.randn(64, 4, generator=_g)
DATA_Y = torch.stack([DATA_X[:, 0] * DATA_X[:, 1], DATA_X[:, 2] - DATA_X[:, 3]], dim=1)


def batch_source(step: int, generator: torch.Generator, items: range) -> dict:
    idx = torch.randint(0, DATA_X.shape[0], (8,), generator=generator)
    return {"x": DATA_X[idx], "y": DATA_Y[idx]}


def loss_fn(model, batch, generator):
    noise = 0.1 * torch.randn(batch["x"].shape, generator=generator)  # like diffusion noise
    pred = model(batch["x"] + noise)
    # python's and numpy's global RNGs too, so their restore is checked as well
    weight = 1.0 + 1e-3 * (random.random() + float(np.random.rand()))
    loss = weight * torch.mean((pred - batch["y"]) ** 2)
    return loss, {"mse": loss.detach(), "noise_std": float(noise.std())}


def run(path, cfg=CFG, model=None, **kw):
    model = model if model is not None else make_model()
    kw.setdefault("kind", KIND)
    kw.setdefault("model_args", ARGS)
    return model, train(model, loss_fn, kw.pop("batch_source", batch_source), cfg, path, **kw)


def assert_same(a, b, where=""):
    """Recursive exact equality of checkpoint parts (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(ck_a: dict, ck_b: dict) -> None:
    assert ck_a["step"] == ck_b["step"]
    for key in ("state_dict", "ema_state_dict", "optimizer", "rng"):
        assert_same(ck_a[key], ck_b[key], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run A: 12 uninterrupted steps."""
    path = tmp_path_factory.mktemp("ref") / "a.pt"
    model, result = run(path)
    return path, load_checkpoint(path), result


# ----------------------------------------------------------------------------------------------
# exact resume


def test_uninterrupted_run_writes_final_state(reference):
    path, ck, result = reference
    assert result.final_step == ck["step"] == 12 and result.start_step == 0
    assert [s for s, _ in result.losses] == [2, 4, 6, 8, 10, 12]
    assert result.last_loss is not None and result.steps_per_s > 0 and result.wall_time_s > 0
    assert ck["kind"] == KIND and ck["model_args"] == ARGS and ck["extra"] == {}
    assert ck["train_config"]["steps"] == 12 and ck["train_config"]["betas"] == (0.9, 0.999)
    assert set(ck["rng"]) >= {"torch", "python", "numpy", "generator"}
    assert set(ck["ema_state_dict"]) == {n for n, _ in make_model().named_parameters()}
    assert all(v.dtype == torch.float32 for v in ck["ema_state_dict"].values())
    # EMA differs from the weights it averages
    assert not torch.equal(ck["ema_state_dict"]["head.weight"], ck["state_dict"]["head.weight"])
    # no temporary files left: the state, the one it replaced (fallback) and the trainer's lock file
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.pt", "a.pt.lock", "a.pt.prev"]


def test_resume_after_shorter_run_is_bit_identical(tmp_path, reference):
    _, ck_a, res_a = reference
    path = tmp_path / "b.pt"
    _, res5 = run(path, replace(CFG, steps=5))
    assert res5.final_step == 5 and load_checkpoint(path)["step"] == 5
    model_b, res_b = run(path)
    assert res_b.start_step == 5 and res_b.final_step == 12
    ck_b = load_checkpoint(path)
    assert_same_training_state(ck_a, ck_b)
    assert_same(model_b.state_dict(), ck_a["state_dict"], "live model")


def test_resume_after_exception_mid_run_is_bit_identical(tmp_path, reference):
    _, ck_a, res_a = reference
    path = tmp_path / "b.pt"

    def failing_source(step, generator, items):
        if step == 5:
            raise RuntimeError("simulated crash")
        return batch_source(step, generator, items)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(path, batch_source=failing_source)
    ck_mid = load_checkpoint(path)
    assert ck_mid["step"] == 4  # the last checkpoint_every boundary, intact
    _, res_b = run(path)
    assert res_b.start_step == 4 and res_b.final_step == 12
    assert_same_training_state(ck_a, load_checkpoint(path))
    assert res_b.losses == res_a.losses  # log windows align with the checkpoint boundary here


def test_rerun_of_finished_training_returns_immediately(tmp_path):
    path = tmp_path / "c.pt"
    _, first = run(path, replace(CFG, steps=3))
    digest, mtime = sha256_of(path), path.stat().st_mtime_ns
    model, again = run(path, replace(CFG, steps=3), batch_source=lambda s, g, items: pytest.fail("must not train"))
    assert again.final_step == 3 and again.losses == first.losses and again.last_loss == pytest.approx(first.last_loss)
    assert sha256_of(path) == digest and path.stat().st_mtime_ns == mtime
    assert_same(model.state_dict(), load_checkpoint(path)["state_dict"])  # weights loaded into the model


# ----------------------------------------------------------------------------------------------
# checkpoint errors


def test_mismatched_architecture_raises_and_keeps_file(tmp_path):
    path = tmp_path / "m.pt"
    run(path, replace(CFG, steps=2))
    before = path.read_bytes()
    with pytest.raises(InputError) as err:
        run(path, model_args={"hidden": 16, "levels": [1, 2]})
    msg = str(err.value)
    assert str(path) in msg and "different architecture" in msg and "hidden 8 != 16" in msg
    assert "\n" not in msg
    with pytest.raises(InputError, match="kind 'tiny_mlp' != 'other'"):
        run(path, kind="other")
    assert path.read_bytes() == before
    # tuples vs lists (config read from YAML) are the same architecture
    assert load_checkpoint(path, expect_model_args={"hidden": 8, "levels": (1, 2)})["step"] == 2


def test_truncated_or_missing_checkpoint_raises_with_path(tmp_path):
    path = tmp_path / "t.pt"
    run(path, replace(CFG, steps=2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    truncated = path.read_bytes()
    with pytest.raises(InputError, match="cannot read checkpoint") as err:
        run(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == truncated
    path.write_bytes(b"")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(InputError, match=r"nope\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a gem3d checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    save_checkpoint(path, {"kind": "k", "model_args": {}, "state_dict": {}, "step": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"kind": "k", "model_args": {}, "state_dict": {}, "step": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert len(sha256_of(path)) == 16 and len(sha256_of(path, None)) == 64


# ----------------------------------------------------------------------------------------------
# trainable subset, EMA


def test_trainable_parameters_freezes_the_rest(tmp_path):
    model = make_model()
    frozen_before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    head_before = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    path = tmp_path / "s2.pt"
    _, result = run(path, replace(CFG, steps=4), model=model, trainable_parameters=model.head.parameters(),
                    extra={"stage": 2})
    for n, p in model.encoder.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, frozen_before[n])
    for n, p in model.head.named_parameters():
        assert p.requires_grad and not torch.equal(p, head_before[n])
    ck = load_checkpoint(path)
    assert set(ck["ema_state_dict"]) == {"head.weight", "head.bias"}
    assert set(ck["state_dict"]) == set(model.state_dict())  # full weights for build_model()
    assert ck["extra"] == {"stage": 2}
    assert len(ck["optimizer"]["state"]) == 2
    merged = inference_state_dict(ck)
    assert torch.equal(merged["head.weight"], ck["ema_state_dict"]["head.weight"])
    assert torch.equal(merged["encoder.weight"], frozen_before["weight"])
    # resuming with the same subset continues; EMA still only over the head
    model2 = make_model()
    run(path, replace(CFG, steps=6), model=model2, trainable_parameters=model2.head.parameters())
    assert load_checkpoint(path)["step"] == 6
    with pytest.raises(ValueError, match="not parameters of the model"):
        run(tmp_path / "bad.pt", trainable_parameters=[nn.Parameter(torch.zeros(1))])
    # a checkpoint of another trainable subset is refused, file untouched
    before = path.read_bytes()
    with pytest.raises(InputError, match="optimizer state does not match"):
        run(path, replace(CFG, steps=8))
    assert path.read_bytes() == before


def test_non_finite_loss_stops_before_checkpointing(tmp_path):
    path = tmp_path / "nan.pt"
    run(path, replace(CFG, steps=4))

    def nan_loss(model, batch, generator):
        loss, metrics = loss_fn(model, batch, generator)
        return loss * float("nan"), metrics

    model = make_model()
    with pytest.raises(FloatingPointError, match="non-finite loss at or before step 8"):
        train(model, nan_loss, batch_source, replace(CFG, steps=12), path, kind=KIND, model_args=ARGS)
    assert load_checkpoint(path)["step"] == 4


def test_ema_warmup_decay_and_copy():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.5, start=1)
    ema.update(model, 1)  # step <= start: plain copy
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, 2)  # 0.5 * 1 + 0.5 * 3
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 2), 2.0))
    with ema.applied_to(model):
        assert torch.allclose(model.weight, torch.full((1, 2), 2.0))
    assert torch.allclose(model.weight, torch.full((1, 2), 3.0))
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    other.copy_to(model)
    assert torch.allclose(model.weight, torch.full((1, 2), 2.0))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({"bias": torch.zeros(1)})


def test_ema_disabled_and_config_validation(tmp_path):
    path = tmp_path / "noema.pt"
    run(path, replace(CFG, steps=2, ema_decay=0.0))
    ck = load_checkpoint(path)
    assert ck["ema_state_dict"] is None
    assert_same(inference_state_dict(ck), ck["state_dict"])
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"steps": 3, "learning_rate": 1.0})
    assert TrainConfig.from_dict({"betas": [0.9, 0.99]}).betas == (0.9, 0.99)


def test_grad_checkpointing_flag_is_handed_to_the_model(tmp_path, caplog):
    class WithSwitch(TinyNet):
        calls: list = []

        def set_grad_checkpointing(self, flag):
            self.calls.append(flag)

    torch.manual_seed(0)
    model = WithSwitch(8)
    run(tmp_path / "gc.pt", replace(CFG, steps=1, grad_checkpointing=True), model=model)
    assert model.calls == [True]
    caplog.set_level(logging.INFO, logger="gem3d.training")
    run(tmp_path / "gc2.pt", replace(CFG, steps=1, grad_checkpointing=True))
    assert any("flag ignored" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"extra\['path'\]: a PosixPath cannot be stored"):
        run(tmp_path / "gc3.pt", extra={"path": tmp_path})
    with pytest.raises(ValueError, match=r"extra\['scale_factor'\]: a float64 cannot be stored"):
        run(tmp_path / "gc3.pt", extra={"scale_factor": np.float64(0.18)})
    assert not (tmp_path / "gc3.pt").exists()


# ----------------------------------------------------------------------------------------------
# logging


def test_progress_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gem3d.training")
    run(tmp_path / "log.pt", replace(CFG, steps=4))
    lines = [r.getMessage() for r in caplog.records if r.name == "gem3d.training"]
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert len(progress) == 2
    assert progress[0].startswith("step 2/4 | ") and " it/s | loss " in progress[0]
    assert "| lr 0.01 |" in progress[0] and "mse " in progress[0] and "grad_norm " in progress[0]
    assert any(", precision fp32, lr 0.01" in ln for ln in lines)
    messages = []
    run(tmp_path / "log2.pt", replace(CFG, steps=2), log=messages.append)
    assert any(m.startswith("step 2/2") for m in messages)


# ----------------------------------------------------------------------------------------------
# SIGTERM in a subprocess


def _script_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from dataclasses import replace
    import test_training_loop as T

    def slow_source(step, generator, items):
        time.sleep(0.01)
        return T.batch_source(step, generator, items)

    T.run(sys.argv[1], replace(T.CFG, steps=100000, checkpoint_every=5), batch_source=slow_source)
    """
)


def test_sigterm_writes_checkpoint_and_resume_is_exact(tmp_path):
    path = tmp_path / "sig.pt"
    script = tmp_path / "sigterm_run.py"
    script.write_text(SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], env=_script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.02)
        time.sleep(0.03)  # let it run a step or two past the boundary
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    ck = load_checkpoint(path)
    stopped = ck["step"]
    assert f"received SIGTERM at step {stopped}/100000: checkpoint {path} holds step {stopped}" in err
    assert "resume" in err
    assert 5 <= stopped < 100000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    total = stopped + 3
    _, res = run(path, replace(CFG, steps=total, checkpoint_every=5))
    assert res.start_step == stopped and res.final_step == total
    ref = tmp_path / "ref.pt"
    run(ref, replace(CFG, steps=total, checkpoint_every=5))
    assert_same_training_state(load_checkpoint(ref), load_checkpoint(path))


# ----------------------------------------------------------------------------------------------
# DDP on CPU (gloo), 2 processes under torchrun


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from dataclasses import replace
    from pathlib import Path
    import torch
    import gem3d.training.loop as L
    import test_training_loop as T
    from gem3d.training import init_distributed, shutdown_distributed

    out = Path(sys.argv[1])
    info = init_distributed()
    saves = []
    real_save = L.save_checkpoint
    L.save_checkpoint = lambda path, payload, **kw: (saves.append(str(path)), real_save(path, payload, **kw))[1]
    first_idx = []
    def source(step, generator, items):
        batch = T.batch_source(step, generator, items)
        if step == 0 and not first_idx:
            first_idx.append(batch["x"].clone())
        return batch
    cfg = replace(T.CFG, steps=6, checkpoint_every=3)
    model = T.make_model(seed=info.rank)  # different init per rank: DDP must broadcast rank 0's
    T.run(out / "a.pt", cfg, model=model, batch_source=source)
    T.run(out / "b.pt", replace(cfg, steps=3))  # interrupted run ...
    T.run(out / "b.pt", cfg)  # ... resumed
    torch.save({"state_dict": model.state_dict(), "saves": saves, "world": info.world_size,
                "first_batch": first_idx[0]}, out / f"rank{info.rank}.pt")
    shutdown_distributed()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    cmd = launch_command(2, [str(script), str(out)], master_port=_free_port())
    proc = subprocess.run(cmd, env=_script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert_same(r0["state_dict"], r1["state_dict"], "rank weights")
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # each rank draws its own batch
    assert len(r0["saves"]) == 4 and r1["saves"] == []  # a: steps 3, 6; b: 3, then 6
    written = sorted(p.name for p in out.iterdir() if not p.name.endswith((".prev", ".lock")))
    assert written == ["a.pt", "b.pt", "rank0.pt", "rank1.pt"]  # rank 0 alone writes (no temporary files)
    ck_a, ck_b = load_checkpoint(out / "a.pt"), load_checkpoint(out / "b.pt")
    assert len(ck_a["rng"]["ranks"]) == 2
    assert_same(ck_a["state_dict"], r0["state_dict"])
    assert_same_training_state(ck_a, ck_b)  # DDP resume is exact too


def test_distributed_helpers_without_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.launched) == (0, 1, False) and info.is_main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == type(info)(3, 4, 1, True)
    cmd = launch_command(4, ["/usr/bin/gem3d", "train", "--stage", "vae"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:6] == ["--nproc_per_node", "4", "--standalone"] and cmd[-4:] == ["/usr/bin/gem3d", "train", "--stage", "vae"]
    cmd = launch_command(2, ["train"], module="gem3d.cli", master_port=29511)
    assert cmd[-3:] == ["-m", "gem3d.cli", "train"] and "29511" in cmd


@pytest.mark.parametrize("choice, procs", [("cpu", "1"), ("auto", "4")])
def test_launch_without_a_count_follows_the_device_choice(monkeypatch, choice, procs):
    """launch_command(None): one worker per GPU when gem3d computes on the GPUs; one when GEM3D_DEVICE=cpu
    forces the CPU although GPUs are visible (not one CPU worker per unused GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("GEM3D_DEVICE", choice)
    cmd = launch_command(None, ["/usr/bin/gem3d", "train"])
    assert cmd[3:5] == ["--nproc_per_node", procs]


def test_optimizer_state_follows_parameter_layout():
    """Moments saved for contiguous weights, resumed for channels_last weights with the fused kernel
    (as on a GPU with channels_last): the next step equals the reference step."""
    import copy

    from gem3d.training.checkpoint import load_optimizer_state

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    ref = nn.Conv2d(3, 4, 3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    ref(x).pow(2).sum().backward()
    ref_opt.step()
    ref_opt.zero_grad()
    resumed = copy.deepcopy(ref)
    resumed.weight.data = resumed.weight.data.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(resumed.parameters(), lr=0.1, fused=True)
    load_optimizer_state(opt, copy.deepcopy(ref_opt.state_dict()), "run.ckpt", lr=0.1)
    assert opt.state[resumed.weight]["exp_avg"].stride() == resumed.weight.stride()
    for model, optimizer in ((ref, ref_opt), (resumed, opt)):
        model(x).pow(2).sum().backward()
        optimizer.step()
    torch.testing.assert_close(resumed.weight, ref.weight, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the global batch: 1 process accumulating 2 micro-batches == 2 processes with 1 each


def plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))  # no dropout: no per-rank global RNG


def micro_source(step, generator, items):
    idx = torch.randint(0, DATA_X.shape[0], (len(items),), generator=generator)
    return {"x": DATA_X[idx], "y": DATA_Y[idx]}


def plain_loss(model, batch, generator):
    noise = 0.1 * torch.randn(batch["x"].shape, generator=generator)
    loss = torch.mean((model(batch["x"] + noise) - batch["y"]) ** 2)
    return loss, {"mse": loss.detach()}


GLOBAL_CFG = TrainConfig(steps=6, lr=1e-2, batch_size=8, ema_decay=0.0, log_every=3, checkpoint_every=3, seed=5)

ACCUM_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    import test_training_loop as T
    from gem3d.training import init_distributed, shutdown_distributed
    from gem3d.training.loop import train

    out = Path(sys.argv[1])
    info = init_distributed()
    model = T.plain_model()
    train(model, T.plain_loss, T.micro_source, T.GLOBAL_CFG, out / "ddp.pt", kind="plain",
          model_args={})
    if info.rank == 0:
        torch.save(model.state_dict(), out / "ddp_weights.pt")
    shutdown_distributed()
    """
)


def test_batch_plan_splits_the_global_batch():
    from gem3d.training.batching import batch_plan

    plan = batch_plan(replace(GLOBAL_CFG, micro_batch=2), 2)
    assert (plan.global_batch, plan.world_size, plan.accumulate, plan.micro) == (8, 2, 2, 2)
    assert batch_plan(GLOBAL_CFG, 1).accumulate == 1 and batch_plan(GLOBAL_CFG, 1).micro == 8
    with pytest.raises(InputError, match="batch_size 8 .* cannot be split evenly over 3 processes"):
        batch_plan(GLOBAL_CFG, 3)
    with pytest.raises(InputError, match="micro_batch 3 does not divide the 8 items"):
        batch_plan(replace(GLOBAL_CFG, micro_batch=3), 1)


def test_accumulation_equals_two_data_parallel_processes(tmp_path):
    """Global batch 8: 1 process x 2 accumulated micro-batches of 4 == 2 gloo processes x 1 micro-batch of 4."""
    script = tmp_path / "accum_run.py"
    script.write_text(ACCUM_SCRIPT)
    cmd = launch_command(2, [str(script), str(tmp_path)], master_port=_free_port())
    proc = subprocess.run(cmd, env=_script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(tmp_path / "ddp_weights.pt", weights_only=True)

    accum_cfg = replace(GLOBAL_CFG, micro_batch=4)
    model = plain_model()
    result = train(model, plain_loss, micro_source, accum_cfg, tmp_path / "accum.pt", kind="plain",
                   model_args={})
    assert result.final_step == 6
    saved = torch.load(tmp_path / "accum.pt", weights_only=True)
    assert saved["batch_plan"] == {"global_batch": 8, "world_size": 1, "accumulate": 2, "micro": 4}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ddp[name], rtol=1e-5, atol=1e-6, msg=name)
    # not trivially equal: one process without accumulation (one micro-batch of 8 from one generator) differs
    single = plain_model()
    train(single, plain_loss, micro_source, GLOBAL_CFG, tmp_path / "single.pt", kind="plain", model_args={})
    assert not torch.allclose(single.state_dict()["0.weight"], ddp["0.weight"], atol=1e-6)
