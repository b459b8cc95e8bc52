"""Reading and writing volumes with their geometry, and atomic file writes.

A `Volume` keeps the voxel array and its 4x4 affine together (MONAI's habit: geometry travels with
the data). Arrays are indexed as nibabel loads them, (x, y, z); the axial slice axis is the last
one. Every write goes to a temporary file in the same folder and is renamed into place, so a
killed job never leaves a half-written file under the final name (and its temporary goes at the next
write of that name, or when its stage starts: `remove_leftovers`); the file gets the permissions
the user's umask gives a new file, and a full disk is one `InputError` line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger("gem3d.io")

GZIP_MAX_RATIO = 1032  # deflate never expands more than 1032:1, so a gzip of n bytes holds at most 1032 n
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class InputError(ValueError):
    """Bad user input. The message is one line that names the file and the problem."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks; InputError when the file is missing."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    return digest.hexdigest()


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


def _open_nifti(path: Path):
    """(image, voxel shape, stored dtype) of a NIfTI whose header and size were checked (see `read_nifti`)."""
    import nibabel as nib  # here, so the networks and their training import without it (bare GPU nodes)

    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        shape, stored = tuple(int(n) for n in proxy.shape), np.dtype(proxy.dtype)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if stored.fields is not None or stored.kind not in "biuf":
        raise InputError(f"{path}: voxels of type {stored} (RGB, vector or complex data); "
                         "expected one grey value per voxel")
    check_data_size(path, img)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return img, shape, stored


def nifti_shape(path: str | Path) -> tuple[int, ...]:
    """The voxel shape of a NIfTI (trailing length-1 axes past the third dropped), from its header only,
    with `read_nifti`'s checks of the header."""
    return _open_nifti(Path(path))[1]


