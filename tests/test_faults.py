"""Fault injection: the faults a run must survive, each planted and checked.

A hostile or unlucky input (an attack that writes into its input, a checkpoint replaced under a
resumed run, a torn resume file, a corrupt cache entry, a full disk, a SIGTERM, a bad scalar,
an unknown key, a defense or classifier that breaks its contract) must end in a clear error
naming the culprit, or be survived, and must lose nothing: no half-written record, no file that
blocks the next run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from bench.reporting.callbacks import LeaderboardCallback, failed_jobs
from bench.reporting.records import write_record
from bench.run import evaluate
from common.errors import (
    CheckpointError,
    ConfigError,
    ContractViolation,
    ThreatModelViolation,
)
from defenses.base import Defense, DefenseInfo
from tests.conftest import fast_overrides
from tests.test_leaderboard import make_record

ROOT = Path(__file__).resolve().parents[1]
NONE = {"defense": "none"}


# -- planted components -----------------------------------------------------------------------


class InPlace:
    """Moves its input by ``2 eps`` in place and returns it: far beyond the threat model."""

    def __init__(self, model: nn.Module, *, eps: float) -> None:
        self.eps = eps

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return x.add_(2 * self.eps).clamp_(0, 1)


class DiesWhileMarked:
    """The identity attack; while ``marker`` exists it raises on its second batch.

    A run with the marker dies midway (after checkpointing one batch); the same configuration
    without it completes, so a test can rerun exactly the configuration that died.
    """

    returns_best = True

    def __init__(self, model: nn.Module, *, marker: str) -> None:
        self.marker, self.calls = Path(marker), 0

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > 1 and self.marker.exists():
            raise RuntimeError("planted failure on the second batch")
        return x.clone()


class WrongShape(Defense):
    """Drops the last pixel column: the classifier would fail with a raw matrix error."""

    info = DefenseInfo(stochastic=False, differentiable=True)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return x[..., :-1]


class OutOfRange(Defense):
    """Stretches the images to [-0.5, 1.5]: the classifier sees inputs it never could."""

    info = DefenseInfo(stochastic=False, differentiable=True)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return 2 * x - 0.5


def _attack(target: str, **args: Any) -> str:
    extra = "".join(f", {k}: {v}" for k, v in args.items())
    return "{_target_: " + target + ", _partial_: true" + extra + "}"


def _run(compose_cfg, cache_dir: Path, out: Path, *extra: str, defense: dict | None = None):
    cfg = compose_cfg([*fast_overrides(cache_dir, out.parent), *extra])
    if defense is not None:
        with open_dict(cfg):
            cfg.defense = OmegaConf.create(defense)
    return evaluate(cfg, output_dir=out, choices={**dict(cfg.hydra.runtime.choices), **NONE})


def _checkpoint_overrides(path: Path, out: Path) -> list[str]:
    """A digits run on a SmallCNN loaded from ``path`` (no training)."""
    return [
        "dataset=digits",
        "suite=smoke",
        "n_samples=32",
        "batch_size=32",
        "device=cpu",
        "diagnostics.enabled=false",
        "classifier=checkpoint",
        f"classifier.path={path}",
        "classifier.arch._target_=bench.models.architectures.SmallCNN",
        f"paths.cache_dir={out.parent / 'cache'}",
        f"paths.results_dir={out.parent}",
    ]


def _small_cnn(path: Path, seed: int, *, nan: bool = False) -> Path:
    from bench.models.architectures import SmallCNN

    torch.manual_seed(seed)
    state = SmallCNN(1, 10, 8).state_dict()
    if nan:
        state["classifier.3.weight"][0, 0] = float("nan")
    torch.save(state, path)
    return path


# -- the threat check ------------------------------------------------------------------------------


def test_an_attack_writing_into_its_input_fails_the_threat_check(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    attack = _attack("tests.test_faults.InPlace", eps="${threat.eps}")
    with pytest.raises(ThreatModelViolation, match="exceeded the threat model"):
        _run(compose_cfg, cache_dir, out, "suite=pgd", f"+suite.attacks.inplace={attack}")
    saved = json.loads((out / "record.json").read_text())
    assert saved["status"] == "failed" and "exceeded the threat model" in saved["error"]


# -- resume --------------------------------------------------------------------------------------


def _dying(compose_cfg, marker: Path, *extra: str):
    """A config whose run checkpoints its clean judgement and one batch, then dies (while the
    marker exists)."""
    attack = _attack("tests.test_faults.DiesWhileMarked", marker=str(marker))
    return compose_cfg([*extra, "suite=clean", f"+suite.attacks.dies={attack}", "batch_size=2"])


def _die(cfg, out: Path, marker: Path) -> None:
    marker.touch()
    with pytest.raises(RuntimeError, match="planted failure"):
        evaluate(cfg, output_dir=out, choices=NONE)
    marker.unlink()


def test_a_replaced_checkpoint_is_never_mixed_into_a_resumed_run(
    compose_cfg, tmp_path: Path, caplog
) -> None:
    path, marker = _small_cnn(tmp_path / "model.pt", seed=0), tmp_path / "marker"
    cfg = _dying(compose_cfg, marker, *_checkpoint_overrides(path, tmp_path / "run"))
    _die(cfg, tmp_path / "a", marker)
    with caplog.at_level(logging.INFO):
        evaluate(cfg, output_dir=tmp_path / "b", choices=NONE)
    assert "resuming from" in caplog.text, "the same config with the same model resumes"
    caplog.clear()
    _die(cfg, tmp_path / "c", marker)
    _small_cnn(path, seed=1)  # another model at the same path
    with caplog.at_level(logging.INFO):
        resumed = evaluate(cfg, output_dir=tmp_path / "d", choices=NONE)
    assert "resuming from" not in caplog.text
    fresh_results = tmp_path / "fresh"
    fresh_cfg = _dying(compose_cfg, marker, *_checkpoint_overrides(path, fresh_results / "run"))
    fresh = evaluate(fresh_cfg, output_dir=fresh_results / "run", choices=NONE)
    assert resumed.clean_acc == fresh.clean_acc and resumed.robust_acc == fresh.robust_acc


@pytest.mark.parametrize("content", ["garbage", "wrong_structure"])
def test_an_unusable_resume_file_is_set_aside_and_the_run_starts_fresh(
    compose_cfg, cache_dir: Path, tmp_path: Path, caplog, content: str
) -> None:
    marker = tmp_path / "marker"
    cfg = _dying(compose_cfg, marker, *fast_overrides(cache_dir, tmp_path))
    _die(cfg, tmp_path / "dies", marker)
    (resume,) = (tmp_path / "resume").glob("*.pt")
    if content == "garbage":
        resume.write_bytes(b"\x00not a torch file")
    else:
        torch.save({"format": 2, "batches": [1, 2, 3]}, resume)
    with caplog.at_level(logging.WARNING):
        record = evaluate(cfg, output_dir=tmp_path / "b", choices=NONE)
    assert record.status == "completed"
    assert str(resume) in caplog.text and "starting fresh" in caplog.text
    assert list(tmp_path.glob("resume/*.stale-*")), "the unusable file is kept aside"


# -- the cache -----------------------------------------------------------------------------------


def test_a_corrupt_cache_entry_is_set_aside_and_rebuilt(
    compose_cfg, tmp_path: Path, caplog
) -> None:
    cache = tmp_path / "cache"
    cfg = [*fast_overrides(cache, tmp_path), "suite=clean"]
    first = evaluate(compose_cfg(cfg), output_dir=tmp_path / "a", choices=NONE)
    (weights,) = (cache / "classifiers").glob("*/weights.pt")
    weights.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        again = evaluate(compose_cfg(cfg), output_dir=tmp_path / "b", choices=NONE)
    assert again.clean_acc == first.clean_acc, "rebuilt from the same spec: the same model"
    assert "unreadable" in caplog.text and str(weights.parent) in caplog.text
    assert list((cache / "classifiers" / ".corrupt").iterdir()), "the corrupt entry is kept aside"


def test_a_full_disk_leaves_no_temporary_file_and_the_retry_succeeds(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    cfg = compose_cfg([*fast_overrides(cache, tmp_path), "suite=clean"])
    real_save = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "weights" in str(f):
            raise OSError(28, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        evaluate(cfg, output_dir=tmp_path / "a", choices=NONE)
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    monkeypatch.setattr(torch, "save", real_save)
    assert evaluate(cfg, output_dir=tmp_path / "b", choices=NONE).status == "completed"


# -- the fingerprint -----------------------------------------------------------------------------


def test_machine_paths_do_not_reach_the_fingerprint(compose_cfg, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = evaluate(
        compose_cfg([*fast_overrides(cache, tmp_path / "x"), "suite=clean"]),
        output_dir=tmp_path / "a",
        choices=NONE,
    )
    os.symlink(cache, tmp_path / "elsewhere")
    b = evaluate(
        compose_cfg([*fast_overrides(tmp_path / "elsewhere", tmp_path / "y"), "suite=clean"]),
        output_dir=tmp_path / "b",
        choices=NONE,
    )
    assert a.config["classifier"]["cache_dir"] != b.config["classifier"]["cache_dir"]
    assert a.fingerprint == b.fingerprint


# -- signals -------------------------------------------------------------------------------------


def _signalled_run(tmp_path: Path, cache_dir: Path, sig: signal.Signals) -> Path:
    """Start a CLI run, send ``sig`` once it has checkpointed two attack batches; its run dir."""
    results = tmp_path / "results"
    run_dir = tmp_path / sig.name
    overrides = [
        *fast_overrides(cache_dir, results),
        "suite=pgd",
        "suite.attacks.pgd.steps=200",
        "batch_size=2",
        "n_samples=64",
        "diagnostics.enabled=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # As from a terminal: a test run started in the background inherits an ignored SIGINT,
        # and Python then never turns Ctrl-C into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # The checkpoint is rewritten after the clean judgement and after every batch.
    saves, last, deadline = 0, None, time.monotonic() + 300
    while saves < 3 and proc.poll() is None and time.monotonic() < deadline:
        files = list((results / "resume").glob("*.pt"))
        stamp = files[0].stat().st_mtime_ns if files else None
        if stamp is not None and stamp != last:
            saves, last = saves + 1, stamp
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before the signal: give it more work"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_write_a_failed_record_naming_the_signal(
    tmp_path: Path, cache_dir: Path, sig: signal.Signals
) -> None:
    run_dir = _signalled_run(tmp_path, cache_dir, sig)
    saved = json.loads((run_dir / "record.json").read_text())
    assert saved["status"] == "failed"
    assert saved["error"] and sig.name in saved["error"]
    assert list((tmp_path / "results" / "resume").glob("*.pt")), "the checkpoint is kept"


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=1.5", "seed=1.5"),
        ("seed=abc", "seed='abc'"),
        ("subset_seed=-1", "subset_seed=-1"),
        ("eot_default=0", "eot_default=0"),
        ("+foo=1", "'foo'"),
        ("+decision.rule=vote", "'rule'"),
        ("threat=l2", None),  # valid: checked below with an absurd eps
    ],
)
def test_every_scalar_and_key_is_checked_before_any_work(
    compose_cfg, tmp_path: Path, override: str, message: str | None
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    extra = [override] if message else [override, "threat.eps=1e9"]
    with pytest.raises(ConfigError, match=message or r"threat\.eps=1e\+09 exceeds 8"):
        _run(compose_cfg, cache, out, *extra)
    assert not (out / "record.json").exists()
    assert not cache.exists(), "nothing is trained before the config is validated"
    assert not list(tmp_path.glob("resume/*")), "no resume file is left"


def test_an_unknown_key_is_refused_with_the_allowed_ones(compose_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed: .*n_samples.*seed"):
        _run(compose_cfg, tmp_path / "cache", tmp_path / "run", "+n_sample=64")


# -- components that break their contract ---------------------------------------------------------


@pytest.mark.parametrize(
    ("defense", "rule"),
    [("WrongShape", "of shape"), ("OutOfRange", r"outside \[0, 1\]|in \[-0\.5")],
)
def test_a_defense_breaking_its_contract_is_named_with_the_rule(
    compose_cfg, cache_dir: Path, tmp_path: Path, defense: str, rule: str
) -> None:
    target = {"_target_": f"tests.test_faults.{defense}"}
    # Named by its class: it was swapped in under the default option, not the `none` baseline.
    with pytest.raises(ContractViolation, match=rf"defense '{defense}'.*({rule})"):
        _run(compose_cfg, cache_dir, tmp_path / "run", "suite=pgd", defense=target)


def test_nan_classifier_weights_name_the_classifier_before_any_work(
    compose_cfg, tmp_path: Path
) -> None:
    path = _small_cnn(tmp_path / "nan.pt", seed=0, nan=True)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"classifier.*nan\.pt.*NaN or inf"):
        evaluate(compose_cfg(_checkpoint_overrides(path, out)), output_dir=out, choices=NONE)
    assert not (out / "record.json").exists()


def test_a_checkpoint_that_does_not_fit_writes_no_record(compose_cfg, tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="does not fit"):
        evaluate(compose_cfg(_checkpoint_overrides(path, out)), output_dir=out, choices=NONE)
    assert not (out / "record.json").exists()


# -- outputs -------------------------------------------------------------------------------------


def test_a_record_has_the_mode_of_the_files_beside_it(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _run(compose_cfg, cache_dir, out, "suite=clean")
    mode = stat.S_IMODE((out / "record.json").stat().st_mode)
    assert mode == stat.S_IMODE((out / "per_sample.csv").stat().st_mode)


# -- a sweep's summary -----------------------------------------------------------------------

LOG_PREFIX = "[2026-01-01 00:00:00,000][bench.run]"


def _job(sweep: Path, name: str, log: tuple[str, ...] = ()) -> Path:
    """A job directory as Hydra leaves it: ``.hydra/`` and the job's log."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (job / "eval.log").write_text("".join(f"{LOG_PREFIX}{line}\n" for line in log))
    return job


