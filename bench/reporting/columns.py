"""The leaderboard's columns: one ordered table of specs drives the ranking and every writer.

Each :class:`Column` says how a cell is computed from a merged :class:`~bench.reporting.merge.Entry`
and how it is shown. :func:`row` builds a table row from the specs, :func:`order` puts the
columns in table order, :func:`column` finds the spec of a column, and the writers take their
formats from it. Adding a column is one :class:`Column` in :data:`COLUMNS` (and a sentence in
:data:`INTRO`); nothing else lists column names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from bench.reporting.merge import Entry, eps_key, eval_seconds, threat_label
from bench.reporting.metrics import Accuracy
from bench.reporting.records import RunRecord

FAILED_MARK = "⚠ FAILED: "


@dataclass(frozen=True)
class Column:
    """One leaderboard column, or with ``per_attack`` one column per attack of the suite.

    Attributes:
        name: the header; for a per-attack spec the prefix (``robust/`` gives ``robust/pgd``).
        value: the cell of an entry; for a per-attack spec a mapping attack -> cell (an attack
            left out has no cell in that row).
        fmt: the format spec of a float on the Markdown and HTML pages.
        csv_fmt: the format spec of a float in the CSV; ``None`` writes the value as computed.
        private: a ranking key or figure data, never shown (:func:`public` drops it).
        markdown: whether the Markdown page shows it (the CSV and HTML show every public one).
        main: whether the main tables (Markdown, HTML) show it; otherwise only the CSV and the
            detail pages do (long cells that would push the table past a screen's width).
        key: part of the row key: one row per dataset, threat, classifier, defense and
            configuration (the record's fingerprint).
        css: the class of its HTML cells.
        per_attack: whether the spec expands into one column per attack.
    """

    name: str
    value: Callable[[Entry], Any]
    fmt: str = ".2f"
    csv_fmt: str | None = None
    private: bool = False
    markdown: bool = True
    main: bool = True
    key: bool = False
    css: str = ""
    per_attack: bool = False

    def cells(self, entry: Entry) -> dict[str, Any]:
        """Column name -> cell of ``entry`` (one item, or one per attack for a per-attack spec)."""
        if self.per_attack:
            return {f"{self.name}{a}": v for a, v in self.value(entry).items()}
        return {self.name: self.value(entry)}

    def owns(self, name: str) -> bool:
        """Whether the column ``name`` comes from this spec."""
        return name.startswith(self.name) if self.per_attack else name == self.name

    def text(self, value: Any, *, csv: bool = False) -> str:
        """A cell as text: a float by :attr:`fmt` (by :attr:`csv_fmt` in the CSV), blank if missing.

        Args:
            value: the cell.
            csv: format for the CSV rather than for the pages.
        """
        if missing(value):
            return ""
        fmt = self.csv_fmt if csv else self.fmt
        if isinstance(value, float) and fmt is not None:
            return f"{value:{fmt}}"
        return str(value)


def missing(value: Any) -> bool:
    """Whether a cell is blank (``None`` or NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# -- cell values ---------------------------------------------------------------------------------


def _pct(acc: Accuracy | None) -> float | None:
    return None if acc is None else round(100 * acc.value, 2)


def _ci(acc: Accuracy | None) -> str:
    return "" if acc is None else f"[{100 * acc.low:.1f}, {100 * acc.high:.1f}]"


def _if_numbers(cell: Callable[[RunRecord], Any], blank: Any = None) -> Callable[[Entry], Any]:
    """``cell`` of the record of an entry with accuracies, ``blank`` for one without."""
    return lambda e: cell(e.record) if e.has_numbers else blank


def _robust_low(record: RunRecord) -> float | None:
    return None if record.robust_acc is None else 100 * record.robust_acc.low


def _robust_high(record: RunRecord) -> float | None:
    return None if record.robust_acc is None else 100 * record.robust_acc.high


def _verdict(record: RunRecord) -> str:
    if record.clean_acc is None:
        return ""
    if isinstance(record.verdict, list):
        return FAILED_MARK + ", ".join(record.verdict)
    level = record.escalation.get("level")
    if record.verdict == "converged" and level is not None:
        return f"converged at level {level}"
    if record.verdict == "bound":
        return "bound (upper bound)"
    return str(record.verdict)


def _rule(entry: Entry) -> str:
    record = entry.record
    draws = int(record.decision.get("draws", 1) or 1)
    rule = record.headline_rule
    if rule in ("avg", "worst"):
        return f"{rule} over {draws}"
    if rule == "vote":
        return f"vote of {record.decision.get('vote') or draws}"
    return rule


def _worst(record: RunRecord) -> float | None:
    worst = record.rules.get("worst", {}).get("robust")
    return _pct(worst) if record.decision.get("draws", 1) > 1 else None


def grad_modes(record: RunRecord) -> str:
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


def _calls(record: RunRecord) -> float | None:
    calls = record.cost.get("purifier_calls_per_image")
    return None if calls is None else round(calls, 1)


def _seconds(record: RunRecord) -> float | None:
    n = record.n_samples
    return round(eval_seconds(record) / n, 3) if n else None


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


def _paper(entry: Entry) -> dict[str, Any]:
    """What ``config.paper`` says about the same setting (empty when it says nothing)."""
    record = entry.record
    paper = record.config.get("paper") if isinstance(record.config, dict) else None
    return paper if isinstance(paper, dict) else {}


def _paper_ref(entry: Entry) -> str:
    paper = _paper(entry)
    return ", ".join(str(paper[k]) for k in ("attack", "source") if paper.get(k))


def _eps_curve(record: RunRecord) -> list[tuple[float, float]]:
    check = record.diagnostics.get("checks", {}).get("eps_monotone", {})
    value = check.get("value")
    if not isinstance(value, dict):
        return []
    points = [(eps_key(k), v) for k, v in value.items() if v is not None]
    return sorted((e, 100 * v) for e, v in points if math.isfinite(e))


def _trusted(entry: Entry) -> bool:
    """No check failed (converged, bound, or older records' ``ok``); a failed row may lie."""
    return isinstance(entry.record.verdict, str)


def _row_class(entry: Entry) -> str:
    """The HTML row's classes: ``failed`` (no numbers) or ``untrusted``, and ``partial``."""
    classes = []
    if not entry.has_numbers:
        classes.append("failed")
    elif not _trusted(entry):
        classes.append("untrusted")
    if entry.shard_count is not None and not entry.complete:
        classes.append("partial")
    return " ".join(classes)


# -- the table -----------------------------------------------------------------------------------

# The private column holding the classes of a row on the HTML page.
ROW_CLASS = "_row_class"
# The column counting the runs of a row's configuration.
RUNS = "runs"

COLUMNS: list[Column] = [
    Column("dataset", lambda e: e.record.dataset, key=True),
    Column("threat", lambda e: threat_label(e.record), key=True),
    Column("classifier", lambda e: e.record.classifier, key=True),
    Column("defense", lambda e: e.record.defense, key=True),
    # What else determines the result: runs of different configurations are different rows.
    Column("suite", lambda e: str(e.record.choices.get("suite") or "")),
    Column("profile", lambda e: str(e.record.choices.get("profile") or "")),
    Column("config", lambda e: e.record.fingerprint[:8], key=True, markdown=False),
    Column("clean", _if_numbers(lambda r: _pct(r.clean_acc))),
    Column("clean 95% CI", _if_numbers(lambda r: _ci(r.clean_acc), "")),
    Column("paper clean", lambda e: _paper(e).get("clean")),
    Column("robust", _if_numbers(lambda r: _pct(r.robust_acc))),
    Column("robust 95% CI", _if_numbers(lambda r: _ci(r.robust_acc), "")),
    Column("paper robust", lambda e: _paper(e).get("robust")),
    # Filled by the ranking (bench.reporting.paired): paired difference to the bare classifier
    # on the same images, its exact McNemar p-value, and the tier of overlapping intervals.
    Column("vs bare", lambda e: None, fmt="+.2f"),
    Column("p (McNemar)", lambda e: None, fmt=".2g"),
    Column("tier", lambda e: None),
    Column("rule", _rule),
    Column("robust worst@N", _if_numbers(_worst)),
    Column(
        "robust/",
        _if_numbers(lambda r: {a: _pct(res.robust_acc) for a, res in r.attacks.items()}, {}),
        per_attack=True,
    ),
    Column("grad", lambda e: grad_modes(e.record), main=False),
    Column("verdict", _if_numbers(_verdict, "")),
    Column("calls/img", _if_numbers(_calls)),
    Column("s/img", _if_numbers(_seconds), fmt=".3f"),
    Column(
        "calls/",
        _if_numbers(
            lambda r: {a: round(res.purifier_calls_per_image, 1) for a, res in r.attacks.items()},
            {},
        ),
        markdown=False,
        per_attack=True,
    ),
    Column("paper ref", _paper_ref),
    Column("shards", _shards, css="shards"),
    Column("n", lambda e: e.record.n_samples),
    # Runs of this configuration (the row shows the newest); counted by the ranking.
    Column(RUNS, lambda e: 1),
    Column("status", _status),
    Column("finished", lambda e: e.record.finished, main=False),
    # Private columns: ranking keys and what the figures and the HTML page need.
    Column("_numbers", lambda e: e.has_numbers, private=True),
    Column("_complete", lambda e: e.complete, private=True),
    # Rows whose diagnostics failed rank below trusted ones: their number may be a lie.
    Column("_trusted", _trusted, private=True),
    Column("_robust_low", _if_numbers(_robust_low), private=True),
    Column("_robust_high", _if_numbers(_robust_high), private=True),
    Column("_eps", lambda e: e.record.threat.get("eps"), private=True),
    Column("_norm", lambda e: e.record.threat.get("norm"), private=True),
    Column("_eps_curve", _if_numbers(_eps_curve, []), private=True),
    Column("_eps_n", lambda e: e.record.diagnostics.get("n_samples"), private=True),
    Column("_vs_low", lambda e: None, private=True),  # the paired difference's interval
    Column("_vs_high", lambda e: None, private=True),
    Column("_paths", lambda e: [str(p) for p in e.paths if p is not None], private=True),
    Column("_record", lambda e: e.record, private=True),  # the detail page's source
    Column(ROW_CLASS, _row_class, private=True),
]

KEY = [c.name for c in COLUMNS if c.key]
# Which run of a configuration is shown: the last after sorting by these (ascending), so the
# newest run with numbers, complete shard sets before partial ones, failed runs only where
# nothing completed.
NEWEST = ["_numbers", "_complete", "finished"]
# How rows rank within a dataset, threat and classifier: column -> ascending. A row whose checks
# failed keeps its place by its number and says so in `verdict` (and its shading).
RANKING = {
    "dataset": True,
    "threat": True,
    "classifier": True,
    "_numbers": False,
    "robust": False,
    "clean": False,
}

INTRO = (
    "Accuracies in percent on a fixed, seeded evaluation subset; `robust` is the per-sample "
    "worst case over the suite (an image counts only if it survives every attack) under the "
    "decision rule in `rule` (`single` pass, `avg` or `worst` over N fresh purifications, "
    "majority `vote`); 95% Wilson intervals. `paper clean` / `paper robust` are what a paper "
    "reported for the same setting (`paper ref`: its attack and source). `vs bare` is the robust "
    "accuracy minus that of the same classifier undefended on the same images, `p (McNemar)` "
    "its exact paired test; rows of one dataset, threat and classifier whose intervals overlap "
    "share a `tier`. `robust/<attack>` is "
    "the accuracy after that attack (cumulative in a cascade); `grad` the gradient modes the "
    "attacks used (with EOT samples); `escalate@L` is the suite's lead attack at escalation "
    "level L, run on the white-box survivors until the number stops moving. `verdict` is "
    "`converged at level L`, `bound` (still falling when the budget ran out, or the attack's "
    "view too noisy: the number is an upper bound) or the diagnostics that failed: a failed "
    "row keeps its place by its number, shaded, and is not to be trusted. `calls/img` is "
    "purifier network evaluations per image over the whole run, `s/img` wall-clock seconds per "
    "image of evaluation (training or loading the networks and the diagnostics, which run on "
    "a fixed slice, excluded), `calls/<attack>` "
    "purifier evaluations per attacked image. `shards` says how many "
    "shards of the subset were merged into the row. Each configuration is its own row: `suite`, "
    "`profile` and `config` (the start of the resolved configuration's fingerprint, in the CSV "
    "and HTML) tell them apart, `runs` counts the runs of it, of which the row shows the newest. "
    "Generated by `purebench leaderboard`; do "
    "not edit by hand."
)


def row(entry: Entry) -> dict[str, Any]:
    """The cells of one entry, column name -> value, in table order but for per-attack ones."""
    return {name: value for spec in COLUMNS for name, value in spec.cells(entry).items()}


def column(name: str) -> Column:
    """The spec of the column ``name``; a column no spec owns is shown as a plain public one."""
    for spec in COLUMNS:
        if not spec.per_attack and spec.owns(name):
            return spec
    for spec in COLUMNS:
        if spec.per_attack and spec.owns(name):
            return spec
    return Column(name, lambda e: None)


def order(present: Collection[str]) -> list[str]:
    """The table's columns: public ones first, each per-attack spec's in the order they ran.

    ``present`` lists them as the rows first had them, i.e. in a record's stage order (a
    cascade's cumulative accuracies read left to right).

    Args:
        present: the column names the rows have (only per-attack columns may be missing).
    """
    specs = [c for c in COLUMNS if not c.private] + [c for c in COLUMNS if c.private]
    names: list[str] = []
    for spec in specs:
        if spec.per_attack:
            names += [n for n in present if column(n) is spec]
        else:
            names.append(spec.name)
    return names
