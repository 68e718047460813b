"""The leaderboard: a pure function from run records to a table, plus writers.

One row per dataset, threat, classifier and defense. Shards of one configuration (records with
the same ``fingerprint`` and shard count) are merged into one row first, from counts; shards of
the same row key whose fingerprints differ are refused (:class:`ShardConflictError`). When a
configuration was run several times the newest completed record (or complete shard set) wins; a
configuration whose every run failed shows ``failed`` with the reason.

Rows are ranked within each dataset and threat: rows with numbers first; among them trusted
rows (diagnostics verdict ``ok`` or ``not run``) above the rows whose diagnostics failed, which
are marked; within each group by robust accuracy (the per-sample worst case over the suite),
highest first. A failed row therefore never ranks above a trusted one, whatever its number.

Writers: Markdown, CSV, one self-contained HTML page (inline CSS, a few lines of inline JS to
sort by a column, figures as base64 data URIs: it opens without a network) and the PNG figures
(robust accuracy with its interval per defense, robust accuracy against cost, accuracy against
eps from the diagnostics' eps sweep).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from bench.reporting.metrics import Accuracy
from bench.reporting.records import RECORD_NAME, AttackResult, RunRecord

log = logging.getLogger(__name__)

KEY = ["dataset", "threat", "classifier", "defense"]
FAILED_MARK = "⚠ FAILED: "
FIGURES = {
    "robust": "robust accuracy per defense with 95% intervals",
    "robust_vs_cost": "robust accuracy against cost",
    "accuracy_vs_eps": "accuracy against eps (diagnostics' eps sweep)",
}
_DPI = 100


class ShardConflictError(ValueError):
    """Shards of one row key come from different configurations (fingerprints)."""


@dataclass
class Entry:
    """One candidate row: a record, or the merge of the shards of one configuration.

    Attributes:
        record: the record (for shards: one record whose counts are the sums of the shards').
        paths: where the record(s) came from (``None`` for records given without a path).
        shard_count: ``n`` of ``shard=i/n``; ``None`` for an unsharded run.
        shards: indices of the completed shards merged into ``record``.
        failed_shards: index -> error of the shards that only have failed runs.
    """

    record: RunRecord
    paths: list[Path | None] = field(default_factory=list)
    shard_count: int | None = None
    shards: tuple[int, ...] = ()
    failed_shards: dict[int, str] = field(default_factory=dict)

    @property
    def has_numbers(self) -> bool:
        """Whether the row has accuracies (a completed run, or some completed shards)."""
        return self.record.clean_acc is not None and (
            self.record.status == "completed" or bool(self.shards)
        )

    @property
    def complete(self) -> bool:
        """Whether every shard of the set (or the unsharded run) completed."""
        if self.shard_count is None:
            return self.record.status == "completed"
        return len(self.shards) == self.shard_count


def collect_records(root: Path) -> list[tuple[Path, RunRecord]]:
    """Every ``record.json`` under ``root`` (unreadable ones are skipped with a warning)."""
    found = []
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            with open(path) as fh:
                found.append((path, RunRecord.from_dict(json.load(fh))))
        except (OSError, ValueError, TypeError, KeyError) as err:
            log.warning("skipping unreadable record %s: %s", path, err)
    return found


# -- merging shards ------------------------------------------------------------------------------


def merge_accuracies(accs: Sequence[Accuracy]) -> Accuracy:
    """One accuracy over the union of the images of ``accs`` (disjoint sets), from counts.

    The count of each part is ``value * n`` (fractional for the ``avg`` rule); the interval is
    the Wilson interval of the rounded total, as :meth:`bench.robust_eval.Ledger.accuracies`
    computes it for one run, so merged shards reproduce the unsharded record.
    """
    n = sum(a.n for a in accs)
    correct = sum(a.value * a.n for a in accs)
    if abs(correct - round(correct)) < 1e-6:
        correct = round(correct)
    ci = Accuracy.from_counts(round(correct), n)
    return Accuracy(value=correct / n, low=ci.low, high=ci.high, n=n)


def _weighted(values: Iterable[tuple[float | None, float]]) -> float | None:
    pairs = [(v, w) for v, w in values if v is not None]
    total = sum(w for _, w in pairs)
    return None if not pairs or total <= 0 else sum(v * w for v, w in pairs) / total


def _merge_attack(results: list[AttackResult]) -> AttackResult:
    first = results[0]
    believed = [r.believed_fooled for r in results]
    on_path = [r.broken_on_path for r in results]
    peaks = [r.peak_memory_mb for r in results if r.peak_memory_mb is not None]
    return replace(
        first,
        robust_acc=merge_accuracies([r.robust_acc for r in results]),
        n_attacked=sum(r.n_attacked for r in results),
        wall_s=sum(r.wall_s for r in results),
        max_perturbation=max(r.max_perturbation for r in results),
        warnings=list(dict.fromkeys(w for r in results for w in r.warnings)),
        rules={
            rule: merge_accuracies([r.rules[rule] for r in results])
            for rule in first.rules
            if all(rule in r.rules for r in results)
        },
        passes={k: sum(r.passes.get(k, 0) for r in results) for k in first.passes},
        purifier_calls_per_image=_weighted(
            (r.purifier_calls_per_image, r.n_attacked) for r in results
        )
        or 0.0,
        peak_memory_mb=max(peaks) if peaks else None,
        believed_fooled=None if None in believed else sum(believed),
        transfer_failure=_weighted((r.transfer_failure, r.believed_fooled or 0) for r in results),
        broken_on_path=None if None in on_path else sum(on_path),
    )


def _merge_diagnostics(records: list[RunRecord]) -> tuple[dict[str, Any], str | list[str]]:
    """Checks failed in any shard fail; the eps sweep is averaged over the shards' slices."""
    ran = [r for r in records if r.diagnostics.get("checks")]
    failed = sorted({c for r in records if isinstance(r.verdict, list) for c in r.verdict})
    if not ran:
        return {}, failed or ("ok" if any(r.verdict == "ok" for r in records) else "not run")
    checks: dict[str, dict[str, Any]] = {}
    for r in ran:
        for name, check in r.diagnostics["checks"].items():
            seen = checks.setdefault(name, dict(check))
            if check.get("passed") is False and seen.get("passed") is not False:
                seen.update(check)
    weights = [r.diagnostics.get("n_samples", 1) for r in ran]
    curves = [r.diagnostics["checks"].get("eps_monotone", {}).get("value") for r in ran]
    if all(isinstance(c, dict) for c in curves) and curves:
        keys = set.intersection(*(set(c) for c in curves))
        checks["eps_monotone"]["value"] = {
            k: _weighted((c[k], w) for c, w in zip(curves, weights, strict=True))
            for k in sorted(keys, key=_eps_key)
        }
    merged = {"checks": checks, "n_samples": sum(weights), "shards": len(ran)}
    return merged, failed or "ok"


def _merge_shard_set(items: list[tuple[Path | None, RunRecord]], count: int) -> Entry:
    """Merge the shards of one configuration (same fingerprint and count) into one entry."""
    by_index: dict[int, list[tuple[Path | None, RunRecord]]] = {}
    for path, r in items:
        assert r.shard is not None
        by_index.setdefault(int(r.shard["index"]), []).append((path, r))
    chosen: dict[int, tuple[Path | None, RunRecord]] = {}
    failed: dict[int, str] = {}
    for index, runs in sorted(by_index.items()):
        # Per shard the newest completed run wins (a rerun of a failed shard replaces it).
        runs.sort(key=lambda pr: (pr[1].status == "completed", pr[1].finished))
        path, r = runs[-1]
        if r.status == "completed" and r.clean_acc is not None:
            chosen[index] = (path, r)
        else:
            failed[index] = r.error or r.status
    if not chosen:
        path, newest = max(items, key=lambda pr: pr[1].finished)
        return Entry(newest, [path], count, (), failed)
    parts = [r for _, r in chosen.values()]
    seen: dict[int, int] = {}
    for index, (path, r) in chosen.items():
        for i in r.indices:
            if i in seen:
                raise ShardConflictError(
                    f"shards {seen[i]} and {index} of {count} (fingerprint {r.fingerprint!r}) "
                    f"both evaluated image {i}; shards must be disjoint ({path})"
                )
            seen[i] = index
    first = parts[0]
    attack_names = [a for a in first.attacks if all(a in r.attacks for r in parts)]
    diagnostics, verdict = _merge_diagnostics(parts)
    n = sum(r.n_samples for r in parts)
    wall = sum(r.wall_s for r in parts)
    eval_s = sum(_eval_seconds(r) for r in parts)
    peaks = [r.cost["peak_memory_mb"] for r in parts if r.cost.get("peak_memory_mb") is not None]
    cost = {
        **first.cost,
        "wall_s": wall,
        "eval_s": eval_s,
        "purifier_calls_per_image": _weighted(
            (r.cost.get("purifier_calls_per_image"), r.n_samples) for r in parts
        ),
        "peak_memory_mb": max(peaks) if peaks else None,
    }
    cleans = [r.clean_acc for r in parts if r.clean_acc is not None]
    robust = [r.robust_acc for r in parts if r.robust_acc is not None]
    merged = replace(
        first,
        status="completed" if len(chosen) == count else "partial",
        n_samples=n,
        indices=[i for r in parts for i in r.indices],
        started=min(r.started for r in parts),
        finished=max(r.finished for r in parts),
        wall_s=wall,
        clean_acc=merge_accuracies(cleans),
        # A clean-only suite claims no robustness; neither does its merge.
        robust_acc=merge_accuracies(robust) if len(robust) == len(parts) else None,
        attacks={a: _merge_attack([r.attacks[a] for r in parts]) for a in attack_names},
        rules={
            rule: {
                k: merge_accuracies([r.rules[rule][k] for r in parts])
                for k in accs
                if all(k in r.rules.get(rule, {}) for r in parts)
            }
            for rule, accs in first.rules.items()
        },
        diagnostics=diagnostics,
        verdict=verdict,
        cost=cost,
        per_sample_file=None,
        error=None,
        shard=None,
    )
    return Entry(merged, [p for p, _ in chosen.values()], count, tuple(chosen), failed)


def _threat(record: RunRecord) -> str:
    return f"{record.threat['norm']} {record.threat['eps']:.4g}"


def _key(record: RunRecord) -> tuple[str, ...]:
    return (record.dataset, _threat(record), record.classifier, record.defense)


def merge_shards(items: Iterable[tuple[Path | None, RunRecord]]) -> list[Entry]:
    """Merge the shards of each configuration; unsharded records pass through one by one.

    Shards merge when they share the fingerprint and the shard count; per shard index the
    newest completed run is used. A set with missing or failed shards is merged from what
    completed (shown as partial).

    Raises:
        ShardConflictError: shards of one (dataset, threat, classifier, defense) key have
            different fingerprints (different configurations), or two shards of one set
            evaluated the same image.
    """
    entries: list[Entry] = []
    sharded: dict[tuple[str, ...], list[tuple[Path | None, RunRecord]]] = {}
    for path, r in items:
        if r.shard is None:
            entries.append(Entry(r, [path]))
        else:
            sharded.setdefault(_key(r), []).append((path, r))
    for key, group in sharded.items():
        prints: dict[str, Path | None] = {}
        for path, r in group:
            prints.setdefault(r.fingerprint, path)
        if len(prints) > 1:
            (fa, pa), (fb, pb) = list(prints.items())[:2]
            raise ShardConflictError(
                f"refusing to merge shards of {' / '.join(key)}: they come from different "
                f"configurations, fingerprint {fa!r} ({pa}) and fingerprint {fb!r} ({pb}); "
                "move one configuration's records elsewhere or rerun all its shards"
            )
        sets: dict[int, list[tuple[Path | None, RunRecord]]] = {}
        for path, r in group:
            sets.setdefault(int(r.shard["count"]), []).append((path, r))
        entries += [_merge_shard_set(s, count) for count, s in sorted(sets.items())]
    return entries


# -- the table -----------------------------------------------------------------------------------


def _pct(acc: Accuracy | None) -> float | None:
    return None if acc is None else round(100 * acc.value, 2)


def _ci(acc: Accuracy | None) -> str:
    return "" if acc is None else f"[{100 * acc.low:.1f}, {100 * acc.high:.1f}]"


def _verdict(record: RunRecord) -> str:
    if record.clean_acc is None:
        return ""
    if isinstance(record.verdict, list):
        return FAILED_MARK + ", ".join(record.verdict)
    return str(record.verdict)


def _rule(record: RunRecord) -> str:
    draws = int(record.decision.get("draws", 1) or 1)
    rule = record.headline_rule
    if rule in ("avg", "worst"):
        return f"{rule} over {draws}"
    if rule == "vote":
        return f"vote of {record.decision.get('vote') or draws}"
    return rule


def _grad_modes(record: RunRecord) -> str:
    """The gradient modes the suite's attacks used, with their EOT samples and randomness."""
    modes = []
    for a in record.attacks.values():
        if not a.view:
            continue
        mode = str(a.view.get("grad", "exact"))
        eot = a.view.get("eot_samples") or 1
        if eot > 1:
            mode += f" EOT-{eot}"
        if a.view.get("randomness") == "known":
            mode += " known-noise"
        modes.append(mode)
    return ", ".join(dict.fromkeys(modes))


def _status(entry: Entry) -> str:
    r = entry.record
    if entry.failed_shards:
        i, err = min(entry.failed_shards.items())
        more = f" (+{len(entry.failed_shards) - 1} more)" if len(entry.failed_shards) > 1 else ""
        return f"failed: shard {i}/{entry.shard_count}: {err}{more}"
    if r.status == "partial":
        return "partial"
    return r.status if r.error is None else f"{r.status}: {r.error}"


def _shards(entry: Entry) -> str:
    if entry.shard_count is None:
        return ""
    text = f"{len(entry.shards)}/{entry.shard_count}"
    return text if entry.complete else f"{text} (partial)"


def _paper(record: RunRecord) -> dict[str, Any]:
    paper = record.config.get("paper") if isinstance(record.config, dict) else None
    if not isinstance(paper, dict):
        return {"paper clean": None, "paper robust": None, "paper ref": ""}
    ref = ", ".join(str(paper[k]) for k in ("attack", "source") if paper.get(k))
    return {
        "paper clean": paper.get("clean"),
        "paper robust": paper.get("robust"),
        "paper ref": ref,
    }


def _eps_key(key: str) -> float:
    try:
        return float(key)
    except ValueError:
        return math.inf


def _eps_curve(record: RunRecord) -> list[tuple[float, float]]:
    check = record.diagnostics.get("checks", {}).get("eps_monotone", {})
    value = check.get("value")
    if not isinstance(value, dict):
        return []
    points = [(_eps_key(k), v) for k, v in value.items() if v is not None]
    return sorted((e, 100 * v) for e, v in points if math.isfinite(e))


def _eval_seconds(r: RunRecord) -> float:
    """Seconds the evaluation itself took: wall time less readying the networks.

    Training or loading them is ``cost["setup_s"]``; records that predate the split count their
    whole wall time.
    """
    return float(r.cost.get("eval_s", r.wall_s))


def _row(entry: Entry) -> dict[str, Any]:
    r = entry.record
    numbers = entry.has_numbers
    n = r.n_samples
    worst = r.rules.get("worst", {}).get("robust")
    calls = r.cost.get("purifier_calls_per_image") if numbers else None
    return {
        "dataset": r.dataset,
        "threat": _threat(r),
        "classifier": r.classifier,
        "defense": r.defense,
        "clean": _pct(r.clean_acc) if numbers else None,
        "clean 95% CI": _ci(r.clean_acc) if numbers else "",
        "paper clean": _paper(r)["paper clean"],
        "robust": _pct(r.robust_acc) if numbers else None,
        "robust 95% CI": _ci(r.robust_acc) if numbers else "",
        "paper robust": _paper(r)["paper robust"],
        "rule": _rule(r),
        "robust worst@N": _pct(worst) if numbers and r.decision.get("draws", 1) > 1 else None,
        **{f"robust/{a}": _pct(res.robust_acc) for a, res in r.attacks.items() if numbers},
        "grad": _grad_modes(r),
        "verdict": _verdict(r) if numbers else "",
        "calls/img": None if calls is None else round(calls, 1),
        "s/img": round(_eval_seconds(r) / n, 3) if numbers and n else None,
        **{
            f"calls/{a}": round(res.purifier_calls_per_image, 1)
            for a, res in r.attacks.items()
            if numbers
        },
        "paper ref": _paper(r)["paper ref"],
        "shards": _shards(entry),
        "n": n,
        "status": _status(entry),
        "finished": r.finished,
        # Private columns: ranking keys and what the figures need.
        "_numbers": numbers,
        "_complete": entry.complete,
        # Rows whose diagnostics failed rank below trusted ones: their number may be a lie.
        "_trusted": r.verdict in ("ok", "not run"),
        "_robust_low": 100 * r.robust_acc.low if numbers and r.robust_acc else None,
        "_robust_high": 100 * r.robust_acc.high if numbers and r.robust_acc else None,
        "_eps": r.threat.get("eps"),
        "_norm": r.threat.get("norm"),
        "_eps_curve": _eps_curve(r) if numbers else [],
        "_paths": [str(p) for p in entry.paths if p is not None],
    }


def _as_pair(item: RunRecord | tuple[Path | None, RunRecord]) -> tuple[Path | None, RunRecord]:
    return (None, item) if isinstance(item, RunRecord) else item


def rank(records: Iterable[RunRecord | tuple[Path | None, RunRecord]]) -> pd.DataFrame:
    """The ranked table with its private columns (``_``-prefixed: ranking keys, figure data).

    Args:
        records: records, or ``(path, record)`` pairs (the paths name records in errors).

    Raises:
        ShardConflictError: see :func:`merge_shards`.
    """
    entries = merge_shards(_as_pair(item) for item in records)
    rows = [_row(e) for e in entries]
    if not rows:
        return pd.DataFrame(columns=[*KEY, "clean", "robust", "n", "status", "finished"])
    table = pd.DataFrame(rows)
    # Newest run with numbers per configuration, complete shard sets before partial ones;
    # failed runs only where nothing completed.
    table = table.sort_values(["_numbers", "_complete", "finished"])
    table = table.groupby(KEY, as_index=False).tail(1)
    table = table.sort_values(
        ["dataset", "threat", "_numbers", "_trusted", "robust", "clean"],
        ascending=[True, True, False, False, False, False],
        na_position="last",
    )
    attacks = sorted(c for c in table.columns if c.startswith("robust/"))
    calls = sorted(c for c in table.columns if c.startswith("calls/") and c != "calls/img")
    order = [*KEY, "clean", "clean 95% CI", "paper clean", "robust", "robust 95% CI"]
    order += ["paper robust", "rule", "robust worst@N", *attacks, "grad", "verdict"]
    order += ["calls/img", "s/img", *calls, "paper ref", "shards", "n", "status", "finished"]
    private = [c for c in table.columns if c.startswith("_")]
    return table[[*order, *private]].reset_index(drop=True)


def public(table: pd.DataFrame) -> pd.DataFrame:
    """The table without its private (``_``-prefixed) columns."""
    return table[[c for c in table.columns if not c.startswith("_")]]


def build_leaderboard(records: Iterable[RunRecord | tuple[Path | None, RunRecord]]) -> pd.DataFrame:
    """Rank records into one row per (dataset, threat, classifier, defense).

    Args:
        records: records, or ``(path, record)`` pairs (the paths name records in errors).

    Returns:
        A DataFrame with the key columns; clean and robust accuracy in percent with their 95%
        Wilson intervals and, where ``config.paper`` holds one, the paper's number beside each;
        the decision rule; one ``robust/<attack>`` column per attack; the gradient modes; the
        diagnostics verdict; the cost (purifier calls and seconds per image, purifier calls
        per attacked image per attack); the paper's reference; the shards merged; the number
        of images; the status (and error) and the time the chosen run finished.

    Raises:
        ShardConflictError: shards of one row from different configurations.
    """
    return public(rank(records))


# -- writers -------------------------------------------------------------------------------------

_INTRO = (
    "Accuracies in percent on a fixed, seeded evaluation subset; `robust` is the per-sample "
    "worst case over the suite (an image counts only if it survives every attack) under the "
    "decision rule in `rule` (`single` pass, `avg` or `worst` over N fresh purifications, "
    "majority `vote`); 95% Wilson intervals. `paper clean` / `paper robust` are what a paper "
    "reported for the same setting (`paper ref`: its attack and source). `robust/<attack>` is "
    "the accuracy after that attack (cumulative in a cascade); `grad` the gradient modes the "
    "attacks used (with EOT samples). `verdict` is `ok` or the diagnostics that failed: a "
    "failed row is not to be trusted and never ranks above a trusted one. `calls/img` is "
    "purifier network evaluations per image over the whole run, `s/img` wall-clock seconds per "
    "image of evaluation (training or loading the networks excluded), `calls/<attack>` "
    "purifier evaluations per attacked image. `shards` says how many "
    "shards of the subset were merged into the row. Generated by `purebench leaderboard`; do "
    "not edit by hand."
)


def to_markdown(table: pd.DataFrame, figures: dict[str, str] | None = None) -> str:
    """Render the leaderboard as a Markdown page.

    Args:
        table: :func:`build_leaderboard`'s table (private columns are dropped).
        figures: figure name -> path relative to the Markdown file, linked below the table.
    """
    header = f"# PureBench leaderboard\n\n{_INTRO}\n\n"
    table = public(table)
    if table.empty:
        return header + "_No records yet: run `make bench`._\n"
    table = table[[c for c in table.columns if not c.startswith("calls/") or c == "calls/img"]]
    floatfmt = [".3f" if c == "s/img" else ".2f" for c in table.columns]
    # tabulate leaves only None blank (``missingval``); NaN would print as "nan".
    table = table.astype(object).where(table.notna(), None)
    text = header + table.to_markdown(index=False, floatfmt=floatfmt, missingval="") + "\n"
    for name, rel in (figures or {}).items():
        text += f"\n![{FIGURES.get(name, name)}]({rel})\n"
    return text


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


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td></td>"
    if isinstance(value, float):
        text = f"{value:.3f}" if column == "s/img" else f"{value:.2f}"
        return f'<td class="num">{text}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    css = ' class="shards"' if column == "shards" else ""
    return f"<td{css}>{html.escape(str(value))}</td>"


def to_html(table: pd.DataFrame, figures: dict[str, bytes] | None = None) -> str:
    """Render the leaderboard as one self-contained HTML page (no network needed to open it).

    Args:
        table: :func:`rank`'s or :func:`build_leaderboard`'s table.
        figures: figure name -> PNG bytes, embedded as base64 data URIs.
    """
    shown = public(table)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>PureBench leaderboard</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>PureBench leaderboard</h1>",
        f'<p class="intro">{_code(html.escape(_INTRO))} Click a column header to sort by it; '
        "<code>#</code> restores the ranking.</p>",
    ]
    if shown.empty:
        parts.append("<p><em>No records yet: run <code>make bench</code>.</em></p>")
    else:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["#", *shown.columns])
        parts.append(f'<table class="board"><thead><tr>{head}</tr></thead><tbody>')
        for i, (_, row) in enumerate(table.iterrows(), start=1):
            classes = []
            if not row.get("_numbers", True):
                classes.append("failed")
            elif not row.get("_trusted", True):
                classes.append("untrusted")
            if row.get("shards") and not row.get("_complete", True):
                classes.append("partial")
            css = f' class="{" ".join(classes)}"' if classes else ""
            cells = "".join(_cell(_plain(row[c]), c) for c in shown.columns)
            parts.append(f'<tr{css}><td class="num">{i}</td>{cells}</tr>')
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


