from __future__ import annotations

import json
from pathlib import Path

from bench.leaderboard import build_leaderboard, collect_records, to_markdown, write_leaderboard
from bench.metrics import Accuracy
from bench.records import AttackResult, RunRecord, read_record, write_record


def make_record(
    *,
    defense: str = "none",
    classifier: str = "small_cnn",
    clean: int = 90,
    robust: int | None = 10,
    status: str = "completed",
    finished: str = "2026-01-01T00:00:00+00:00",
    attacks: dict[str, int] | None = None,
    eps: float = 0.1,
) -> RunRecord:
    n = 100
    attacks = attacks if attacks is not None else ({"pgd": robust} if robust is not None else {})
    return RunRecord(
        status=status,
        choices={"defense": defense, "classifier": classifier},
        config={},
        dataset="fashion_mnist",
        classifier=classifier,
        defense=defense,
        threat={"norm": "Linf", "eps": eps, "name": "linf"},
        n_samples=n,
        indices=list(range(n)),
        seeds={"seed": 0, "subset_seed": 0},
        device="cpu",
        started=finished,
        finished=finished,
        wall_s=1.0,
        versions={},
        git={},
        clean_acc=Accuracy.from_counts(clean, n) if status == "completed" else None,
        robust_acc=Accuracy.from_counts(robust, n) if robust is not None else None,
        attacks={
            k: AttackResult("t", Accuracy.from_counts(v, n), n, 0.1, eps)
            for k, v in attacks.items()
        },
        error=None if status == "completed" else "RuntimeError: boom",
    )


def test_one_row_per_configuration_newest_completed_wins() -> None:
    old = make_record(robust=50, finished="2026-01-01T00:00:00+00:00")
    new = make_record(robust=20, finished="2026-02-01T00:00:00+00:00")
    newest_failed = make_record(status="failed", robust=None, finished="2026-03-01T00:00:00+00:00")
    table = build_leaderboard([new, newest_failed, old])
    assert len(table) == 1
    assert table.loc[0, "robust"] == 20.0
    assert table.loc[0, "status"] == "completed"


def test_failed_configuration_shows_its_error_and_ranks_last() -> None:
    ok = make_record(classifier="a", robust=5)
    failed = make_record(classifier="b", status="failed", robust=None)
    table = build_leaderboard([failed, ok])
    assert list(table["classifier"]) == ["a", "b"]
    assert table.loc[1, "status"] == "failed: RuntimeError: boom"


def test_rows_ranked_by_robust_accuracy_with_per_attack_columns() -> None:
    records = [
        make_record(classifier="weak", robust=3, attacks={"pgd": 5, "autoattack": 3}),
        make_record(classifier="strong", robust=60, attacks={"pgd": 70, "autoattack": 60}),
    ]
    table = build_leaderboard(records)
    assert list(table["classifier"]) == ["strong", "weak"]
    assert table.loc[0, "robust/pgd"] == 70.0 and table.loc[0, "robust/autoattack"] == 60.0
    assert table.loc[0, "robust 95% CI"].startswith("[")
    # Different eps are different rows.
    assert len(build_leaderboard([*records, make_record(classifier="weak", eps=0.2)])) == 3


def test_pure_function_and_files(tmp_path: Path) -> None:
    records = [make_record(classifier="a"), make_record(classifier="b", robust=40)]
    for i, r in enumerate(records):
        write_record(r, tmp_path / "runs" / str(i))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "record.json").write_text("{not json")
    assert read_record(tmp_path / "runs" / "0" / "record.json") == records[0]
    assert len(collect_records(tmp_path)) == 2
    md, csv, table = write_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert table.equals(build_leaderboard(records))
    text = md.read_text()
    assert "| fashion_mnist" in text and "Linf 0.1" in text
    assert csv.read_text().splitlines()[0].startswith("dataset,threat,classifier,defense,clean")
    assert (
        json.loads((tmp_path / "runs" / "1" / "record.json").read_text())["robust_acc"]["value"]
        == 0.4
    )


def test_empty_leaderboard_says_how_to_fill_it() -> None:
    assert "make bench" in to_markdown(build_leaderboard([]))
