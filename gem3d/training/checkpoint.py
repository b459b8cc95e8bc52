"""Checkpoint files: atomic save, checked load, short content hash.

A checkpoint is a dict saved with `torch.save` (docs/architecture.md):

    {"kind": str,                 # build_model() registry name
     "model_args": dict,          # build_model(kind, model_args) rebuilds the network
     "state_dict": dict,          # full model weights (frozen ones included)
     "ema_state_dict": dict|None, # EMA of the TRAINED parameters only, fp32, same names; None if EMA off
     "optimizer": dict,           # AdamW state_dict
     "step": int,                 # completed optimizer steps
     "rng": dict,                 # see gem3d.training.loop: torch/cuda/python/numpy/loop generator
     "train_config": dict,        # dataclasses.asdict(TrainConfig)
     "extra": dict,               # caller's extras, e.g. the VAE's "scale_factor"
     "history": dict,             # {"losses": [[step, running-mean loss], ...], "last_loss": float|None}
     "fingerprint": dict|None,    # what defines the run (gem3d.fingerprint.stage_fingerprint); None: not recorded
     "checksum": str}             # SHA-256 of everything above (payload_checksum), verified on every load

Every error about a checkpoint file is a one-line `InputError` naming the file. A file whose
checksum does not match its content (a flipped byte, a torn copy) is refused, never loaded.
A training state is saved with `keep_previous=True`: the state it replaces stays beside it as
`<name>.prev` (a hard link, so no moment without a state) and is the fallback when the newest
state turns out corrupt (`load_training_state`), which then moves the corrupt file to
`<name>.corrupt`: a corrupt file never becomes a `.prev`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from gem3d.io import InputError, atomic_path, file_sha256
from gem3d.job_owner import check_owned

REQUIRED_KEYS = ("kind", "model_args", "state_dict", "step")


def _hash_into(digest: "hashlib._Hash", obj: Any) -> None:
    """Feed a canonical byte form of a checkpoint value (tensors by dtype, shape and bytes) to `digest`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for key in sorted(obj, key=repr):
            digest.update(repr(key).encode() + b":")
            _hash_into(digest, obj[key])
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for value in obj:
            _hash_into(digest, value)
        digest.update(b"]")
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_checksum(payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's content, the "checksum" entry itself excluded."""
    digest = hashlib.sha256()
    _hash_into(digest, {k: v for k, v in payload.items() if k != "checksum"})
    return digest.hexdigest()


def previous_path(path: str | Path) -> Path:
    """Where the state replaced by the newest one is kept (`<name>.prev`)."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(path: str | Path, payload: Mapping[str, Any], *, keep_previous: bool = False,
                    owned_only: bool = True) -> Path:
    """Write `payload` (with its checksum) to a temporary file, fsync it, read it back and verify it,
    then rename it to `path`.

    The previous file at `path` stays untouched until the new one is verified on disk; with
    `keep_previous` it then stays as `<name>.prev`. With `owned_only` (model files) nothing is renamed
    into place once the Snakemake that started this job has ended (gem3d.job_owner.check_owned: a
    one-line InputError); training states pass False (a stopped job's state is what the next run
    resumes from).
    """
    path = Path(path)
    payload = {**payload, "checksum": payload_checksum(payload)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        load_checkpoint(tmp)  # verify what reached the disk before it replaces anything
        if owned_only:
            check_owned(path)
        if keep_previous and path.is_file():
            prev = previous_path(path)
            link = prev.with_name(prev.name + ".tmp")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, link)
            os.replace(link, prev)
    return path


def _normalise(value: Any) -> Any:
    """Tuples -> lists, recursively (a config read from YAML/JSON has lists where code has tuples)."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def model_args_differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Human-readable 'key saved != given' items for the keys whose values differ."""
    saved_n, given_n = _normalise(saved), _normalise(given)
    diffs = []
    for key in sorted(set(saved_n) | set(given_n), key=str):
        a = saved_n.get(key, "<missing>")
        b = given_n.get(key, "<missing>")
        if a != b:
            diffs.append(f"{key} {a!r} != {b!r}" if isinstance(a, str) or isinstance(b, str) else f"{key} {a} != {b}")
    return diffs


def load_checkpoint(
    path: str | Path,
    expect_kind: str | None = None,
    map_location: Any = "cpu",
    *,
    expect_model_args: Mapping[str, Any] | None = None,
) -> dict:
    """Load a checkpoint written by `save_checkpoint`; raise `InputError` (one line) when:

    - the file is missing ("PATH: checkpoint not found"),
    - it is unreadable, corrupt or truncated ("PATH: cannot read checkpoint (...)"),
    - it lacks the checkpoint keys ("PATH: not a gem3d checkpoint (missing keys ...)"),
    - its content does not match its checksum ("PATH: checksum mismatch ..."),
    - `expect_kind` / `expect_model_args` differ from what it records ("checkpoint PATH was written
      for a different architecture: model_channels 32 != 64 (checkpoint != requested)").
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip/pickle/EOF errors of many types for damaged files
        raise InputError(f"{path}: cannot read checkpoint ({_unreadable(exc)})") from exc
    if not isinstance(payload, dict):
        raise InputError(f"{path}: not a gem3d checkpoint (a {type(payload).__name__}, expected a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise InputError(f"{path}: not a gem3d checkpoint (missing keys: {', '.join(missing)})")
    if "checksum" not in payload:
        raise InputError(f"{path}: checkpoint has no checksum (written before checksums were added?); retrain this stage")
    if payload_checksum(payload) != payload["checksum"]:
        raise InputError(f"{path}: checksum mismatch: the file is corrupt (its content changed after it was written)")
    diffs = []
    if expect_kind is not None and payload["kind"] != expect_kind:
        diffs.append(f"kind {payload['kind']!r} != {expect_kind!r}")
    if expect_model_args is not None:
        diffs += model_args_differences(payload["model_args"] or {}, expect_model_args)
    if diffs:
        raise InputError(
            f"checkpoint {path} was written for a different architecture: {'; '.join(diffs)} (checkpoint != requested)"
        )
    return payload


def corrupt_path(path: str | Path) -> Path:
    """Where a corrupt training state is moved when its `.prev` takes over (`<name>.corrupt`)."""
    path = Path(path)
    return path.with_name(path.name + ".corrupt")


def _unreadable(exc: Exception) -> str:
    """Why torch.load failed, without torch's advice to load with weights_only=False (which runs the file's code)."""
    if "weights only load failed" in str(exc).lower():
        return ("not a gem3d checkpoint, or a damaged one: it holds objects other than tensors and plain values, "
                "which gem3d never loads")
    detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return f"corrupt, truncated or not a torch file? {detail}"


def load_training_state(path: str | Path, warn: Any, **expect: Any) -> dict:
    """Load a resumable training state; when it is corrupt (or missing), fall back to `<name>.prev` if that
    one is good.

    Taking the fallback moves the corrupt file aside to `<name>.corrupt`, so the next save keeps the good
    `.prev` instead of linking the corrupt file into it, and `warn(msg)` receives one line. Without a
    good older state the InputError says so (the corrupt file is left in place for inspection).
    """
    path = Path(path)
    try:
        return load_checkpoint(path, **expect)
    except InputError as exc:
        if "different architecture" in str(exc):
            raise
        prev = previous_path(path)
        if not prev.is_file():
            raise InputError(f"{exc}; no older good state exists (delete the file to train from scratch)") from None
        try:
            payload = load_checkpoint(prev, **expect)
        except InputError as prev_exc:
            raise InputError(f"{exc}; the older state {prev.name} is not usable either ({prev_exc})") from None
        aside = ""
        if path.is_file():
            os.replace(path, corrupt_path(path))
            aside = f" (moved aside to {corrupt_path(path).name})"
        warn(f"{exc}{aside}; resuming from the previous good state {prev} (step {payload['step']})")
        return payload


def inference_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> dict:
    """Full model state_dict for sampling: the EMA weights over the trained parameters, if any.

    `ema_state_dict` holds only the trained parameters, so it is merged into `state_dict`; a
    checkpoint trained without EMA returns `state_dict` unchanged.
    """
    state = dict(checkpoint["state_dict"])
    ema = checkpoint.get("ema_state_dict") if use_ema else None
    if ema:
        for name, value in ema.items():
            if name not in state:
                raise InputError(f"EMA entry {name!r} is not a parameter of the checkpoint's model")
            state[name] = value.to(state[name].dtype)
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], path: str | Path,
                         **hparams: Any) -> None:
    """Load a saved optimizer state; `hparams` (lr, betas, ...) and the implementation flags of the
    optimizer as built now (fused/foreach, which differ between CPU and CUDA) win over the saved ones.
    A state for other parameters (e.g. other trainable_parameters) raises InputError naming `path`.
    """
    flags = [{k: g[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in g}
             for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: optimizer state does not match the trained parameters "
                         f"(other trainable_parameters?): {str(exc).splitlines()[0]}") from exc
    for group, keep in zip(optimizer.param_groups, flags):
        group.update(keep)
        group.update(hparams)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)
            for k, v in st.items():
                # moments saved from a contiguous parameter, loaded for a channels_last one (or back):
                # give them the parameter's strides (CUDA's fused AdamW expects a parameter, its
                # gradient and its moments to share one memory layout)
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def sha256_of(path: str | Path, n_chars: int | None = 16) -> str:
    """Hex SHA-256 of a file's bytes, cut to `n_chars` characters (None: the full 64)."""
    hexdigest = file_sha256(path)
    return hexdigest if n_chars is None else hexdigest[:n_chars]


