"""The content of the input data, as one digest: the import rule's rerun param.

`input_digest(cfg, cache)` digests every file under data.path (and data.test_path): its path below the
folder and the SHA-256 of its bytes. The Snakefile gives it to the import rule as a param, so the import
(and everything after it) reruns when a case is edited, replaced, added or removed, and not when a file
is only touched or copied unchanged. It is computed each time the Snakefile is read, so a file is hashed
only when its size, modification time, change time or inode moved since the last time: the cache
`results/<name>/input_digest_cache.json` maps each file to those and its hash (500 BraTS cases: see
docs/benchmarks.md). A folder that is missing or unreadable is digested as such, never refused: planning
works before the data exist (the import job checks data.path).

The synthetic demo writes its data inside the DAG (make_phantoms), after the Snakefile was read: its
`phantoms.json` records the SHA-256 of every file it wrote, and the files that still hold exactly that
are left out of the digest (their content is the make_phantoms rule's, whose outputs the import reads
already). So the digest is the same before the phantoms exist and after, and an edited phantom case
still changes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from gem3d.io import file_sha256

PHANTOMS_MANIFEST = "phantoms.json"  # gem3d.data.phantoms: {"files": {relative path: sha256}}


def _problem(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "<symbolic link loop>"
    return f"<unreadable: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}>"


def folder_files(root: Path, cache: dict[str, list], seen: dict[str, list],
                 skip: Path | None = None) -> dict[str, str]:
    """{path below `root`: sha256, or '<...>' for an entry that cannot be read} of every file under `root` (a file
    `root`: {its name: sha256}), symbolic links followed (each folder once). `cache` maps a file's path to [size, mtime_ns, ctime_ns,
    inode, sha256]; a file whose first four match reuses the hash. What was looked at goes into `seen`."""
    files: dict[str, str] = {}
    visited: set[tuple[int, int]] = set()
    skipped = os.path.abspath(skip) if skip is not None else None

    def walk(folder: Path, below: str) -> None:
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in visited:
                return
            visited.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            files[below or "."] = _problem(exc)
            return
        for entry in entries:
            rel = f"{below}/{entry.name}" if below else entry.name
            path = Path(entry.path)
            if skipped is not None and entry.name == skip.name and os.path.abspath(path) == skipped:
                continue
            try:
                info = path.stat()  # follows links
            except OSError as exc:
                files[rel] = _problem(exc)
                continue
            if stat.S_ISDIR(info.st_mode):
                walk(path, rel)
            elif not stat.S_ISREG(info.st_mode):
                files[rel] = "<not a file>"
            else:
                hash_one(path, rel, info)

    def hash_one(path: Path, rel: str, info: os.stat_result | None = None) -> None:
        info = info or path.stat()
        key = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        record = cache.get(str(path))
        if record is None or record[:4] != key:
            try:
                record = [*key, file_sha256(path)]
            except OSError as exc:
                files[rel] = _problem(exc)
                return
        seen[str(path)] = record
        files[rel] = record[4]

    if root.is_file():  # one file (an informed image, a region): its name and content
        hash_one(root, root.name)
    elif root.exists() or root.is_symlink():
        walk(root, "")
    return files


def _vouched(root: Path, files: dict[str, str]) -> dict[str, str]:
    """`files` less the ones a phantoms.json in `root` records with this content (see the module)."""
    try:
        recorded = json.loads((root / PHANTOMS_MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return files
    if not isinstance(recorded, dict):
        return files
    left = {rel: sha for rel, sha in files.items() if rel != PHANTOMS_MANIFEST and recorded.get(rel) != sha}
    left.update({rel: "<missing>" for rel in recorded if rel not in files})
    return left


def input_digest(cfg: Any, cache_path: str | Path) -> str:
    """Digest of the content of data.path and data.test_path (see the module); the cache is read from and
    written to `cache_path` (a cache that cannot be read or written is only slower)."""
    return content_digest({f"data.{key}": getattr(cfg.data, key) for key in ("path", "test_path")}, cache_path,
                          vouch=cfg.phantoms is not None)


def content_digest(paths: dict[str, Any], cache_path: str | Path, vouch: bool = False) -> str:
    """Digest of the content of the folders or files `paths` ({name: path or None}), hashed through the cache at
    `cache_path` (one cache per caller: it holds the files this call saw); `vouch`: leave out the files a
    folder's phantoms.json records unchanged. E.g. the generate rule's masks, region and informed image."""
    from gem3d.fingerprint import digest

    cache_path = Path(cache_path)
    try:
        cache = json.loads(cache_path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        cache = {}
    seen: dict[str, list] = {}
    content = {}
    for name, path in paths.items():
        if path is not None:
            files = folder_files(Path(path), cache, seen, skip=cache_path)
            content[name] = _vouched(Path(path), files) if vouch else files
    if seen != cache:
        _write_cache(cache_path, seen)
    return digest(content)


def _write_cache(path: Path, files: dict[str, list]) -> None:
    from gem3d.io import write_json

    with contextlib.suppress(OSError, ValueError):  # read-only or full: the next reading hashes again
        write_json(path, {"note": "gem3d.data.input_digest: path -> [size, mtime_ns, ctime_ns, inode, sha256]",
                          "files": files})
