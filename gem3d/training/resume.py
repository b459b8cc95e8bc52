"""Which training state may be resumed, and by whom (gem3d.training.loop's resume rules).

A state resumes only while its fingerprint (gem3d.fingerprint.stage_fingerprint) equals the run's (a
corrupt newest state gives way to `<name>.prev`, see gem3d.training.checkpoint.load_training_state);
otherwise it is moved aside to `<name>.stale` with one line saying why. A finished state whose
exported model file was removed since (snakemake --forcerun) is moved aside too: training starts
over. One process at a time trains a state (an exclusive lock on `<name>.lock`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from gem3d.io import exclusive_lock
from gem3d.training.checkpoint import exported_marker, load_training_state, previous_path


@contextlib.contextmanager
def state_lock(path: Path, take: bool):
    """Hold an exclusive lock on `<state>.lock` while training (one trainer per state; gem3d.io.exclusive_lock).
    Only the main process of a distributed run takes it."""
    if not take:
        yield
        return
    with exclusive_lock(path, "training this state"):
        yield


def set_aside(path: Path, why: str, warn: Callable[[str], None]) -> None:
    """Move a training state that must not be resumed to `<name>.stale` (its .prev and marker go)."""
    stale = path.with_name(path.name + ".stale")
    os.replace(path if path.exists() else previous_path(path), stale)  # the state that was read
    previous_path(path).unlink(missing_ok=True)
    exported_marker(path).unlink(missing_ok=True)
    warn(f"{path}: {why}; training starts over (the old state is kept as {stale.name})")


def plan_resume(path: Path, kind: str, model_args: dict, fingerprint: dict | None, model_path: Path | None,
                 warn: Callable[[str], None]) -> dict | None:
    """Rank 0: the state to resume from, or None after moving a state that must not be resumed aside."""
    from gem3d.fingerprint import first_difference

    marker = exported_marker(path)
    if marker.exists() and not path.exists():
        marker.unlink()
    if marker.exists() and model_path is not None and not model_path.exists():
        set_aside(path, f"its model file {model_path} was removed after training had finished (a forced "
                         "rerun)", warn)
        return None
    if not path.exists() and not previous_path(path).exists():
        return None
    expect = {"expect_kind": kind} if fingerprint is not None else {"expect_kind": kind, "expect_model_args": model_args}
    ckpt = load_training_state(path, warn, **expect)
    if fingerprint is not None:
        saved = ckpt.get("fingerprint")
        if saved is None:
            set_aside(path, "it records no fingerprint of what it was trained on", warn)
            return None
        diff = (first_difference(saved.get("config"), fingerprint.get("config"))
                or first_difference(saved.get("inputs"), fingerprint.get("inputs"), "inputs")
                or first_difference(saved, fingerprint))
        if diff is not None:
            set_aside(path, f"it was trained on other settings or data ({diff}, saved != now)", warn)
            return None
    return ckpt
