"""The leaderboard: a pure function from run records to a table, plus writing every output.

One row per configuration: dataset, threat, classifier, defense and the record's fingerprint
(the resolved configuration: suite and budgets, profile, images, the defense's arguments), so
a PGD-1 run never replaces an adaptive one. Shards of one configuration are merged into one row
first (:mod:`bench.reporting.merge`). When a configuration was run several times the newest
completed record (or complete shard set) wins and ``runs`` says how many there were; a
configuration whose every run failed shows ``failed`` with the reason. A record with a
mistyped field is skipped with a warning naming the file and the field.

Rows are grouped by dataset, threat and classifier and ranked within each group: rows with
numbers first, by robust accuracy (the per-sample worst case over the suite), highest first. A
row whose diagnostics failed keeps its place and is marked (verdict and shading): a technicality
never sinks it below the bare classifier. Each purifier is compared with its classifier's
undefended row on the same images, and overlapping intervals share a tier
(:mod:`bench.reporting.paired`).

The columns, their formats and the ranking keys are one table, :mod:`bench.reporting.columns`;
the pages are written by :mod:`bench.reporting.writers`, the figures drawn by
:mod:`bench.reporting.figures`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.reporting import columns
from bench.reporting.columns import FAILED_MARK, KEY
from bench.reporting.details import detail_page, slug
from bench.reporting.figures import FIGURES, make_figures
from bench.reporting.merge import Entry, ShardConflictError, merge_accuracies, merge_shards
from bench.reporting.paired import add_paired, add_tiers
from bench.reporting.records import RECORD_NAME, RecordError, RunRecord, check_record
from bench.reporting.writers import public, to_csv, to_html, to_markdown

__all__ = [
    "FAILED_MARK",
    "FIGURES",
    "KEY",
    "Entry",
    "ShardConflictError",
    "Written",
    "build_leaderboard",
    "collect_records",
    "make_figures",
    "merge_accuracies",
    "merge_shards",
    "public",
    "rank",
    "to_csv",
    "to_html",
    "to_markdown",
    "write_leaderboard",
]

log = logging.getLogger(__name__)


def collect_records(*roots: Path) -> list[tuple[Path, RunRecord]]:
    """Every ``record.json`` under the ``roots``, each file once.

    Unreadable records and records with a mistyped field are skipped with a warning that names
    the file and the field.
    """
    paths = sorted({p.resolve() for root in roots for p in Path(root).rglob(RECORD_NAME)})
    found = []
    for path in paths:
        try:
            with open(path) as fh:
                found.append((path, check_record(RunRecord.from_dict(json.load(fh)))))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            log.warning("skipping record %s: %s", path, err)
    return found


def _as_pair(item: RunRecord | tuple[Path | None, RunRecord]) -> tuple[Path | None, RunRecord]:
    return (None, item) if isinstance(item, RunRecord) else item


def _checked(
    items: Iterable[RunRecord | tuple[Path | None, RunRecord]],
) -> Iterable[tuple[Path | None, RunRecord]]:
    """The usable records; a mistyped one is skipped with a warning naming it and the field."""
    for path, record in map(_as_pair, items):
        try:
            yield path, check_record(record)
        except RecordError as err:
            log.warning("skipping record %s: %s", path or f"of {record.defense!r}", err)


def rank(records: Iterable[RunRecord | tuple[Path | None, RunRecord]]) -> pd.DataFrame:
    """The ranked table with its private columns (ranking keys, figure data).

    Args:
        records: records, or ``(path, record)`` pairs (the paths name records in errors).

    Raises:
        ShardConflictError: see :func:`merge_shards`.
    """
    rows = [columns.row(e) for e in merge_shards(_checked(records))]
    if not rows:
        return pd.DataFrame(columns=columns.order(()))
    table = pd.DataFrame(rows)
    table = table.sort_values(columns.NEWEST)
    # One row per configuration: its newest run, with how many runs it had.
    table[columns.RUNS] = table.groupby(KEY)[columns.RUNS].transform("size")
    table = table.groupby(KEY, as_index=False).tail(1)
    table = table.sort_values(
        list(columns.RANKING),
        ascending=list(columns.RANKING.values()),
        na_position="last",
    ).reset_index(drop=True)
    table = add_tiers(add_paired(table))
    return table[columns.order(table.columns)]


def build_leaderboard(records: Iterable[RunRecord | tuple[Path | None, RunRecord]]) -> pd.DataFrame:
    """Rank records into one row per configuration (see the module docstring).

    Args:
        records: records, or ``(path, record)`` pairs (the paths name records in errors).

    Returns:
        A DataFrame with the public columns of :data:`bench.reporting.columns.COLUMNS`: the key
        columns; clean and robust accuracy in percent with their 95% Wilson intervals and,
        where ``config.paper`` holds one, the paper's number beside each; the decision rule;
        one ``robust/<attack>`` column per attack; the gradient modes; the diagnostics verdict;
        the cost (purifier calls and seconds per image, purifier calls per attacked image per
        attack); the paper's reference; the shards merged; the number of images; the status
        (and error) and the time the chosen run finished.

    Raises:
        ShardConflictError: shards of one row from different configurations.
    """
    return public(rank(records))


@dataclass
class Written:
    """What :func:`write_leaderboard` wrote.

    Attributes:
        md: the Markdown page.
        csv: the CSV table.
        html: the self-contained HTML page.
        figures: figure name -> PNG path.
        table: the leaderboard (public columns).
    """

    md: Path
    csv: Path
    html: Path
    figures: dict[str, Path]
    table: pd.DataFrame


DETAILS = "details"


def _write_details(full: pd.DataFrame, where: Path) -> None:
    """One page per row; pages of rows that no longer exist are removed."""
    where.mkdir(parents=True, exist_ok=True)
    written = set()
    for _, row in full.iterrows():
        page = where / f"{slug(row.to_dict())}.html"
        title = f"{row['defense']} / {row['classifier']} / {row['dataset']} {row['threat']}"
        page.write_text(detail_page(row["_record"], list(row["_paths"]), page, title), "utf-8")
        written.add(page)
    for old in where.glob("*.html"):
        if old not in written:
            old.unlink()


def _write_figures(pngs: dict[str, bytes], fig_dir: Path) -> dict[str, Path]:
    """Write the figures drawn; remove the files of those that no longer have data."""
    figures: dict[str, Path] = {}
    for name in FIGURES:
        path = fig_dir / f"{name}.png"
        if name in pngs:
            fig_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pngs[name])
            figures[name] = path
        else:
            path.unlink(missing_ok=True)
    return figures


def write_leaderboard(records_root: Path, out_dir: Path, *, also: Iterable[Path] = ()) -> Written:
    """Build the leaderboard from the records under ``records_root`` and write every output.

    Writes ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` and
    ``figures/<name>.png`` into ``out_dir``; figures that no longer have data are removed.

    Args:
        records_root: the folder searched for records.
        out_dir: where the pages go.
        also: more folders searched (a sweep's own dir); a record under two is read once.

    Raises:
        ShardConflictError: shards of one row from different configurations.
    """
    full = rank(collect_records(records_root, *also))
    out_dir = Path(out_dir)
    pngs = make_figures(full)
    figures = _write_figures(pngs, out_dir / "figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv, page = (out_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "html"))
    rel = {name: f"figures/{p.name}" for name, p in figures.items()}
    md.write_text(to_markdown(full, rel), encoding="utf-8")
    csv.write_text(to_csv(full), encoding="utf-8")
    page.write_text(to_html(full, pngs, detail_dir=DETAILS), encoding="utf-8")
    _write_details(full, out_dir / DETAILS)
    return Written(md, csv, page, figures, public(full))
