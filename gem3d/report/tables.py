"""The evaluation tables as small self-contained HTML pages for `snakemake --report`.

Snakemake's report shows HTML results inline but offers CSV files only for download, so every
``results/<name>/tables/<table>.csv`` (written by gem3d/evaluation, full precision) is rendered to
``results/<name>/report/tables/<table>.html``: the title and notes of its Markdown twin
(``<table>.md``), then the values with 4 significant digits (as in the Markdown), and, for the
demo, the note that the data are synthetic.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from gem3d.config import Config
from gem3d.io import InputError, atomic_path
from gem3d.paths import Paths
from gem3d.report import TABLES
from gem3d.report.common import data_note

STYLE = """body{font-family:Helvetica,Arial,sans-serif;font-size:13px;margin:12px;color:#222}
h2{font-size:16px;margin:0 0 6px 0}.note{color:#b00000;font-weight:bold;margin:4px 0}
ul{margin:4px 0 10px 18px;padding:0;color:#444}table{border-collapse:collapse}
th,td{border-bottom:1px solid #ddd;padding:3px 9px;white-space:nowrap}th{background:#f2f2f2;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.src{color:#777;font-size:11px;margin-top:8px}"""


NUM_TD = '<td class="num">'


def table_html_path(cfg: Config, name: str) -> Path:
    return Paths(cfg).root / "report" / "tables" / f"{name}.html"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if hasattr(value, "item") and not isinstance(value, str):
        return _cell(value.item())
    return str(value)


def _title_and_notes(md: Path, name: str) -> tuple[str, list[str]]:
    """`# title` and the `- note` lines before the table of a Markdown twin (absent: the table name)."""
    if not md.is_file():
        return name.replace("_", " "), []
    title, notes = name.replace("_", " "), []
    for line in md.read_text().splitlines():
        if line.startswith("|"):
            break
        if line.startswith("# "):
            title = line[2:].strip()
        elif line.startswith("- "):
            notes.append(line[2:].strip())
    return title, notes


def render_table(cfg: Config, name: str) -> Path:
    csv = Paths(cfg).tables / f"{name}.csv"
    if not csv.is_file():
        raise InputError(f"{csv}: table not found (run the evaluation rule that writes it first)")
    try:
        df = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{csv}: cannot read table ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    title, notes = _title_and_notes(csv.with_suffix(".md"), name)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False, name=None):
        cells = "".join((NUM_TD if num else "<td>") + html.escape(_cell(v)) + "</td>" for v, num in zip(row, numeric))
        rows.append(f"<tr>{cells}</tr>")
    note = f'<p class="note">{html.escape(data_note(cfg))}</p>' if cfg.phantoms is not None else ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h2>{html.escape(title)}</h2>\n{note}\n"
            f"{'<ul>' + items + '</ul>' if items else ''}\n<table><thead><tr>{head}</tr></thead><tbody>\n"
            + "\n".join(rows) + f"\n</tbody></table>\n<p class=\"src\">{len(df)} rows; full precision in "
            f"{html.escape(str(csv))}</p>\n</body></html>\n")
    out = table_html_path(cfg, name)
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out


def render_tables(cfg: Config, names: tuple[str, ...] = TABLES) -> list[Path]:
    return [render_table(cfg, name) for name in names]