def read_nifti(path: str | Path, dtype: Any = np.float32, channel: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI's grey values and affine, checked before and after loading: raise `InputError`
    naming the file when it is unreadable, its header claims more data than the file can hold
    (checked before any voxel is read, see `check_data_size`), its voxels are not one grey value
    each (RGB, vector or complex data), or its affine is not finite or singular. Any
    dimensionality; trailing length-1 axes past the third are dropped. With `channel`, the file
    must be 4D and only that index of its fourth axis is read (a multi-channel image, e.g. the MSD
    brain tumour task's FLAIR, T1w, T1gd, T2w); the affine is the spatial one."""
    path = Path(path)
    img, shape, _ = _open_nifti(path)
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(path, affine)
    if channel is not None:
        if len(shape) != 4:
            raise InputError(f"{path}: a channel ({channel}) was asked for, but the image is {len(shape)}D with "
                             f"shape {shape}, not 4D (x, y, z, channel)")
        if not 0 <= channel < shape[3]:
            raise InputError(f"{path}: channel {channel} does not exist; the image has {shape[3]} channels "
                             f"(0..{shape[3] - 1})")
    try:
        if channel is None:
            data = np.asarray(np.asarray(img.dataobj), dtype=dtype).reshape(shape)
        else:
            data = np.asarray(img.dataobj[..., channel], dtype=dtype).reshape(shape[:3])
    except Exception as exc:
        raise InputError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    return data, affine


def read_volume(path: str | Path, dtype: Any = np.float32, channel: int | None = None) -> Volume:
    """Load a 3D NIfTI, or one channel of a 4D one (see `read_nifti` for the checks); anything else
    is an `InputError`."""
    data, affine = read_nifti(path, dtype, channel)
    if data.ndim != 3:
        hint = " (a vector or RGB image?)" if data.ndim > 3 and data.shape[-1] in (3, 4) else ""
        raise InputError(f"{path}: expected a 3D volume, got {data.ndim}D with shape {data.shape}{hint}")
    return Volume(data, affine)


def check_affine(path: Path, affine: np.ndarray) -> None:
    """A usable voxel-to-world affine: finite, and its three voxel axes of non-zero, independent length."""
    if not np.isfinite(affine).all():
        raise InputError(f"{path}: affine has NaN or infinite values (no valid geometry)")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if spacing.min() <= 1e-6 or abs(np.linalg.det(affine[:3, :3])) / spacing.prod() < 1e-6:
        raise InputError(f"{path}: affine is singular (voxel axes of length {np.round(spacing, 4).tolist()}, "
                         "or not independent; no valid geometry)")


def check_data_size(path: Path, img) -> None:
    """Refuse a header that claims more voxel data than its file can hold, before any voxel is read
    (a 4 KB file claiming 1500^3 floats would otherwise allocate 13.5 GB before failing).

    Uncompressed: the file must reach offset + voxel bytes. Gzip: first a bound that needs no
    decompression (at most GZIP_MAX_RATIO bytes out per byte in); then the gzip trailer's ISIZE,
    the uncompressed length modulo 4 GiB, exact for a single-member gzip under 4 GiB; when it does
    not settle the question (data past 4 GiB, a multi-member gzip), the stream is decompressed and
    counted in 1 MiB chunks, up to the claimed length and no further, so memory stays bounded.
    """
    proxy = img.dataobj
    if not hasattr(proxy, "offset"):
        return
    need = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize
    data_file = Path(img.file_map["image"].filename or path)
    size = data_file.stat().st_size
    with open(data_file, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(max(size - 4, 0))
        isize = int.from_bytes(f.read(4), "little")
    claim = f"header claims {'x'.join(map(str, proxy.shape))} {np.dtype(proxy.dtype)} ({_bytes(need)} with the header)"
    if not gzipped:
        if size < need:
            raise InputError(f"{path}: {claim} but the file holds {_bytes(size)} (truncated or wrong header)")
        return
    if need > size * GZIP_MAX_RATIO:
        raise InputError(f"{path}: {claim} but a {_bytes(size)} gzip holds at most "
                         f"{_bytes(size * GZIP_MAX_RATIO)} (truncated or wrong header)")
    if need < 2 ** 32 and isize >= need:
        return
    got = 0
    try:
        with gzip.open(data_file, "rb") as stream:
            while got < need:
                chunk = stream.read(min(1 << 20, need - got))
                if not chunk:
                    break
                got += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read NIfTI (corrupt gzip: {exc})".splitlines()[0]) from exc
    if got < need:
        raise InputError(f"{path}: {claim} but the gzip holds {_bytes(got)} (truncated or wrong header)")


def _bytes(n: float) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


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


def umask() -> int:
    """The process's umask (read without changing it where Linux reports it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(exc: OSError, tmp: Path, path: Path) -> InputError:
    """One line naming the final file (a name inside a temporary folder is shown under its final folder)."""
    name = str(exc.filename or path).replace(str(tmp), str(path))
    return InputError(f"no space left on device while writing {name}")


@contextlib.contextmanager
def _disk_full_named(path: Path) -> Iterator[None]:
    """A full disk while preparing to write `path` (its folder, its temporary name) is one line too."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise InputError(f"no space left on device while writing {path}") from exc
        raise


def _final_names(exc: InputError, tmp: Path, path: Path) -> InputError:
    """The same error with the temporary name replaced by the final one (what the user will look for)."""
    return InputError(str(exc).replace(str(tmp), str(path)))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffixes); rename it to `path` on success.

    On an exception the temporary file is removed and `path` is left as it was; a full disk
    becomes an `InputError` naming `path`. A temporary of `path` that a killed run left goes first
    (`remove_leftovers`: one process writes a path at a time).
    """
    path = Path(path)
    suffix = "".join(path.suffixes)
    with _disk_full_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)  # a killed earlier write's temporary
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes it 0600; a new file gets the umask's mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise _disk_full(exc, tmp_path, path) from exc
        if isinstance(exc, InputError) and str(tmp_path) in str(exc):
            raise _final_names(exc, tmp_path, path) from exc
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; rename it to `path` on success, delete it on failure.

    An existing `path` is replaced only after the new content is complete (moved aside to
    `.<name>.old`, then removed); a job killed between those two renames leaves `.<name>.old`,
    which the next use of the same `path` puts back first, and a temporary folder of `path` that a
    killed run left is removed. A full disk becomes an `InputError` naming the file under `path`.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    with _disk_full_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # an earlier swap was interrupted: the previous content is still good
        remove_leftovers(path)  # a killed earlier write's temporary folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; a new folder gets the umask's mode
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise _disk_full(exc, tmp, path) from exc
        if isinstance(exc, InputError) and str(tmp) in str(exc):
            raise _final_names(exc, tmp, path) from exc
        raise


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporaries that `atomic_path` / `atomic_dir` made for `path` in an earlier run that was
    killed: folders `.<name>.<random>.tmp` and files `.<stem>.<random>.tmp<suffixes>` beside it. Another
    path's temporaries never match (the name is the path's own, e.g. `IC.0of2` is not `IC.0of10`). A job
    calls it for its own outputs when it starts (only one job writes a path at a time)."""
    path = Path(path)
    stem, suffixes = path.name.split(".")[0], "".join(path.suffixes)
    patterns = (re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]+\.tmp", re.IGNORECASE),
                re.compile(rf"\.{re.escape(stem)}\.[a-z0-9_]+\.tmp{re.escape(suffixes)}", re.IGNORECASE))
    if not path.parent.is_dir():
        return []
    removed = []
    for leftover in path.parent.iterdir():
        if any(p.fullmatch(leftover.name) for p in patterns):
            log.info("removing %s (left by a killed run of the job writing %s)", leftover, path.name)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: str | Path, doing: str) -> Iterator[None]:
    """Hold an exclusive lock on `<path>.lock` for the block: a second process asking for it gets one InputError
    line ("another process (pid N) is <doing> now") instead of writing the same outputs at the same time. The
    kernel releases the lock when the holder dies, so a killed run never leaves a stale lock; the lock file stays
    (holding the last holder's pid)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = (fh.read().split() or ["?"])[0]  # the pid the holder wrote (one line)
            raise InputError(f"{path}: another process (pid {holder}) is {doing} now; wait for it or stop it "
                             "first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    """A JSON file in UTF-8, -16 or -32 (json's detection from the bytes: a dataset.json saved by Windows tools is
    UTF-16); a missing, unreadable or undecodable file is one InputError line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a JSON file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a JSON text file ({exc.encoding} cannot decode byte {exc.start}: "
                         f"{exc.reason})") from None
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
