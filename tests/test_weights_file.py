"""Foreign weights files are read without running their code, and bad ones are one line saying what they are."""

from __future__ import annotations

import os
import re

import pytest
import torch

from gem3d.io import InputError
from gem3d.models.weights_file import read_state_dict, read_weights_file


class _Runs:
    """Unpickling this calls os.system: a file that runs code when loaded naively."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_would_run_code_is_read_inertly(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": _Runs(f"touch {marker}")}, tmp_path / "evil.ckpt")
    state = read_state_dict(tmp_path / "evil.ckpt")
    assert list(state) == ["w"] and torch.equal(state["w"], torch.ones(2))
    assert not marker.exists()
    obj = read_weights_file(tmp_path / "evil.ckpt")
    assert "not loaded: posix.system" in repr(obj["hook"]) or "not loaded: nt.system" in repr(obj["hook"])


def test_lightning_style_checkpoints_keep_their_tensors(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(3)}, "callbacks": {re.Pattern: {"best": torch.tensor(1.0)}},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}]}, tmp_path / "last.ckpt")
    assert set(read_state_dict(tmp_path / "last.ckpt")) == {"a"}


@pytest.mark.parametrize("content, match", [
    (b"", r"is empty \(0 bytes\)"),
    (b"hello, not weights at all", r"is not a torch or safetensors file"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":", r"looks like a safetensors file but cannot be read"),
])
def test_bad_files_are_one_line(tmp_path, content, match):
    (tmp_path / "w.bin").write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        read_state_dict(tmp_path / "w.bin")
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_truncated_objects_only_and_missing(tmp_path):
    torch.save({"w": torch.zeros(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.pt: weights file is a truncated or damaged torch file"):
        read_state_dict(tmp_path / "cut.pt")
    torch.save({"config": {"lr": 1e-4}}, tmp_path / "noweights.pt")
    with pytest.raises(InputError, match=r"holds no tensors \(its entries are dict\)"):
        read_state_dict(tmp_path / "noweights.pt")
    with pytest.raises(InputError, match=r"nothere\.pt: weights file not found"):
        read_state_dict(tmp_path / "nothere.pt")
    with pytest.raises(InputError, match=r"is a folder, not a file"):
        read_state_dict(tmp_path)
