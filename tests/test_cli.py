"""The real command line: `python -m bench` (single run and --multirun) and `purebench`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench.config
from bench.help import help_text

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = Path(bench.config.CONF_DIR)


def cli(args: list[str], tmp: Path, module: str = "bench") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def fast(tmp: Path, cache_dir: Path) -> list[str]:
    return [
        "dataset=digits",
        "suite=pgd",
        "suite.attacks.pgd.steps=5",
        "n_samples=32",
        "classifier.recipe.epochs=10",
        "classifier.recipe.lr=0.1",
        "device=cpu",
        f"paths.cache_dir={cache_dir}",
        f"paths.results_dir={tmp / 'results'}",
    ]


def test_single_run_writes_its_record_in_the_hydra_run_dir(tmp_path: Path, cache_dir: Path) -> None:
    proc = cli(fast(tmp_path, cache_dir), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = list(
        (tmp_path / "results" / "runs" / "digits" / "none__small_cnn").glob("*/record.json")
    )
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "completed" and record["n_samples"] == 32
    assert (records[0].parent / "per_sample.csv").is_file()
    assert (records[0].parent / ".hydra" / "config.yaml").is_file()


def test_multirun_then_leaderboard(tmp_path: Path, cache_dir: Path) -> None:
    proc = cli(
        ["--multirun", "classifier=small_cnn,small_cnn_fgsm_rs", *fast(tmp_path, cache_dir)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted((tmp_path / "results" / "multiruns").rglob("record.json"))
    assert [json.loads(r.read_text())["classifier"] for r in records] == [
        "small_cnn",
        "small_cnn_fgsm_rs",
    ]
    proc = cli(
        ["leaderboard", str(tmp_path / "results"), "--out", str(tmp_path / "board")],
        tmp_path,
        module="bench.cli",
    )
    assert proc.returncode == 0, proc.stderr
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    # The classifier varies, so it is a column; the shared dataset is said once above the table.
    assert "| small_cnn_fgsm_rs" in board and "Every row: dataset digits" in board
    assert board == proc.stdout
    assert len((tmp_path / "board" / "leaderboard.csv").read_text().splitlines()) == 3


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single line a bad value prints: exit status 2, no traceback, nothing else on stderr."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    ("override", "value", "allowed"),
    [
        ("threat.eps=-1", "threat.eps=-1", "> 0"),
        ("dataset=imagenet21k", "dataset=imagenet21k", "fashion_mnist"),
        ("n_samples=5000", "n_samples=5000", "allowed: 1..500"),
        ("n_samples=-1", "n_samples=-1", "positive integer"),
        ("threat.eps=foo", "threat.eps='foo'", "finite number"),
        ("seed=1.5", "seed=1.5", "integer >= 0"),
        ("defense=difpure", "defense=difpure", "did you mean diffpure? (options: amrm_pure"),
        ("n_sample=64", "n_sample=64", "did you mean n_samples?"),
        ("+n_sample=64", "['n_sample']", "did you mean n_samples?"),
        ("threat.epss=1", "threat.epss=1", "did you mean eps?"),
        ("+decision.rule=vote", "['rule']", "allowed: draws"),
        ("n_samples=[", "'n_samples=['", "override_grammar"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_value_and_no_record(
    tmp_path: Path, override: str, value: str, allowed: str
) -> None:
    proc = cli([*fast(tmp_path, tmp_path / "cache"), override], tmp_path)
    line = one_error_line(proc)
    assert value in line and allowed in line
    assert not list(tmp_path.rglob("record.json"))
    assert not (tmp_path / "cache").exists()


def test_missing_data_names_the_directory_and_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    proc = cli(
        [*fast(tmp_path, tmp_path / "cache"), "dataset=mnist", f"paths.data_dir={missing}"],
        tmp_path,
    )
    line = one_error_line(proc)
    assert str(missing) in line and "purebench data mnist" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for bad in ("n_samples=-1", "defense=difpure"):
        proc = cli([*fast(tmp_path, tmp_path / "cache"), bad, "--debug"], tmp_path)
        assert proc.returncode != 0
        assert "Traceback (most recent call last)" in proc.stderr
        assert bad.split("=")[1] in proc.stderr and "error: " not in proc.stderr


def test_a_sweep_reports_a_bad_option_in_one_line_and_a_failing_job_does_not_stop_it(
    tmp_path: Path,
) -> None:
    proc = cli(
        ["--multirun", *fast(tmp_path, tmp_path / "cache"), "defense=none,difpure"], tmp_path
    )
    assert "did you mean diffpure?" in one_error_line(proc)
    proc = cli(["--multirun", *fast(tmp_path, tmp_path / "cache"), "n_samples=-1,0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job 0 failed: n_samples=-1" in proc.stdout
    assert "job 1 failed: n_samples=0" in proc.stdout


def test_help_lists_every_defense_option_with_its_description(tmp_path: Path) -> None:
    page = cli(["--help"], tmp_path)
    assert page.returncode == 0, page.stderr
    assert cli(["run", "--help"], tmp_path, module="bench.cli").stdout == page.stdout
    assert "powered by Hydra" not in page.stdout
    lines = page.stdout.splitlines()
    for option in sorted((CONF_DIR / "defense").glob("*.yaml")):
        first = next(
            line.lstrip("#").strip()
            for line in option.read_text().splitlines()
            if line.startswith("#") and "@package" not in line
        )
        # The option's line starts with its name and carries the start of its first comment.
        start = " ".join(first.split()[:3])
        assert any(line.split()[:1] == [option.stem] and start in line for line in lines), (
            f"{option.stem}: {start!r} not in the help page"
        )
    for key in ("n_samples=", "device=", "threads=", "seed=", "batch_size=", "paths.results_dir="):
        assert f"  {key}" in page.stdout
    for flag in ("--multirun", "defense._target_=my_module.MyDefense", "--hydra-help", "--cfg job"):
        assert flag in page.stdout


def test_help_lists_an_option_added_to_conf(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "defense" / "foo.yaml").write_text(
        "# Foo (a test): purifies nothing. Second sentence.\n_target_: defenses.none.NoDefense\n"
    )
    page = help_text(conf)
    assert "    foo " in page and "Foo (a test): purifies nothing." in page
    assert "Second sentence" not in page


def test_purebench_commands(tmp_path: Path, cache_dir: Path) -> None:
    proc = cli(["--help"], tmp_path, module="bench.cli")
    assert proc.returncode == 0 and all(
        c in proc.stdout for c in ("run", "train", "leaderboard", "data")
    )
    assert "purebench run --help" in proc.stdout
    proc = cli(["data", "imagenet21k"], tmp_path, module="bench.cli")
    assert proc.returncode == 2 and "fashion_mnist" in proc.stderr
    proc = cli(["train", "dataset=digitz"], tmp_path, module="bench.cli")
    assert "dataset=digitz is not an option of dataset; did you mean digits?" in one_error_line(
        proc
    )
    proc = cli(
        [
            "train",
            "dataset=digits",
            "classifier.recipe.epochs=10",
            "classifier.recipe.lr=0.1",
            f"paths.cache_dir={cache_dir}",
            f"paths.results_dir={tmp_path}",
        ],
        tmp_path,
        module="bench.cli",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((cache_dir / "classifiers").glob("digits-SmallCNN-*/weights.pt"))) >= 1
