"""Result tables: a CSV (pandas, full precision) and a Markdown twin, both written atomically.

The Markdown file starts with a title and notes (which extractor, which conventions), so a table
copied anywhere still says how its numbers were made. Markdown is rendered here (no `tabulate`
dependency): floats with 4 significant digits, NaN as "n/a", strings as they are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from gem3d.io import atomic_path


def format_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return format_cell(value.item())
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-style Markdown table of ``df`` (columns as header, no index)."""
    header = [format_cell(c) for c in df.columns]
    rows = [[format_cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_document(title: str, df: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    parts = [f"# {title}\n"]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    parts.append(markdown_table(df))
    return "\n".join(parts)


def write_table(df: pd.DataFrame, csv_path: str | Path, title: str, notes: Sequence[str] = (),
                md_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``df`` to ``csv_path`` and its Markdown twin (same name, ``.md``), each atomically."""
    csv_path = Path(csv_path)
    md_path = csv_path.with_suffix(".md") if md_path is None else Path(md_path)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_document(title, df, notes))
    return csv_path, md_path