def _sweep_config(sweep: Path) -> DictConfig:
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "job": {"name": "eval"}}})


def test_a_sweep_outside_the_results_dir_builds_from_its_own_records(tmp_path: Path) -> None:
    """hydra.sweep.dir=... elsewhere: the callback reads the sweep's records with the results'."""
    results, sweep = tmp_path / "results", tmp_path / "elsewhere" / "sweep"
    write_record(make_record(classifier="old"), results / "runs" / "old")
    write_record(make_record(classifier="new"), _job(sweep, "classifier=new", ()))
    out = tmp_path / "board"
    LeaderboardCallback(records=str(results), out=str(out)).on_multirun_end(_sweep_config(sweep))
    assert "No records" not in (out / "leaderboard.md").read_text()
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(board["classifier"]) == ["new", "old"]


def test_a_relative_sweep_dir_reports_no_failed_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """make bench's sweep dir is relative: its completed jobs are not reported as failed."""
    monkeypatch.chdir(tmp_path)
    sweep = Path("results") / "bench" / "standard"
    write_record(make_record(classifier="a"), _job(sweep, "classifier=a"))
    caplog.set_level(logging.INFO, logger="bench.reporting.callbacks")
    LeaderboardCallback(records="results", out="results").on_multirun_end(_sweep_config(sweep))
    assert not [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "this sweep: 1 records, 0 failed jobs" in caplog.text


def test_sweep_summary_counts_jobs_that_wrote_no_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    done = _job(sweep, "classifier=a", ("[INFO] - robust accuracy 10.00%",))
    write_record(make_record(classifier="a"), done)
    bad = _job(
        sweep,
        "classifier=b",
        (
            "[INFO] - job 1 failed: an info line quoting the runner is no error",
            "[ERROR] - job 1 failed: ConfigError: an earlier error",
            "[ERROR] - job 1 failed: ConfigError: threat.eps=-1 must be positive",
        ),
    )
    crashed = _job(sweep, "classifier=c", ("[ERROR] - run failed: RuntimeError: boom",))
    write_record(make_record(classifier="c", status="failed", robust=None), crashed)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="bench.reporting.callbacks")
    LeaderboardCallback(records=str(sweep), out=str(out)).on_multirun_end(_sweep_config(sweep))

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"sweep job {bad} failed: ConfigError: threat.eps=-1 must be positive",
        f"sweep job {crashed} failed: RuntimeError: boom",
    ]
    (summary,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert summary.endswith("(2 rows; this sweep: 2 records, 2 failed jobs)")
    # The leaderboard is still rebuilt from the records: the crashed job's row says why.
    board = (out / "leaderboard.md").read_text()
    assert "failed: RuntimeError: boom" in board
    assert len(pd.read_csv(out / "leaderboard.csv")) == 2
    assert (out / "leaderboard.csv").is_file() and (out / "leaderboard.html").is_file()


def test_a_job_without_a_record_or_a_logged_error_points_at_its_log(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    silent = _job(sweep, "0", ("[INFO] - started",))
    (silent / "eval.log").unlink()
    unreadable = _job(sweep, "1", ("[ERROR] - job 1 failed: OSError: disk full",))
    (unreadable / "record.json").write_text("{not json")
    nested = _job(sweep, "group/2", ("[ERROR] - job 2 failed: KeyError: 'defense'",))
    assert failed_jobs(sweep, "eval") == [
        (silent, "no record (see its log)"),
        (unreadable, "unreadable record.json; its log says: OSError: disk full"),
        (nested, "KeyError: 'defense'"),
    ]
    # Without the task's name every log of the job directory is read.
    assert failed_jobs(sweep)[2] == (nested, "KeyError: 'defense'")
