from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from scipy.stats import binomtest

from bench.cli import main as cli_main
from bench.reporting import columns
from bench.reporting.columns import Column
from bench.reporting.leaderboard import (
    FAILED_MARK,
    ShardConflictError,
    build_leaderboard,
    collect_records,
    merge_accuracies,
    merge_shards,
    rank,
    to_html,
    to_markdown,
    write_leaderboard,
)
from bench.reporting.metrics import Accuracy
from bench.reporting.paired import mcnemar
from bench.reporting.records import AttackResult, RunRecord, read_record, write_record

EXACT_VIEW = {"grad": "exact", "eot_samples": 1, "randomness": "fresh"}


def _attack(
    robust: Accuracy, n_attacked: int, wall_s: float, max_perturbation: float, view: dict[str, Any]
) -> AttackResult:
    return AttackResult(
        target="t",
        robust_acc=robust,
        n_attacked=n_attacked,
        wall_s=wall_s,
        max_perturbation=max_perturbation,
        view=view,
    )


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
    verdict: str | list[str] = "ok",
    config: dict[str, Any] | None = None,
    n: int = 100,
    wall_s: float = 1.0,
    view: dict[str, Any] | None = None,
    shard: dict[str, int] | None = None,
    fingerprint: str = "",
) -> RunRecord:
    attacks = attacks if attacks is not None else ({"pgd": robust} if robust is not None else {})
    return RunRecord(
        status=status,
        choices={"defense": defense, "classifier": classifier},
        config=config or {},
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
        wall_s=wall_s,
        versions={},
        git={},
        clean_acc=Accuracy.from_counts(clean, n) if status == "completed" else None,
        robust_acc=Accuracy.from_counts(robust, n) if robust is not None else None,
        attacks={
            k: _attack(Accuracy.from_counts(v, n), n, 0.1, eps, view or {})
            for k, v in attacks.items()
        },
        error=None if status == "completed" else "RuntimeError: boom",
        verdict=verdict if status == "completed" else "not run",
        shard=shard,
        fingerprint=fingerprint,
    )


def test_one_row_per_configuration_newest_completed_wins() -> None:
    old = make_record(robust=50, finished="2026-01-01T00:00:00+00:00")
    new = make_record(robust=20, finished="2026-02-01T00:00:00+00:00")
    newest_failed = make_record(status="failed", robust=None, finished="2026-03-01T00:00:00+00:00")
    table = build_leaderboard([new, newest_failed, old])
    assert len(table) == 1
    assert table.loc[0, "robust"] == 20.0
    assert table.loc[0, "status"] == "completed"


