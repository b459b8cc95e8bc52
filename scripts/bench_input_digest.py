#!/usr/bin/env python
"""How long the import's data digest (gem3d/data/input_digest.py) takes when the Snakefile is read.

    python scripts/bench_input_digest.py --template ../shared/data/BraTS2015_deepmedic/brats_2013_pat0001_1 \
        --cases 500 --out /tmp/brats500

Builds `--cases` case folders under `--out` (real copies of the template case's files, so every file
has its own content to hash: each copy gets its case number appended), then times `input_digest` on a
config reading that folder, four ways: no cache (every file hashed), the cache as the last reading left
it (files only stat'ed), after touching every file (all hashed again, same digest) and after editing one
file (one hashed). The page cache holds the files just written: the first and third figures are hashing,
not disk, speed. Never point `--out` into the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

from gem3d.data.input_digest import input_digest


def build(template: Path, cases: int, out: Path) -> tuple[int, int]:
    files = [p for p in sorted(template.iterdir()) if p.is_file()]
    for i in range(cases):
        case = out / f"case_{i:04d}"
        if case.is_dir():
            continue
        case.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, case / f.name)
            with open(case / f.name, "ab") as fh:  # distinct content per copy
                fh.write(f"{i}".encode())
    n = sum(1 for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return n, size


def timed(cfg, cache: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    value = input_digest(cfg, cache)
    return time.perf_counter() - t0, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", type=Path, required=True, help="a case folder to copy")
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True, help="where the case folders go (outside the repo)")
    args = parser.parse_args()
    n, size = build(args.template, args.cases, args.out)
    print(f"{args.cases} cases, {n} files, {size / 1e9:.2f} GB under {args.out}")
    cfg = SimpleNamespace(data=SimpleNamespace(path=str(args.out), test_path=None), phantoms=None)
    cache = args.out.parent / f"{args.out.name}_input_digest_cache.json"
    cache.unlink(missing_ok=True)
    cold, first = timed(cfg, cache)
    print(f"no cache (every file hashed): {cold:.2f} s, cache {cache.stat().st_size / 1e3:.0f} kB")
    warm, same = timed(cfg, cache)
    print(f"cache as left (stat only):    {warm * 1e3:.0f} ms" + ("" if same == first else "  DIGEST CHANGED"))
    now = time.time_ns()
    for p in args.out.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(now, now))
    touched, same = timed(cfg, cache)
    print(f"every file touched:           {touched:.2f} s" + (", same digest" if same == first else "  DIGEST CHANGED"))
    edited = next(p for p in sorted(args.out.rglob("*.nii.gz")))
    with open(edited, "ab") as fh:
        fh.write(b"x")
    one, changed = timed(cfg, cache)
    print(f"one file edited:              {one * 1e3:.0f} ms" + (", new digest" if changed != first else "  SAME DIGEST"))


if __name__ == "__main__":
    main()