def _plain(value: Any) -> Any:
    """Python scalars for numpy ones."""
    return value.item() if hasattr(value, "item") else value


# -- figures -------------------------------------------------------------------------------------


def _labels(table: pd.DataFrame) -> list[str]:
    groups = table[["dataset", "threat"]].drop_duplicates()
    prefix = len(groups) > 1
    return [
        (f"{r.dataset} {r.threat}: " if prefix else "") + f"{r.defense} / {r.classifier}"
        for r in table.itertuples()
    ]


def _errors(table: pd.DataFrame) -> list[list[float]]:
    # ``avg`` values lie off the integer grid of their interval: clip, never a negative bar.
    low = (table["robust"] - table["_robust_low"]).clip(lower=0)
    high = (table["_robust_high"] - table["robust"]).clip(lower=0)
    return [low.tolist(), high.tolist()]


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    # No metadata: a regenerated figure of the same records is byte-identical.
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def make_figures(table: pd.DataFrame) -> dict[str, bytes]:
    """PNG figures of :func:`rank`'s table (rows with a robust accuracy only).

    Returns:
        ``robust``: robust accuracy per row with its 95% interval (failed diagnostics hatched,
        a paper's number as a cross); ``robust_vs_cost``: robust accuracy against purifier
        calls and seconds per image; ``accuracy_vs_eps``: the diagnostics' probe accuracy
        against eps per row (one panel per dataset and norm). Figures without data are left
        out.
    """
    from matplotlib.figure import Figure

    if table.empty or "_numbers" not in table:
        return {}
    rows = table[table["_numbers"] & table["robust"].notna()].reset_index(drop=True)
    if rows.empty:
        return {}
    labels = _labels(rows)
    colors = ["C0" if t else "C3" for t in rows["_trusted"]]
    err = _errors(rows)
    out: dict[str, bytes] = {}

    fig = Figure(figsize=(7, 1.2 + 0.35 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]  # the best-ranked row on top
    bars = ax.barh(y, rows["robust"], xerr=err, color=colors, capsize=3, alpha=0.85)
    for bar, trusted in zip(bars, rows["_trusted"], strict=True):
        if not trusted:
            bar.set_hatch("//")
    paper = rows["paper robust"].astype(float)
    if paper.notna().any():
        ax.scatter(paper, y, marker="x", color="k", zorder=3, label="paper")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("robust accuracy (%), worst case over the suite, 95% CI")
    ax.set_title("Robust accuracy (hatched: diagnostics failed)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    out["robust"] = _png(fig)

    calls = rows["calls/img"].astype(float)
    secs = rows["s/img"].astype(float)
    if calls.notna().any() or secs.notna().any():
        fig = Figure(figsize=(10, 4), layout="constrained")
        panels = [
            (calls, "purifier calls per image", "symlog"),
            (secs, "seconds per image", "log"),
        ]
        for k, (x, name, scale) in enumerate(panels, start=1):
            ax = fig.add_subplot(1, 2, k)
            ok = x.notna() & ((x > 0) | (scale == "symlog"))
            for i in rows.index[ok]:
                ax.errorbar(
                    x[i],
                    rows.loc[i, "robust"],
                    yerr=[[err[0][i]], [err[1][i]]],
                    fmt="o" if rows.loc[i, "_trusted"] else "s",
                    color=colors[i],
                    capsize=3,
                )
                ax.annotate(
                    labels[i],
                    (x[i], rows.loc[i, "robust"]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            if ok.any():
                ax.set_xscale(scale, **({"linthresh": 1} if scale == "symlog" else {}))
            ax.set_xlabel(name)
            ax.set_ylabel("robust accuracy (%)")
            ax.set_ylim(0, 100)
            ax.margins(x=0.2)  # room for the labels right of the points
            ax.grid(alpha=0.3)
        fig.suptitle("Robust accuracy against cost (squares: diagnostics failed)", fontsize=10)
        out["robust_vs_cost"] = _png(fig)

    curves = rows[rows["_eps_curve"].map(len) > 0]
    if not curves.empty:
        groups = list(dict.fromkeys(zip(curves["dataset"], curves["_norm"], strict=True)))
        fig = Figure(figsize=(5 * len(groups), 4), layout="constrained")
        for k, (dataset, norm) in enumerate(groups, start=1):
            ax = fig.add_subplot(1, len(groups), k)
            part = curves[(curves["dataset"] == dataset) & (curves["_norm"] == norm)]
            for i, row in part.iterrows():
                eps, acc = zip(*row["_eps_curve"], strict=True)
                style = "-" if row["_trusted"] else "--"
                ax.plot(eps, acc, style, marker="o", label=labels[i])
            for e in part["_eps"].dropna().unique():
                ax.axvline(e, color="k", linestyle=":", linewidth=1)
            ax.set_xlabel(f"eps ({norm}); dotted: the threat's eps")
            ax.set_ylabel("probe PGD accuracy (%) on the diagnostics slice")
            ax.set_ylim(0, 100)
            ax.set_title(dataset, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Accuracy against eps (dashed: diagnostics failed)", fontsize=10)
        out["accuracy_vs_eps"] = _png(fig)
    return out


# -- everything at once --------------------------------------------------------------------------


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


def write_leaderboard(records_root: Path, out_dir: Path) -> Written:
    """Build the leaderboard from the records under ``records_root`` and write every output.

    Writes ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` and
    ``figures/<name>.png`` into ``out_dir``; figures that no longer have data are removed.

    Raises:
        ShardConflictError: shards of one row from different configurations.
    """
    full = rank(collect_records(records_root))
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    pngs = make_figures(full)
    figures: dict[str, Path] = {}
    for name in FIGURES:
        path = fig_dir / f"{name}.png"
        if name in pngs:
            fig_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pngs[name])
            figures[name] = path
        else:
            path.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv, page = (out_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "html"))
    rel = {name: f"figures/{p.name}" for name, p in figures.items()}
    md.write_text(to_markdown(full, rel), encoding="utf-8")
    public(full).to_csv(csv, index=False)
    page.write_text(to_html(full, pngs), encoding="utf-8")
    return Written(md, csv, page, figures, public(full))
