"""One detail page per leaderboard row: everything its record says, in the order it happened.

The main table keeps one line per configuration; the page behind it shows the cascade in its
real order (who attacked how many images and what was left after each attack), the escalation
path, every diagnostic with its measured value and sentence, the cost split, and links to the
record and its configuration. Like the main page it is self-contained HTML.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench.reporting.columns import grad_modes
from bench.reporting.records import EXAMPLES_NAME, RunRecord

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 90em; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1.2em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; }
tr.failed { background: #fff1dc; }
"""


def slug(key: dict[str, Any]) -> str:
    """A file name for a row from its key cells (dataset, threat, classifier, defense, config)."""
    text = "_".join(str(key.get(k, "")) for k in ("dataset", "threat", "classifier", "defense"))
    text += f"_{key.get('config') or 'noconfig'}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def _table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(_td(v) for v in row)
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _td(value: Any) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def cascade(record: RunRecord) -> str:
    """The suite and escalation stages in the order they ran, with what each left standing."""
    rows, before = [], _pct(record.clean_acc.value) if record.clean_acc else None
    for name, a in record.attacks.items():
        after = _pct(a.robust_acc.value)
        # Failed of all the input gradients the attack took (missing, zero, non-finite).
        g = a.gradient_failures or {}
        failed = sum(g.get(k, 0) for k in ("missing", "zero", "nonfinite"))
        fails = f"{failed} of {g.get('gradients', 0)}"
        rows.append(
            [
                name,
                a.kind,
                str(a.view.get("grad", "")),
                a.view.get("eot_samples"),
                a.n_attacked,
                after,
                None if before is None or after is None else round(before - after, 2),
                round(a.wall_s, 1),
                round(a.purifier_calls_per_image, 1),
                a.max_perturbation,
                fails,
            ]
        )
        before = after if record.cascade else before
    header = ["stage", "kind", "grad", "EOT", "attacked", "robust after (%)"]
    header += ["points it took", "s", "calls/img", "max perturbation", "gradient failures"]
    return _table(header, rows)


def escalation_rows(record: RunRecord) -> pd.DataFrame:
    """One row per escalation level (level 0 is the suite): budget, cost, headline accuracy."""
    path = record.escalation or {}
    rows = []
    for lv in path.get("levels", []):
        budget, probe = lv.get("budget", {}), lv.get("probe") or {}
        rows.append(
            {
                "level": lv.get("level"),
                "steps": budget.get("steps"),
                "eot_samples": budget.get("eot_samples"),
                "restarts": budget.get("restarts"),
                "losses": ", ".join(budget.get("loss", [])),
                "attacked": lv.get("attacked"),
                "purifications_per_image": lv.get("purifications_per_image"),
                "wall_s": lv.get("wall_s"),
                "accuracy": lv.get("rules", {}).get(path.get("headline", record.headline_rule)),
                "projected_images": probe.get("projected"),
            }
        )
    return pd.DataFrame(rows)


def diagnostic_rows(record: RunRecord) -> pd.DataFrame:
    """One row per diagnostic check: passed, its measured value and its sentence."""
    checks = (record.diagnostics or {}).get("checks", {})
    return pd.DataFrame(
        [
            {
                "check": name,
                "passed": c.get("passed"),
                "value": str(c.get("value")),
                "detail": c.get("detail"),
            }
            for name, c in checks.items()
        ]
    )


def escalation(record: RunRecord) -> str:
    """The escalation path: per level its budget, images, cost and headline accuracy."""
    path = record.escalation or {}
    if not path.get("levels"):
        return "<p>Not escalated.</p>"
    table = escalation_rows(record)
    table["accuracy"] = table["accuracy"].map(_pct)
    header = [*table.columns[:-2], f"{path.get('headline', record.headline_rule)} (%)"]
    header.append("projected images (probe)")
    state = f"<p><b>{html.escape(str(path.get('state')))}</b>: "
    reason = f"{html.escape(str(path.get('reason', '')))}</p>"
    return state + reason + _table(header, _cells(table))


