"""The leaderboard's pages: Markdown, CSV and one self-contained HTML page.

Every writer takes its columns and their formats from :mod:`bench.reporting.columns`. The HTML
page has inline CSS, a few lines of inline JS to sort by a column and the figures as base64 data
URIs: it opens without a network.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any

import pandas as pd

from bench.reporting import columns
from bench.reporting.details import plain, slug
from bench.reporting.figures import FIGURES


def public(table: pd.DataFrame) -> pd.DataFrame:
    """The table without its private columns (ranking keys and figure data)."""
    return table[[c for c in table.columns if not columns.column(c).private]]


# Columns the main table shows even when every row has the same value.
ALWAYS = ("defense", "clean", "robust", "verdict")


def main_columns(shown: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """The main table's columns and the values every row shares.

    The main table shows the columns whose values differ between rows (and :data:`ALWAYS`);
    a column every row has the same value in is said once above the table, an empty one is
    dropped. The per-attack columns and those not ``main`` go to the detail pages and the CSV.
    """
    keep, same = [], {}
    for name in shown.columns:
        spec = columns.column(name)
        if spec.per_attack or not spec.main:
            continue
        distinct = {spec.text(plain(v)) for v in shown[name]}
        if name in ALWAYS or (len(distinct) > 1 and distinct != {""}) or len(shown) == 1:
            keep.append(name)
        elif distinct != {""}:
            same[name] = distinct.pop()
    return keep, same


def _shared(same: dict[str, str]) -> str:
    return "Every row: " + ", ".join(f"{k} {v}" for k, v in same.items()) + "." if same else ""


def to_markdown(table: pd.DataFrame, figures: dict[str, str] | None = None) -> str:
    """Render the leaderboard as a Markdown page.

    Args:
        table: :func:`~bench.reporting.leaderboard.build_leaderboard`'s table (private columns
            are dropped).
        figures: figure name -> path relative to the Markdown file, linked below the table.
    """
    header = f"# PureBench leaderboard\n\n{columns.INTRO}\n\n"
    table = public(table)
    if table.empty:
        return header + "_No records yet: run `make bench`._\n"
    keep, same = main_columns(table)
    keep = [c for c in keep if columns.column(c).markdown]
    floatfmt = [columns.column(c).fmt for c in keep]
    # tabulate leaves only None blank (``missingval``); NaN would print as "nan".
    table = table[keep].astype(object).where(table[keep].notna(), None)
    text = header + (_shared(same) + " Per-attack columns: `leaderboard.csv`.\n\n")
    text += table.to_markdown(index=False, floatfmt=floatfmt, missingval="") + "\n"
    for name, rel in (figures or {}).items():
        text += f"\n![{FIGURES.get(name, name)}]({rel})\n"
    return text


def to_csv(table: pd.DataFrame) -> str:
    """Render the leaderboard's public columns as CSV (floats by each column's ``csv_fmt``)."""
    shown = public(table).copy()
    for name in shown.columns:
        spec = columns.column(name)
        if spec.csv_fmt is not None:
            shown[name] = shown[name].map(lambda v, spec=spec: spec.text(v, csv=True))
    return shown.to_csv(index=False, lineterminator="\n")


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
p.intro { max-width: 70em; }
table.board { border-collapse: collapse; font-size: 13px; }
table.board th, table.board td { border: 1px solid #ccc; padding: 3px 6px; white-space: nowrap; }
table.board th { background: #eee; cursor: pointer; position: sticky; top: 0; }
table.board th[data-order="asc"]::after { content: " \\25B2"; }
table.board th[data-order="desc"]::after { content: " \\25BC"; }
table.board td.num { text-align: right; }
tr.untrusted { background: #fff1dc; }
tr.failed { color: #888; background: #f4f4f4; }
tr.partial td.shards { font-style: italic; }
figure { display: inline-block; margin: 1em 1em 0 0; }
figcaption { font-size: 13px; color: #555; }
"""

# Click a header to sort by it (again to reverse); numbers sort as numbers, blanks last.
_JS = """
const sortBy = (th, col) => () => {
  const body = th.closest("table").tBodies[0];
  const asc = th.dataset.order !== "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const key = row => {
    const t = row.cells[col].textContent.trim();
    const x = parseFloat(t);
    return t === "" ? null : /^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?$/i.test(t) ? x : t;
  };
  [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    const c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : typeof x === "number" ? -1 : 1;
    return asc ? c : -c;
  }).forEach(row => body.appendChild(row));
};
document.querySelectorAll("table.board th").forEach((th, col) => {
  th.addEventListener("click", sortBy(th, col));
});
"""


def _cell(value: Any, spec: columns.Column) -> str:
    if columns.missing(value):
        return "<td></td>"
    number = isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))
    classes = " ".join(c for c in ("num" if number else "", spec.css) if c)
    css = f' class="{classes}"' if classes else ""
    return f"<td{css}>{html.escape(spec.text(value))}</td>"


def _rows(table: pd.DataFrame, shown: pd.DataFrame, detail_dir: str | None) -> list[str]:
    """The table's rows as HTML, numbered in rank order and marked by their ``_row_class``.

    With ``detail_dir`` the defense cell links to the row's detail page there.
    """
    specs = [columns.column(c) for c in shown.columns]
    out = []
    for i, (_, row) in enumerate(table.iterrows(), start=1):
        # The row classes live in a private column: the public table's rows stay unmarked.
        marks = row.get(columns.ROW_CLASS) or ""
        css = f' class="{marks}"' if marks else ""
        cells = []
        for c, s in zip(shown.columns, specs, strict=True):
            cell = _cell(plain(row[c]), s)
            if c == "defense" and detail_dir is not None:
                href = html.escape(f"{detail_dir}/{slug(row.to_dict())}.html")
                cell = cell.replace("<td>", f'<td><a href="{href}">', 1).replace(
                    "</td>", "</a></td>"
                )
            cells.append(cell)
        out.append(f'<tr{css}><td class="num">{i}</td>{"".join(cells)}</tr>')
    return out


def to_html(
    table: pd.DataFrame, figures: dict[str, bytes] | None = None, detail_dir: str | None = None
) -> str:
    """Render the leaderboard as one self-contained HTML page (no network needed to open it).

    Args:
        table: :func:`~bench.reporting.leaderboard.rank`'s or
            :func:`~bench.reporting.leaderboard.build_leaderboard`'s table.
        figures: figure name -> PNG bytes, embedded as base64 data URIs.
        detail_dir: where the rows' detail pages are, relative to the page (no links if None).
    """
    shown = public(table)
    keep, same = main_columns(shown) if not shown.empty else ([], {})
    shown = shown[keep]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>PureBench leaderboard</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>PureBench leaderboard</h1>",
        f'<p class="intro">{_code(html.escape(columns.INTRO))} Click a column header to sort by '
        "it; <code>#</code> restores the ranking.</p>",
    ]
    if shown.empty:
        parts.append("<p><em>No records yet: run <code>make bench</code>.</em></p>")
    else:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["#", *shown.columns])
        parts.append(
            f'<p class="intro">{html.escape(_shared(same))} Per-attack columns: '
            "<code>leaderboard.csv</code> and each row's detail page.</p>"
        )
        parts.append(f'<table class="board"><thead><tr>{head}</tr></thead><tbody>')
        parts += _rows(table, shown, detail_dir)
        parts.append("</tbody></table>")
    for name, png in (figures or {}).items():
        data = base64.b64encode(png).decode("ascii")
        caption = html.escape(FIGURES.get(name, name))
        parts.append(
            f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _code(text: str) -> str:
    """Markdown's `code` spans as HTML."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
