"""The leaderboard's PNG figures, drawn from :func:`bench.reporting.leaderboard.rank`'s table.

Robust accuracy with its interval per defense, robust accuracy against cost, and accuracy
against eps from the diagnostics' eps sweep. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pandas as pd

FIGURES = {
    "robust": "robust accuracy per defense with 95% intervals",
    "robust_vs_cost": "robust accuracy against cost",
    "accuracy_vs_eps": "accuracy against eps (diagnostics' eps sweep)",
}
_DPI = 100


@dataclass(frozen=True)
class _Rows:
    """The rows drawn (those with a robust accuracy) and what every figure marks them with."""

    table: pd.DataFrame
    labels: list[str]
    colors: list[str]
    err: list[list[float]]


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
    buf = io.BytesIO()
    # No metadata: a regenerated figure of the same records is byte-identical.
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _robust_figure(rows: _Rows) -> bytes:
    """Robust accuracy per row with its 95% interval; hatched: diagnostics failed."""
    from matplotlib.figure import Figure

    table = rows.table
    fig = Figure(figsize=(7, 1.2 + 0.35 * len(table)), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(table)))[::-1]  # the best-ranked row on top
    bars = ax.barh(y, table["robust"], xerr=rows.err, color=rows.colors, capsize=3, alpha=0.85)
    for bar, trusted in zip(bars, table["_trusted"], strict=True):
        if not trusted:
            bar.set_hatch("//")
    paper = table["paper robust"].astype(float)
    if paper.notna().any():
        ax.scatter(paper, y, marker="x", color="k", zorder=3, label="paper")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, rows.labels, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("robust accuracy (%), worst case over the suite, 95% CI")
    ax.set_title("Robust accuracy (hatched: diagnostics failed)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _cost_panel(ax: Any, rows: _Rows, x: pd.Series, name: str, scale: str) -> None:
    """One panel of the cost figure: robust accuracy against the cost ``x``."""
    table = rows.table
    ok = x.notna() & ((x > 0) | (scale == "symlog"))
    for i in table.index[ok]:
        ax.errorbar(
            x[i],
            table.loc[i, "robust"],
            yerr=[[rows.err[0][i]], [rows.err[1][i]]],
            fmt="o" if table.loc[i, "_trusted"] else "s",
            color=rows.colors[i],
            capsize=3,
        )
        ax.annotate(
            rows.labels[i],
            (x[i], table.loc[i, "robust"]),
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


def _cost_figure(rows: _Rows) -> bytes | None:
    """Robust accuracy against purifier calls and seconds per image; ``None`` without costs."""
    from matplotlib.figure import Figure

    calls = rows.table["calls/img"].astype(float)
    secs = rows.table["s/img"].astype(float)
    if not (calls.notna().any() or secs.notna().any()):
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = [
        (calls, "purifier calls per image", "symlog"),
        (secs, "seconds per image", "log"),
    ]
    for k, (x, name, scale) in enumerate(panels, start=1):
        _cost_panel(fig.add_subplot(1, 2, k), rows, x, name, scale)
    fig.suptitle("Robust accuracy against cost (squares: diagnostics failed)", fontsize=10)
    return _png(fig)


def _eps_figure(rows: _Rows) -> bytes | None:
    """Probe accuracy against eps, one panel per dataset and norm; ``None`` without sweeps."""
    from matplotlib.figure import Figure

    curves = rows.table[rows.table["_eps_curve"].map(len) > 0]
    if curves.empty:
        return None
    groups = list(dict.fromkeys(zip(curves["dataset"], curves["_norm"], strict=True)))
    fig = Figure(figsize=(5 * len(groups), 4), layout="constrained")
    for k, (dataset, norm) in enumerate(groups, start=1):
        ax = fig.add_subplot(1, len(groups), k)
        part = curves[(curves["dataset"] == dataset) & (curves["_norm"] == norm)]
        for i, row in part.iterrows():
            eps, acc = zip(*row["_eps_curve"], strict=True)
            style = "-" if row["_trusted"] else "--"
            ax.plot(eps, acc, style, marker="o", label=rows.labels[i])
        for e in part["_eps"].dropna().unique():
            ax.axvline(e, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel(f"eps ({norm}); dotted: the threat's eps")
        ax.set_ylabel("probe PGD accuracy (%) on the diagnostics slice")
        ax.set_ylim(0, 100)
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Accuracy against eps (dashed: diagnostics failed)", fontsize=10)
    return _png(fig)


def make_figures(table: pd.DataFrame) -> dict[str, bytes]:
    """PNG figures of the ranked table (rows with a robust accuracy only).

    Returns:
        ``robust``: robust accuracy per row with its 95% interval (failed diagnostics hatched,
        a paper's number as a cross); ``robust_vs_cost``: robust accuracy against purifier
        calls and seconds per image; ``accuracy_vs_eps``: the diagnostics' probe accuracy
        against eps per row (one panel per dataset and norm). Figures without data are left
        out.
    """
    if table.empty or "_numbers" not in table:
        return {}
    drawn = table[table["_numbers"] & table["robust"].notna()].reset_index(drop=True)
    if drawn.empty:
        return {}
    colors = ["C0" if t else "C3" for t in drawn["_trusted"]]
    rows = _Rows(drawn, _labels(drawn), colors, _errors(drawn))
    out = {"robust": _robust_figure(rows)}
    for name, draw in (("robust_vs_cost", _cost_figure), ("accuracy_vs_eps", _eps_figure)):
        png = draw(rows)
        if png is not None:
            out[name] = png
    return out