def diagnostics(record: RunRecord) -> str:
    """Every check with its verdict, measured value and sentence; then the checks skipped.

    A skipped check (for example the unbounded-eps probe, an Lp check, under the flow threat)
    is listed with its reason: a reader must see that it did not run, not assume it passed.
    """
    table = diagnostic_rows(record)
    skipped = (record.diagnostics or {}).get("skipped") or {}
    if table.empty and not skipped:
        return "<p>No diagnostics were run.</p>"
    rows: list[list[Any]] = []
    classes: list[str] = []
    if not table.empty:
        classes = ["" if ok else "failed" for ok in table["passed"]]
        table["passed"] = table["passed"].map(lambda ok: "pass" if ok else "FAIL")
        rows = _cells(table)
    for name, reason in skipped.items():
        rows.append([name, "skipped", None, reason])
        classes.append("")
    return _table(["check", "result", "value", "detail"], rows, classes)


def _cells(table: pd.DataFrame) -> list[list[Any]]:
    """Plain Python cells (NaN blank) for :func:`_table`."""
    rows = table.itertuples(index=False)
    return [[None if pd.isna(v) else plain(v) for v in row] for row in rows]


def plain(value: Any) -> Any:
    """Python scalars for numpy ones."""
    return value.item() if hasattr(value, "item") else value


def cost(record: RunRecord) -> str:
    """The cost split: setup (training or loading), clean judging, suite, escalation, checks."""
    keys = ["setup_s", "clean_s", "attacks_s", "escalation_s", "diagnostics_s", "wall_s"]
    keys += ["purifications_per_image", "purifier_calls_per_image", "peak_memory_mb"]
    rows = [[k, record.cost.get(k)] for k in keys if record.cost.get(k) is not None]
    return _table(["cost", "value"], rows)


def links(paths: list[str], page: Path) -> str:
    """Relative links from the page to each record and its Hydra config.

    The text shows the same relative path, not the absolute one: a committed page must not name
    the directory of the machine that built it.
    """
    items = []
    for p in paths:
        record = Path(p)
        for target, label in (
            (record, "record"),
            (record.parent / ".hydra" / "config.yaml", "config"),
        ):
            if target.exists():
                rel = os.path.relpath(target, page.parent)
                items.append(f'<a href="{html.escape(rel)}">{label}</a> ({html.escape(rel)})')
    return "<p>" + "<br>".join(items) + "</p>" if items else ""


def examples(paths: list[str]) -> str:
    """The run's image grid (``examples.png`` beside the record), embedded; or a sentence."""
    for p in paths:
        png = Path(p).parent / EXAMPLES_NAME
        if png.is_file():
            from PIL import Image

            rows = Image.open(png).text.get("rows", "")
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            alt = "clean, adversarial and purified images"
            return (
                f"<p>Rows, top to bottom: {html.escape(rows)}.</p>"
                f'<img alt="{alt}" src="data:image/png;base64,{data}">'
            )
    return "<p>No images were kept (the record predates them).</p>"


def detail_page(record: RunRecord, paths: list[str], page: Path, title: str) -> str:
    """The detail page of one row (``page`` is where it will be written, for relative links)."""
    verdict = (
        record.verdict
        if isinstance(record.verdict, str)
        else "failed: " + ", ".join(record.verdict)
    )
    summary = _table(
        ["", ""],
        [
            ["clean", _pct(record.clean_acc.value) if record.clean_acc else None],
            ["robust", _pct(record.robust_acc.value) if record.robust_acc else None],
            ["rule", record.headline_rule],
            ["gradient modes", grad_modes(record)],
            ["verdict", verdict],
            ["images", record.n_samples],
            [
                "status",
                record.status if record.error is None else f"{record.status}: {record.error}",
            ],
            ["finished", record.finished],
        ],
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f'<p><a href="../leaderboard.html">leaderboard</a></p><h1>{html.escape(title)}</h1>',
        summary,
        "<h2>Cascade</h2>",
        cascade(record),
        "<h2>Escalation</h2>",
        escalation(record),
        "<h2>Diagnostics</h2>",
        diagnostics(record),
        "<h2>Cost</h2>",
        cost(record),
        "<h2>Images</h2>",
        examples(paths),
        "<h2>Files</h2>",
        links(paths, page),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
