"""Reading and writing volumes with their geometry, and atomic file writes.

A `Volume` keeps the voxel array and its 4x4 affine together (MONAI's habit: geometry travels with
the data). Arrays are indexed as nibabel loads them, (x, y, z); the axial slice axis is the last
one. Every write goes to a temporary file in the same folder and is renamed into place, so a
killed job never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class InputError(ValueError):
    """Bad user input. The message is one line that names the file and the problem."""


@dataclass
class Volume:
    """A 3D array with its voxel-to-world affine (RAS, as nibabel reports it)."""

    array: np.ndarray  # (x, y, z)
    affine: np.ndarray  # (4, 4)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def read_volume(path: str | Path, dtype: Any = np.float32) -> Volume:
    """Load a 3D NIfTI; raise `InputError` naming the file if it is unreadable or not 3D."""
    import nibabel as nib  # here, so the networks and their training import without it (bare GPU nodes)

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got {data.ndim}D with shape {data.shape}")
    return Volume(np.asarray(data, dtype=dtype), np.asarray(img.affine, dtype=np.float64))


def write_volume(path: str | Path, volume: Volume, dtype: Any | None = None) -> Path:
    """Write a NIfTI atomically, keeping the affine (and so spacing and orientation)."""
    import nibabel as nib

    path = Path(path)
    data = volume.array if dtype is None else volume.array.astype(dtype)
    img = nib.Nifti1Image(data, volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffixes); rename it to `path` on success.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; rename it to `path` on success, delete it on failure.

    An existing `path` is replaced only after the new content is complete.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
