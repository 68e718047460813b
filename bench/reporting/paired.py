"""Paired comparisons: each purifier against its own classifier's undefended baseline.

Every row of one dataset evaluates the same seeded subset of images, so a defense and the bare
classifier it protects can be compared image by image rather than through two overlapping
intervals. For each row with a baseline (the ``none`` row of the same dataset, threat and
classifier that judged the same images, preferring one with the same suite and profile) this
module reads both rows' ``per_sample.csv`` and reports

* ``vs bare``: the robust accuracy minus the baseline's, in points, on the same images;
* ``p (McNemar)``: the exact McNemar test of that difference (McNemar 1947): under the null
  both are equally robust, so the images robust under exactly one of them split as a fair
  coin; the two-sided binomial p-value of that split (``scipy.stats.binomtest``).

An image counts as robust for the test when its headline per-sample value is at least 0.5
(``avg``: correct on at least half of the judging draws; the other rules are 0 or 1 already).
It also assigns ``tier``: within a dataset, threat and classifier, rows in robust-accuracy order
share a tier with the tier's first row as long as their interval reaches its interval; a row
entirely below starts the next tier.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.stats import binomtest

from bench.reporting.records import PER_SAMPLE_NAME

log = logging.getLogger(__name__)

BASELINE = "none"
GROUP = ["dataset", "threat", "classifier"]


def robust_per_image(paths: list[str]) -> pd.Series | None:
    """Image index -> headline robust value (0 to 1) from the ``per_sample.csv`` of each path."""
    parts = []
    for path in paths:
        csv = Path(path).parent / PER_SAMPLE_NAME
        try:
            table = pd.read_csv(csv, usecols=["index", "robust"])
        except (OSError, ValueError) as err:
            log.warning("no paired comparison from %s: %s", csv, err)
            return None
        parts.append(table)
    if not parts:
        return None
    table = pd.concat(parts)
    return pd.Series(table["robust"].astype(float).to_numpy(), index=table["index"])


@dataclass(frozen=True)
class Paired:
    """A defended row against its baseline on the same images.

    Attributes:
        diff: robust accuracy minus the baseline's, in points (headline values).
        p: exact two-sided McNemar p-value.
        low: lower end of the 95% interval of the difference (points; Wald on the pairs).
        high: upper end.
    """

    diff: float
    p: float
    low: float
    high: float


def mcnemar(defended: pd.Series, bare: pd.Series) -> Paired | None:
    """The paired comparison on the same images; ``None`` if they differ.

    The difference is of the headline values (the rows' own accuracies); the test counts an
    image robust at a value of at least 0.5, and the interval is the paired (Wald) one of the
    binarised difference, ``(b - c) / n +- 1.96 sqrt(b + c - (b - c)^2 / n) / n``.
    """
    both = defended.index.intersection(bare.index)
    if len(both) == 0 or len(both) != len(defended) or len(both) != len(bare):
        return None
    diff = 100 * float(defended.loc[both].mean() - bare.loc[both].mean())
    d, b = defended.loc[both] >= 0.5, bare.loc[both] >= 0.5
    gained, lost = int((d & ~b).sum()), int((~d & b).sum())
    p = 1.0 if gained + lost == 0 else float(binomtest(gained, gained + lost, 0.5).pvalue)
    n = len(both)
    half = 196 * math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    return Paired(diff, p, diff - half, diff + half)


def _baseline(table: pd.DataFrame, i: int) -> int | None:
    """The index of row ``i``'s baseline row, or ``None``."""
    row = table.loc[i]
    same = (table[GROUP] == row[GROUP]).all(axis=1) & (table["defense"] == BASELINE)
    same &= table["_numbers"].astype(bool) & (table["n"] == row["n"])
    candidates = table.index[same & (table.index != i)]
    if len(candidates) == 0:
        return None
    exact = [
        j
        for j in candidates
        if (table.loc[j, ["suite", "profile"]] == row[["suite", "profile"]]).all()
    ]
    return (exact or list(candidates))[-1]


def add_paired(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``vs bare`` and ``p (McNemar)`` filled where a baseline exists."""
    table = table.copy()
    for name in ("vs bare", "p (McNemar)", "_vs_low", "_vs_high"):
        table[name] = None
    cache: dict[int, pd.Series | None] = {}

    def robust(j: int) -> pd.Series | None:
        if j not in cache:
            cache[j] = robust_per_image(list(table.loc[j, "_paths"]))
        return cache[j]

    for i in table.index:
        if table.loc[i, "defense"] == BASELINE or not table.loc[i, "_numbers"]:
            continue
        j = _baseline(table, i)
        if j is None or not table.loc[i, "_paths"] or not table.loc[j, "_paths"]:
            continue
        mine, bare = robust(i), robust(j)
        result = None if mine is None or bare is None else mcnemar(mine, bare)
        if result is not None:
            table.at[i, "vs bare"], table.at[i, "p (McNemar)"] = round(result.diff, 2), result.p
            table.at[i, "_vs_low"], table.at[i, "_vs_high"] = result.low, result.high
    return table


def add_tiers(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (ranked) with ``tier``: 1, 2, ... within each dataset, threat and classifier."""
    table = table.copy()
    table["tier"] = None
    for _, group in table[table["_numbers"].astype(bool)].groupby(GROUP, sort=False):
        tier, floor = 0, None
        for i in group.index:
            low, high = table.loc[i, "_robust_low"], table.loc[i, "_robust_high"]
            if pd.isna(low) or pd.isna(high):
                continue
            if floor is None or high < floor:
                tier, floor = tier + 1, low
            table.at[i, "tier"] = tier
    return table