def test_two_configurations_of_one_defense_are_two_rows_and_runs_are_counted() -> None:
    pgd = dict(fingerprint="pgd64aaa", robust=40)
    smoke = dict(fingerprint="smoke32b", robust=70)
    table = build_leaderboard(
        [
            make_record(**pgd, finished="2026-01-01T00:00:00+00:00"),
            make_record(**pgd, finished="2026-02-01T00:00:00+00:00", clean=91),
            make_record(**smoke),
        ]
    )
    assert len(table) == 2 and set(table["config"]) == {"pgd64aaa", "smoke32b"}
    row = table.set_index("config").loc["pgd64aaa"]
    assert row["runs"] == 2 and row["clean"] == 91.0  # the newest run of the configuration


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("threat", {"norm": "Linf", "eps": "abc", "name": "linf"}, "threat.eps='abc'"),
        ("threat", {"norm": "Linf", "name": "linf"}, "threat.eps=None"),
        ("n_samples", "64", "n_samples='64'"),
        ("defense", None, "defense=None"),
    ],
)
def test_a_mistyped_record_is_skipped_with_a_warning_naming_file_and_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, value: Any, named: str
) -> None:
    write_record(make_record(defense="good"), tmp_path / "runs" / "good")
    bad = make_record(defense="bad").to_dict()
    bad[field] = value
    path = tmp_path / "runs" / "bad" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING):
        written = write_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert list(written.table["defense"]) == ["good"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(path) in warning and named in warning


def test_failed_configuration_shows_its_error_and_ranks_last() -> None:
    ok = make_record(classifier="a", robust=5)
    failed = make_record(classifier="b", status="failed", robust=None)
    table = build_leaderboard([failed, ok])
    assert list(table["classifier"]) == ["a", "b"]
    assert table.loc[1, "status"] == "failed: RuntimeError: boom"


def test_one_failed_job_of_a_sweep_leaves_the_others_intact() -> None:
    sweep = [
        make_record(classifier="a", robust=30),
        make_record(classifier="b", status="failed", robust=None),
        make_record(classifier="c", robust=40),
    ]
    table = build_leaderboard(sweep)
    # Each classifier is its own group (classifiers are not ranked against each other).
    assert list(table["classifier"]) == ["a", "b", "c"]
    assert list(table["status"]) == ["completed", "failed: RuntimeError: boom", "completed"]
    assert table["robust"].isna()[1]
    assert table.loc[1, "verdict"] == ""


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


def test_a_failed_row_keeps_its_place_and_says_it_failed() -> None:
    lying = make_record(defense="masked", robust=80, verdict=["unbounded", "eps_monotone"])
    honest = make_record(defense="honest", robust=30, verdict="ok")
    unchecked = make_record(defense="unchecked", robust=20, verdict="not run")
    table = build_leaderboard([lying, unchecked, honest])
    assert list(table["defense"]) == ["masked", "honest", "unchecked"]
    assert table.loc[0, "verdict"] == FAILED_MARK + "unbounded, eps_monotone"
    assert table.loc[0, "robust"] == 80.0  # in place by its number, marked as not to be trusted
    page = to_html(rank([lying, unchecked, honest]))
    assert 'class="untrusted"' in page


def test_rule_gradient_modes_cost_and_paper_columns() -> None:
    paper = {"clean": 89.02, "robust": 70.64, "attack": "AutoAttack rand", "source": "Table 2"}
    r = make_record(
        defense="diffpure",
        config={"paper": paper},
        wall_s=50.0,
        view={"grad": "bpda", "eot_samples": 4, "randomness": "fresh"},
        attacks={"bpda": 10, "transfer": 20},
    )
    r.attacks["transfer"].view = {"grad": "transfer", "eot_samples": 1}
    r.attacks["bpda"].purifier_calls_per_image = 123.4
    r.headline_rule, r.decision = "avg", {"draws": 10, "vote": 10}
    r.rules = {"worst": {"robust": Accuracy.from_counts(5, 100)}}
    r.cost = {"purifier_calls_per_image": 456.0, "wall_s": 50.0}
    plain = make_record(defense="none", view=EXACT_VIEW)
    table = build_leaderboard([r, plain]).set_index("defense")
    row = table.loc["diffpure"]
    assert row["rule"] == "avg over 10" and row["robust worst@N"] == 5.0
    assert row["grad"] == "bpda EOT-4, transfer"
    assert row["calls/img"] == 456.0 and row["s/img"] == 0.5 and row["calls/bpda"] == 123.4
    # Seconds per image count the evaluation, not the training a cold run did first.
    r.cost = {"purifier_calls_per_image": 456.0, "wall_s": 50.0, "setup_s": 40.0, "eval_s": 10.0}
    assert build_leaderboard([r]).loc[0, "s/img"] == 0.1
    assert row["paper clean"] == 89.02 and row["paper robust"] == 70.64
    assert row["paper ref"] == "AutoAttack rand, Table 2"
    assert table.loc["none", "grad"] == "exact" and table.loc["none", "rule"] == "single"
    assert table.loc["none", "paper ref"] == "" and table["paper robust"].isna()["none"]
    # The paper's numbers sit beside ours.
    cols = list(table.reset_index().columns)
    assert cols.index("paper robust") == cols.index("robust 95% CI") + 1
    md = to_markdown(table.reset_index())
    assert "70.64" in md and "AutoAttack rand, Table 2" in md and "nan" not in md


# -- shards --------------------------------------------------------------------------------------


def _flags_record(
    clean: list[bool],
    robust: list[bool],
    avg: list[float],
    start: int,
    *,
    shard: dict[str, int] | None = None,
    fingerprint: str = "cfg1",
    finished: str = "2026-01-01T00:00:00+00:00",
) -> RunRecord:
    """A record whose accuracies are computed from per-image outcomes, as the runner does."""
    n = len(clean)

    def frac(values: list[float]) -> Accuracy:
        total = sum(values)
        ci = Accuracy.from_counts(round(total), n)
        return Accuracy(value=total / n, low=ci.low, high=ci.high, n=n)

    kw = {"shard": shard, "fingerprint": fingerprint, "finished": finished}
    r = make_record(n=n, clean=0, robust=0, wall_s=2.0 * n, **kw)
    r.indices = list(range(start, start + n))
    r.clean_acc = Accuracy.from_counts(sum(clean), n)
    r.robust_acc = Accuracy.from_counts(sum(robust), n)
    r.attacks = {
        "pgd": _attack(Accuracy.from_counts(sum(robust), n), sum(clean), 1.0, 0.1, EXACT_VIEW)
    }
    r.rules = {
        "single": {"clean": r.clean_acc, "robust": r.robust_acc},
        "avg": {"clean": r.clean_acc, "robust": frac(avg)},
    }
    r.cost = {"purifier_calls_per_image": 3.0, "wall_s": r.wall_s}
    return r


def _outcomes(n: int) -> tuple[list[bool], list[bool], list[float]]:
    clean = [i % 7 != 0 for i in range(n)]
    robust = [c and i % 3 == 0 for i, c in enumerate(clean)]
    avg = [0.1 * (i % 10) if c else 0.0 for i, c in enumerate(clean)]
    return clean, robust, avg


def _shards(n: int, count: int, **kw: Any) -> list[RunRecord]:
    clean, robust, avg = _outcomes(n)
    bounds = [round(k * n / count) for k in range(count + 1)]
    return [
        _flags_record(
            clean[a:b], robust[a:b], avg[a:b], a, shard={"index": k, "count": count}, **kw
        )
        for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]


def test_merged_shards_reproduce_the_unsharded_counts() -> None:
    whole = _flags_record(*_outcomes(101), 0)
    shards = _shards(101, 3)
    (entry,) = merge_shards((None, s) for s in reversed(shards))
    merged = entry.record
    assert entry.shards == (0, 1, 2) and entry.complete and merged.status == "completed"
    assert merged.clean_acc == whole.clean_acc
    assert merged.robust_acc == whole.robust_acc
    assert merged.attacks["pgd"].robust_acc == whole.attacks["pgd"].robust_acc
    assert merged.attacks["pgd"].n_attacked == whole.attacks["pgd"].n_attacked
    assert merged.rules["single"] == whole.rules["single"]
    avg, avg_whole = merged.rules["avg"]["robust"], whole.rules["avg"]["robust"]
    assert avg.value == pytest.approx(avg_whole.value) and avg.n == avg_whole.n
    assert (avg.low, avg.high) == (avg_whole.low, avg_whole.high)
    assert sorted(merged.indices) == list(range(101))
    assert merged.wall_s == whole.wall_s and merged.cost["purifier_calls_per_image"] == 3.0

    row = build_leaderboard(shards).iloc[0]
    ref = build_leaderboard([whole]).iloc[0]
    for col in ("clean", "clean 95% CI", "robust", "robust 95% CI", "robust/pgd", "n", "s/img"):
        assert row[col] == ref[col], col
    assert row["shards"] == "3/3" and row["status"] == "completed" and ref["shards"] == ""


def test_merge_accuracies_from_counts() -> None:
    parts = [Accuracy.from_counts(3, 10), Accuracy.from_counts(7, 20)]
    assert merge_accuracies(parts) == Accuracy.from_counts(10, 30)


def test_incomplete_and_failed_shards_are_shown_partial() -> None:
    shards = _shards(60, 3)
    failed = make_record(status="failed", robust=None, shard={"index": 2, "count": 3})
    failed.fingerprint = "cfg1"
    table = build_leaderboard([shards[0], shards[1], failed])
    row = table.iloc[0]
    assert row["shards"] == "2/3 (partial)" and row["n"] == 40
    assert row["status"] == "failed: shard 2/3: RuntimeError: boom"
    first_two = merge_accuracies([s.robust_acc for s in shards[:2] if s.robust_acc])
    assert row["robust"] == round(100 * first_two.value, 2)
    # A missing shard (not run yet) is partial too; a rerun of the failed shard completes it.
    assert build_leaderboard(shards[:2]).iloc[0]["status"] == "partial"
    rerun = build_leaderboard([*shards, failed]).iloc[0]
    assert rerun["shards"] == "3/3" and rerun["status"] == "completed"
    # Every shard failed: the row is failed with the reason, without numbers.
    only_failed = build_leaderboard([failed]).iloc[0]
    assert only_failed["status"].startswith("failed: shard 2/3: RuntimeError")
    assert only_failed["verdict"] == ""


def test_shards_of_different_configurations_are_refused(tmp_path: Path) -> None:
    a = _shards(40, 2, fingerprint="aaaa1111")
    b = _shards(40, 2, fingerprint="bbbb2222")
    with pytest.raises(ShardConflictError, match="aaaa1111.*bbbb2222"):
        build_leaderboard([a[0], b[1]])
    pairs = [(tmp_path / "x" / "record.json", a[0]), (tmp_path / "y" / "record.json", b[1])]
    with pytest.raises(ValueError, match=r"x/record\.json.*y/record\.json"):
        merge_shards(pairs)
    # Two shards of one set that evaluated the same images are refused too.
    overlapping = _shards(40, 2)
    overlapping[1].indices = overlapping[0].indices
    with pytest.raises(ShardConflictError, match="both evaluated image 0"):
        build_leaderboard(overlapping)
    # A complete shard set and an unsharded run of another configuration are two rows.
    table = build_leaderboard([a[0], a[1], _flags_record(*_outcomes(40), 0)])
    assert len(table) == 2 and list(table["runs"]) == [1, 1]


def test_cli_reports_a_shard_conflict_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, r in zip("ab", [_shards(40, 2, fingerprint="f1")[0], _shards(40, 2)[1]], strict=True):
        write_record(r, tmp_path / "runs" / name)
    with pytest.raises(SystemExit) as exc:
        cli_main(["leaderboard", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to merge shards") and "'f1'" in err and "'cfg1'" in err


# -- files ---------------------------------------------------------------------------------------


def test_pure_function_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paper = {"clean": 89.0, "robust": 70.6, "attack": "AutoAttack rand", "source": "Table 2"}
    records = [
        make_record(classifier="a", view=EXACT_VIEW, config={"paper": paper}),
        make_record(classifier="b", robust=40, verdict=["unbounded"], view=EXACT_VIEW),
        make_record(classifier="<script>", status="failed", robust=None),
    ]
    records[0].cost = {"purifier_calls_per_image": 20.0}
    records[1].diagnostics = {
        "checks": {"eps_monotone": {"passed": True, "value": {"0.05": 0.8, "0.1": 0.5, "inf": 0}}}
    }
    for i, r in enumerate(records):
        write_record(r, tmp_path / "runs" / str(i))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "record.json").write_text("{not json")
    assert read_record(tmp_path / "runs" / "0" / "record.json") == records[0]
    assert len(collect_records(tmp_path)) == 3
    out = write_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert out.table.equals(build_leaderboard(records))
    text = out.md.read_text()
    # Columns every row shares are said once above the main table, not repeated per row.
    assert (
        "Every row: dataset fashion_mnist, threat Linf 0.1" in text
        and "| fashion_mnist" not in text
    )
    assert "AutoAttack rand" in text and "| <script>" in text
    assert "(figures/robust.png)" in text
    header = out.csv.read_text().splitlines()[0]
    assert header.startswith("dataset,threat,classifier,defense,suite,profile,config,clean")
    assert (
        json.loads((tmp_path / "runs" / "1" / "record.json").read_text())["robust_acc"]["value"]
        == 0.4
    )
    assert set(out.figures) == {"robust", "robust_vs_cost", "accuracy_vs_eps"}
    for png in out.figures.values():
        assert png.parent == tmp_path / "out" / "figures"
        assert png.read_bytes().startswith(b"\x89PNG")

    page = out.html.read_text()
    # Self-contained: nothing fetched from the network, figures inline, the sort script inline.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script src" not in page
    assert page.count('src="data:image/png;base64,') == 3
    assert 'addEventListener("click"' in page
    # Cell text is escaped: a classifier named "<script>" is text, not a second script.
    assert "&lt;script&gt;" in page and page.count("<script") == 1
    assert 'class="untrusted"' in page and 'class="failed"' in page
    assert "failed: RuntimeError: boom" in page and "70.60" in page

    # The CLI prints the Markdown page and writes the same files.
    cli_main(["leaderboard", str(tmp_path / "runs"), "--out", str(tmp_path / "cli")])
    assert capsys.readouterr().out == (tmp_path / "cli" / "leaderboard.md").read_text() == text
    assert (tmp_path / "cli" / "leaderboard.html").is_file()


def test_empty_leaderboard_says_how_to_fill_it(tmp_path: Path) -> None:
    assert "make bench" in to_markdown(build_leaderboard([]))
    out = write_leaderboard(tmp_path / "none", tmp_path / "out")
    assert out.figures == {} and "make bench" in out.html.read_text()


# -- the column table ----------------------------------------------------------------------------


def test_a_new_column_spec_shows_formatted_in_every_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = [
        Column("wall ms", lambda e: 1000 * e.record.wall_s, fmt=".1f", csv_fmt=".3f"),
        Column(
            "eps/",
            lambda e: {a: res.max_perturbation for a, res in e.record.attacks.items()},
            fmt=".4f",
            markdown=False,
            per_attack=True,
        ),
        Column("_secret", lambda e: "hidden value", private=True),
    ]
    monkeypatch.setattr(columns, "COLUMNS", [*columns.COLUMNS, *added])
    write_record(
        make_record(wall_s=1.23456, eps=0.25, attacks={"pgd": 10}), tmp_path / "runs" / "0"
    )
    out = write_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert list(out.table.columns)[-2:] == ["wall ms", "eps/pgd"]

    md = out.md.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    assert header.split("|")[-2].strip() == "wall ms" and "eps/pgd" not in md
    assert "1234.6 |" in md
    csv = out.csv.read_text().splitlines()
    assert csv[0].endswith(",finished,wall ms,eps/pgd")
    assert csv[1].endswith(",1234.560,0.25")  # csv_fmt, or the value as computed without one
    page = out.html.read_text()
    # Per-attack columns are the CSV's and the detail pages', not the main table's.
    assert "<th>wall ms</th></tr>" in page and "<th>eps/pgd</th>" not in page
    assert '<td class="num">1234.6</td></tr>' in page
    assert "hidden value" not in md + out.csv.read_text() + page


def test_every_public_column_comes_from_the_table() -> None:
    records = [make_record(attacks={"pgd": 20, "apgd": 10}), make_record(classifier="b")]
    table = build_leaderboard(records)
    specs = [columns.column(c) for c in table.columns]
    assert all(not spec.private for spec in specs)
    assert [s.name for s in specs if not s.per_attack] == [
        c.name for c in columns.COLUMNS if not c.private and not c.per_attack
    ]
    assert columns.column("calls/img").name == "calls/img"
    assert columns.column("calls/pgd").name == "calls/" and columns.column("calls/pgd").per_attack
    # Per-attack columns in the order the attacks ran (pgd, then apgd), not alphabetical.
    assert list(table.columns).index("robust/pgd") + 1 == list(table.columns).index("robust/apgd")


# -- paired comparison and tiers -------------------------------------------------------------


def test_mcnemar_counts_the_discordant_images_only() -> None:
    idx = list(range(10))
    defended = pd.Series([1.0] * 7 + [0.75, 0.25, 0.0], index=idx)  # avg: 0.75 counts robust
    bare = pd.Series([0.0] * 8 + [1.0, 0.0], index=idx)
    paired = mcnemar(defended, bare)
    assert paired is not None and paired.diff == pytest.approx(100 * (8.0 - 1.0) / 10)
    assert paired.p == pytest.approx(binomtest(8, 9, 0.5).pvalue)  # 8 gained, 1 lost
    assert paired.low < 70.0 < paired.high
    assert mcnemar(defended, bare.iloc[:5]) is None  # not the same images


def _with_per_sample(root: Path, name: str, record: RunRecord, robust: list[float]) -> None:
    out = root / name
    record.per_sample_file = "per_sample.csv"
    write_record(record, out)
    pd.DataFrame({"index": record.indices, "robust": robust}).to_csv(out / "per_sample.csv")


def test_each_purifier_is_compared_with_its_own_baseline_on_the_same_images(
    tmp_path: Path,
) -> None:
    n = 40
    bare = [1.0] * 4 + [0.0] * 36  # 10%
    purifier = [1.0] * 4 + [0.75] * 16 + [0.25] * 20  # 4 + 16 robust on most draws: 50%
    _with_per_sample(tmp_path, "none", make_record(robust=4, n=n, clean=n), bare)
    _with_per_sample(tmp_path, "pur", make_record(defense="pur", robust=20, n=n, clean=n), purifier)
    other = make_record(defense="pur2", classifier="at", robust=20, n=n, clean=n)
    _with_per_sample(tmp_path, "pur2", other, purifier)  # no baseline of its classifier
    written = write_leaderboard(tmp_path, tmp_path / "out")
    assert "vs_bare" in written.figures  # the paired differences have their own figure
    table = written.table.set_index("defense")
    assert table.loc["pur", "vs bare"] == pytest.approx(100 * (4 + 12 + 5 - 4) / 40)
    assert table.loc["pur", "p (McNemar)"] == pytest.approx(binomtest(16, 16, 0.5).pvalue)
    assert pd.isna(table.loc["pur2", "vs bare"]) and pd.isna(table.loc["none", "vs bare"])


def test_rows_whose_intervals_overlap_share_a_tier() -> None:
    rows = [make_record(defense=d, robust=r) for d, r in (("a", 60), ("b", 55), ("c", 20))]
    table = build_leaderboard(rows)
    assert list(table["tier"]) == [1, 1, 2]


def test_every_row_has_a_detail_page_linked_from_the_main_table(tmp_path: Path) -> None:
    r = make_record(defense="pur", attacks={"pgd": 30, "square": 28, "escalate@1": 25}, robust=25)
    r.escalation = {
        "state": "converged",
        "reason": "level 1 changed the single accuracy by 3.00 points",
        "headline": "single",
        "levels": [
            {"level": 0, "budget": {"steps": 10, "loss": ["ce"]}, "rules": {"single": 0.28}},
            {"level": 1, "budget": {"steps": 20, "loss": ["ce"]}, "rules": {"single": 0.25}},
        ],
    }
    r.diagnostics = {
        "checks": {"unbounded": {"passed": False, "value": 0.4, "detail": "ouch"}},
        "skipped": {"eps_monotone": "no reason to run it here"},
    }
    r.cost = {"setup_s": 1.0, "attacks_s": 5.0, "diagnostics_s": 2.0}
    write_record(r, tmp_path / "runs" / "pur")
    out = write_leaderboard(tmp_path / "runs", tmp_path / "out")
    (page,) = (tmp_path / "out" / "details").glob("*.html")
    assert f'href="details/{page.name}"' in out.html.read_text()
    text = page.read_text()
    # The cascade in its real order, each stage with what it left standing.
    assert text.index("<td>pgd</td>") < text.index("<td>square</td>") < text.index("escalate@1")
    assert "<td>0 of 0</td>" in text  # gradient failures of all gradients taken
    assert "level 1 changed the single accuracy" in text and "ouch" in text and "FAIL" in text
    # A skipped check is listed with its reason, not left out as if it had passed.
    assert "<td>eps_monotone</td><td>skipped</td>" in text and "no reason to run it here" in text
    assert "diagnostics_s" in text and 'href="../../runs/pur/record.json"' in text
    # No absolute path of the building machine on a page that gets committed.
    assert "(../../runs/pur/record.json)" in text and str(tmp_path) not in text
    # A row that disappears takes its page with it.
    (tmp_path / "runs" / "pur" / "record.json").unlink()
    write_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert not list((tmp_path / "out" / "details").glob("*.html"))
