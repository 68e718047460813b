"""The leaderboard's PNG figures, drawn from :func:`bench.reporting.leaderboard.rank`'s table.

Robust accuracy with its interval per defense, robust accuracy against cost, and accuracy
against eps from the diagnostics' eps sweep. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.reporting.metrics import Accuracy

FIGURES = {
    "robust": "robust accuracy per defense with 95% intervals",
    "vs_bare": "each purifier's paired difference to its undefended classifier, 95% intervals",
    "robust_vs_cost": "robust accuracy against cost",
    "accuracy_vs_eps": "accuracy against eps (diagnostics' eps sweep), 95% intervals",
}
# One colour and marker per row, the same in every figure (tab20 has 20 distinct colours).
_MARKERS = "osD^v<>Ph*X"
_DPI = 100


@dataclass(frozen=True)
class _Rows:
    """The rows drawn (those with a robust accuracy) and what every figure marks them with."""

    table: pd.DataFrame
    labels: list[str]
    colors: list[Any]
    err: list[list[float]]
    markers: list[str]


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
            fmt=rows.markers[i],
            color=rows.colors[i],
            mfc=rows.colors[i] if table.loc[i, "_trusted"] else "none",
            capsize=3,
            label=rows.labels[i],
        )
    if ok.any():
        ax.set_xscale(scale, **({"linthresh": 1} if scale == "symlog" else {}))
    ax.set_xlabel(name)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.margins(x=0.1)
    ax.grid(alpha=0.3)


def _cost_figure(rows: _Rows) -> bytes | None:
    """Robust accuracy against purifier calls and seconds per image; ``None`` without costs."""
    from matplotlib.figure import Figure

    calls = rows.table["calls/img"].astype(float)
    secs = rows.table["s/img"].astype(float)
    if not (calls.notna().any() or secs.notna().any()):
        return None
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    panels = [
        (calls, "purifier calls per image", "symlog"),
        (secs, "seconds per image", "log"),
    ]
    axes = [fig.add_subplot(1, 2, k) for k in (1, 2)]
    for ax, (x, name, scale) in zip(axes, panels, strict=True):
        _cost_panel(ax, rows, x, name, scale)
    # A legend, not labels at the points: labels of close rows printed over each other.
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda h: len(h[0]))
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle("Robust accuracy against cost (hollow: diagnostics failed)", fontsize=10)
    return _png(fig)


def _eps_figure(rows: _Rows) -> bytes | None:
    """Probe accuracy against eps, one panel per dataset and norm; ``None`` without sweeps."""
    from matplotlib.figure import Figure

    curves = rows.table[rows.table["_eps_curve"].map(len) > 0]
    if curves.empty:
        return None
    groups = list(dict.fromkeys(zip(curves["dataset"], curves["_norm"], strict=True)))
    fig = Figure(figsize=(7.5 * len(groups), 4.5), layout="constrained")
    for k, (dataset, norm) in enumerate(groups, start=1):
        ax = fig.add_subplot(1, len(groups), k)
        part = curves[(curves["dataset"] == dataset) & (curves["_norm"] == norm)]
        for i, row in part.iterrows():
            eps, acc = zip(*row["_eps_curve"], strict=True)
            ax.errorbar(
                eps,
                acc,
                yerr=_curve_errors(acc, row["_eps_n"]),
                fmt="-" if row["_trusted"] else "--",
                marker=rows.markers[i],
                color=rows.colors[i],
                capsize=2,
                label=rows.labels[i],
            )
        for e in part["_eps"].dropna().unique():
            ax.axvline(e, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel(f"eps ({norm}); dotted: the threat's eps")
        ax.set_ylabel("probe PGD accuracy (%) on the diagnostics slice")
        ax.set_ylim(0, 100)
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside, not over
    fig.suptitle("Accuracy against eps, 95% intervals (dashed: diagnostics failed)", fontsize=10)
    return _png(fig)


def _curve_errors(acc: tuple[float, ...], n: Any) -> list[list[float]] | None:
    """Wilson 95% error bars of accuracies (percent) measured on ``n`` images."""
    if n is None or pd.isna(n) or int(n) <= 0:
        return None
    n = int(n)
    bounds = [Accuracy.from_counts(round(a * n / 100), n) for a in acc]
    low = [max(a - 100 * b.low, 0.0) for a, b in zip(acc, bounds, strict=True)]
    high = [max(100 * b.high - a, 0.0) for a, b in zip(acc, bounds, strict=True)]
    return [low, high]


def _paired_figure(rows: _Rows) -> bytes | None:
    """Each purifier's paired difference to its undefended classifier; ``None`` without any."""
    from matplotlib.figure import Figure

    table = rows.table[rows.table["vs bare"].notna()]
    if table.empty:
        return None
    fig = Figure(figsize=(7, 1.2 + 0.35 * len(table)), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(table)))[::-1]
    diff = table["vs bare"].astype(float)
    err = [
        (diff - table["_vs_low"].astype(float)).clip(lower=0).tolist(),
        (table["_vs_high"].astype(float) - diff).clip(lower=0).tolist(),
    ]
    colors = [rows.colors[i] for i in table.index]
    ax.barh(y, diff, xerr=err, color=colors, capsize=3, alpha=0.85)
    ax.axvline(0, color="k", linewidth=1)
    ax.set_yticks(y, [rows.labels[i] for i in table.index], fontsize=8)
    ax.set_xlabel("robust accuracy minus the undefended classifier's (points), same images")
    ax.set_title("Paired difference to the bare classifier (95% intervals)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
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
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    colors = [palette(i % 20) for i in range(len(drawn))]
    markers = [_MARKERS[i % len(_MARKERS)] for i in range(len(drawn))]
    rows = _Rows(drawn, _labels(drawn), colors, _errors(drawn), markers)
    out = {"robust": _robust_figure(rows)}
    draws = (
        ("vs_bare", _paired_figure),
        ("robust_vs_cost", _cost_figure),
        ("accuracy_vs_eps", _eps_figure),
    )
    for name, draw in draws:
        png = draw(rows)
        if png is not None:
            out[name] = png
    return out
