"""The documents' claims that a test can keep true: the fault count of README.md and docs/reliability.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fault_count_in_the_docs_is_the_collected_count():
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *sorted(str(p) for p in (REPO / "tests").glob("test_faults*.py"))],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    collected = sum(1 for line in res.stdout.splitlines() if "::" in line)
    readme = re.search(r"\*\*(\d+) of (\d+) faults\*\*", (REPO / "README.md").read_text())
    reliability = re.search(r"\*\*(\d+) of (\d+) fault tests pass\*\*", (REPO / "docs" / "reliability.md").read_text())
    assert readme and reliability
    assert {int(g) for g in readme.groups() + reliability.groups()} == {collected}, (readme.groups(), collected)
    assert collected >= 60  # the floor: the 49 listed faults plus the kinds already handled
