"""The train/test split of an import: seeded (the default), chosen by the user (`data.split`), or a
second folder of test cases (`data.test_path`).

`data.split` is a file or a mapping. A file is JSON (a list of test cases, or an object
`{"train": [...], "test": [...]}` / `{"test": [...]}`, e.g. an earlier run's split.json) or text (one test case per line; blank lines
and lines starting with `#` are skipped). With only the test cases named, every other case trains;
with both sides named, a case named on neither side is not imported. Unknown case names, a case on
both sides, a case named twice and an empty side are refused with one line naming the file (or
the config key). The split used is written to `split.json` with where it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gem3d.config import DataConfig
from gem3d.io import InputError


RECORD_KEYS = {"source", "seed", "test_fraction"}  # what split.json records besides the sides (a reused one is fine)


def make_split(case_ids: list[str], test_fraction: float, seed: int) -> dict:
    """Seeded train/test split (at least one case on each side)."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise InputError(f"need at least 2 cases for a train/test split, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(max(1, int(round(test_fraction * len(ids)))), len(ids) - 1)
    test = sorted(ids[i] for i in order[:n_test])
    train = sorted(ids[i] for i in order[n_test:])
    return {"source": "seeded", "seed": seed, "test_fraction": test_fraction, "train": train, "test": test}


def split_source(data: DataConfig) -> str:
    """Where a user split comes from, as its error messages name it: the file, or the config key."""
    return str(data.split) if isinstance(data.split, str) else "config key data.split"


def read_user_split(data: DataConfig) -> dict[str, list[str] | None]:
    """{"train": [...] or None (every other case), "test": [...]} as `data.split` names them."""
    where = split_source(data)
    if isinstance(data.split, dict):
        sides = data.split
    else:
        path = Path(data.split)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise InputError(f"{path}: data.split file not found") from None
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: data.split is not a text or JSON file ({type(exc).__name__})") from None
        sides = _parse_split_text(text, path)
    if not isinstance(sides, dict):
        raise InputError(f"{where}: a split is a list of test cases or {{\"train\": [...], \"test\": [...]}}")
    unknown = sorted(set(sides) - {"train", "test"} - RECORD_KEYS)
    if unknown or sides.get("test") is None:
        raise InputError(f"{where}: a split names 'test' (and optionally 'train') cases; got keys "
                         f"{sorted(sides)}")
    out: dict[str, list[str] | None] = {"train": None, "test": None}
    for side in ("train", "test"):
        names = sides.get(side)
        if names is None:
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise InputError(f"{where}: '{side}' must be a list of case names")
        names = [n.strip() for n in names]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"{where}: case {twice[0]} is named twice on the {side} side")
        if not names:
            raise InputError(f"{where}: the {side} side is empty")
        out[side] = names
    both = sorted(set(out["train"] or ()) & set(out["test"]))
    if both:
        raise InputError(f"{where}: case {both[0]} is on both sides (train and test)"
                         + (f", and {len(both) - 1} more" if len(both) > 1 else ""))
    return out


def _parse_split_text(text: str, path: Path) -> dict:
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: invalid JSON ({exc})") from None
        return {"test": parsed} if isinstance(parsed, list) else parsed
    lines = [line.strip() for line in text.splitlines()]
    return {"test": [line for line in lines if line and not line.startswith("#")]}


def chosen_cases(data: DataConfig, found: list[str]) -> tuple[dict[str, list[str] | None], list[str]]:
    """The user split checked against the found case ids, and the found cases it leaves out
    (named on neither side of a two-sided split). Raised before any case is read."""
    sides = read_user_split(data)
    where = split_source(data)
    known = set(found)
    for side in ("train", "test"):
        unknown = [n for n in sides[side] or () if n not in known]
        if unknown:
            raise InputError(f"{where}: {side} case {unknown[0]} is not in {data.path}"
                             + (f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else "")
                             + f"; its cases are e.g. {', '.join(sorted(found)[:3])}")
    if sides["train"] is None:
        return sides, []
    named = set(sides["train"]) | set(sides["test"])
    return sides, sorted(known - named)


def final_split(data: DataConfig, sides: dict | None, imported: list[str], test_folder: list[str], seed: int,
                n_skipped: int = 0) -> dict:
    """The split of the imported cases (bad cases already skipped), refused when a side is empty."""
    if data.test_path is not None:
        test = sorted(c for c in imported if c in set(test_folder))
        split = {"source": f"data.test_path {data.test_path}",
                 "train": sorted(c for c in imported if c not in set(test)), "test": test}
        where = f"data.test_path ({data.test_path})"
    elif sides is not None:
        test = sorted(c for c in imported if c in set(sides["test"]))
        train = sorted(c for c in imported if c not in set(test)
                       and (sides["train"] is None or c in set(sides["train"])))
        split = {"source": f"data.split {data.split if isinstance(data.split, str) else '(config)'}",
                 "train": train, "test": test}
        where = split_source(data)
    else:
        return make_split(imported, data.test_fraction, seed)
    for side in ("train", "test"):
        if not split[side]:
            raise InputError(f"{where}: the {side} side is empty"
                             + (f" ({n_skipped} bad case(s) skipped)" if n_skipped else ""))
    return split