_PLAIN = (str, int, float, bool, type(None))


def check_storable(obj: Any, where: str, tensors: bool = False) -> None:
    """Checkpoints are loaded with weights_only=True: only plain values (and tensors) read back."""
    if type(obj) in _PLAIN or (tensors and isinstance(obj, torch.Tensor)):  # exact types: np.float64 is a float
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: key {k!r} must be a str or int")
            check_storable(v, f"{where}[{k!r}]", tensors)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_storable(v, f"{where}[{i}]", tensors)
    else:
        raise ValueError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint "
                         "(use str/int/float/bool/None, lists, dicts" + (", tensors)" if tensors else ")"))


def capture_rng_state(generator: torch.Generator) -> dict:
    """torch CPU, CUDA (current device, if initialised), python, numpy and the loop generator states."""
    keys_name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": keys_name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    """Inverse of `capture_rng_state` (the CUDA state goes to the current device)."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    generator.set_state(state["generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (a network's initialisation) with the global torch RNG seeded; restore it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seed_everything(seed: int, generator: torch.Generator) -> None:
    """Seed the loop generator and the global torch (CPU + CUDA), python and numpy RNGs."""
    generator.manual_seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def exported_marker(path: str | Path) -> Path:
    """`<state>.exported`: written once the model file has been exported from a finished training state.

    It tells a rerun of a finished stage apart from a resume: with the marker present and the model
    file gone, the model was removed on purpose (snakemake --forcerun) and training starts over.
    """
    path = Path(path)
    return path.with_name(path.name + ".exported")


def export_model(state: str | Path, out: str | Path, extra: Mapping[str, Any] | None = None) -> dict:
    """Copy a finished training state to its model file (with `extra` merged into its extras), then
    mark the state as exported. Returns the written payload."""
    payload = load_checkpoint(state)
    payload["extra"] = {**(payload.get("extra") or {}), **(extra or {})}
    save_checkpoint(out, payload)
    exported_marker(state).write_text(f"{Path(out)}\n")
    return payload
