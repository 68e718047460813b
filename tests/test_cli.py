"""The real command line: `python -m bench` (single run and --multirun) and `purebench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("threat.eps=-1", "threat.eps=-1"),
        ("dataset=imagenet21k", "imagenet21k"),
        ("n_samples=5000", "n_samples=5000"),
    ],
)
def test_bad_config_exits_nonzero_with_a_message_and_no_record(
    tmp_path: Path, override: str, message: str
) -> None:
    proc = cli([*fast(tmp_path, tmp_path / "cache"), override], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not list(tmp_path.rglob("record.json"))
    assert not (tmp_path / "cache").exists()


def test_purebench_commands(tmp_path: Path, cache_dir: Path) -> None:
    proc = cli(["--help"], tmp_path, module="bench.cli")
    assert proc.returncode == 0 and all(
        c in proc.stdout for c in ("run", "train", "leaderboard", "data")
    )
    proc = cli(["data", "imagenet21k"], tmp_path, module="bench.cli")
    assert proc.returncode == 2 and "fashion_mnist" in proc.stderr
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
