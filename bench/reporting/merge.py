"""Shard merging: the shards of one configuration become one entry, summed from counts.

Shards of one configuration (records with the same ``fingerprint`` and shard count) are merged
into one :class:`Entry`; shards of the same row key whose fingerprints differ are refused
(:class:`ShardConflictError`). Unsharded records pass through as entries of their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.reporting.metrics import Accuracy
from bench.reporting.records import AttackResult, RunRecord


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


def threat_label(record: RunRecord) -> str:
    """The threat as the leaderboard shows it, e.g. ``Linf 0.1``."""
    return f"{record.threat['norm']} {record.threat['eps']:.4g}"


def eps_key(key: str) -> float:
    """The eps of a key of the diagnostics' eps sweep (``inf`` for a key that is no number)."""
    try:
        return float(key)
    except ValueError:
        return math.inf


def eval_seconds(r: RunRecord) -> float:
    """Seconds the evaluation itself took: wall time less readying the networks.

    Training or loading them is ``cost["setup_s"]``, the diagnostics (a fixed slice, whatever
    the subset's size) ``cost["diagnostics_s"]``; records that predate the split count their
    whole wall time.
    """
    return float(r.cost.get("eval_s", r.wall_s)) - float(r.cost.get("diagnostics_s", 0.0))


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
        gradient_failures={
            k: sum(r.gradient_failures.get(k, 0) for r in results) for k in first.gradient_failures
        },
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
    # The loosest state of any shard holds for their union.
    states = [r.verdict for r in records if isinstance(r.verdict, str)]
    state = next((s for s in ("bound", "converged", "ok") if s in states), "not run")
    if not ran:
        return {}, failed or state
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
            for k in sorted(keys, key=eps_key)
        }
    merged = {"checks": checks, "n_samples": sum(weights), "shards": len(ran)}
    return merged, failed or state


def _choose_shards(
    items: list[tuple[Path | None, RunRecord]],
) -> tuple[dict[int, tuple[Path | None, RunRecord]], dict[int, str]]:
    """Per shard index the run to merge (completed ones) and the errors of the failed ones."""
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
    return chosen, failed


def _check_disjoint(chosen: dict[int, tuple[Path | None, RunRecord]], count: int) -> None:
    seen: dict[int, int] = {}
    for index, (path, r) in chosen.items():
        for i in r.indices:
            if i in seen:
                raise ShardConflictError(
                    f"shards {seen[i]} and {index} of {count} (fingerprint {r.fingerprint!r}) "
                    f"both evaluated image {i}; shards must be disjoint ({path})"
                )
            seen[i] = index


def _merged_cost(parts: list[RunRecord]) -> dict[str, Any]:
    peaks = [r.cost["peak_memory_mb"] for r in parts if r.cost.get("peak_memory_mb") is not None]
    return {
        **parts[0].cost,
        "wall_s": sum(r.wall_s for r in parts),
        "eval_s": sum(eval_seconds(r) for r in parts),
        "purifier_calls_per_image": _weighted(
            (r.cost.get("purifier_calls_per_image"), r.n_samples) for r in parts
        ),
        "peak_memory_mb": max(peaks) if peaks else None,
    }


def _merge_records(parts: list[RunRecord], complete: bool) -> RunRecord:
    """One record whose counts are the sums of the completed shards ``parts``."""
    first = parts[0]
    attack_names = [a for a in first.attacks if all(a in r.attacks for r in parts)]
    diagnostics, verdict = _merge_diagnostics(parts)
    cleans = [r.clean_acc for r in parts if r.clean_acc is not None]
    robust = [r.robust_acc for r in parts if r.robust_acc is not None]
    return replace(
        first,
        status="completed" if complete else "partial",
        n_samples=sum(r.n_samples for r in parts),
        indices=[i for r in parts for i in r.indices],
        started=min(r.started for r in parts),
        finished=max(r.finished for r in parts),
        wall_s=sum(r.wall_s for r in parts),
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
        cost=_merged_cost(parts),
        per_sample_file=None,
        error=None,
        shard=None,
    )


def _merge_shard_set(items: list[tuple[Path | None, RunRecord]], count: int) -> Entry:
    """Merge the shards of one configuration (same fingerprint and count) into one entry."""
    chosen, failed = _choose_shards(items)
    if not chosen:
        path, newest = max(items, key=lambda pr: pr[1].finished)
        return Entry(newest, [path], count, (), failed)
    _check_disjoint(chosen, count)
    merged = _merge_records([r for _, r in chosen.values()], complete=len(chosen) == count)
    return Entry(merged, [p for p, _ in chosen.values()], count, tuple(chosen), failed)


def _key(record: RunRecord) -> tuple[str, ...]:
    return (record.dataset, threat_label(record), record.classifier, record.defense)


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
