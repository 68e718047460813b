"""Runs that survive a cluster: shards, resume after SIGKILL, sweeps with launchers and failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from bench.reporting.records import read_record
from bench.run import evaluate
from common.errors import ConfigError
from tests.conftest import fast_overrides

ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_shards_partition_the_subset_and_share_a_fingerprint(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    base = [*fast_overrides(cache_dir, tmp_path), "suite=clean", "n_samples=30"]
    full = evaluate(compose_cfg(base), output_dir=tmp_path / "full", choices={"defense": "none"})
    shards = [
        evaluate(
            compose_cfg([*base, f"shard={i}/3"]),
            output_dir=tmp_path / f"s{i}",
            choices={"defense": "none"},
        )
        for i in range(3)
    ]
    assert [s.shard for s in shards] == [{"index": i, "count": 3} for i in range(3)]
    assert sum((s.indices for s in shards), []) == full.indices
    assert {s.fingerprint for s in shards} == {full.fingerprint}
    correct = sum(round(s.clean_acc.value * s.clean_acc.n) for s in shards)
    assert correct == round(full.clean_acc.value * full.clean_acc.n)


@pytest.mark.parametrize("shard", ["3/3", "a/2", "1", "-1/2", "0/0", "0/100"])
def test_bad_shards_fail_before_work(compose_cfg, cache_dir: Path, tmp_path: Path, shard) -> None:
    cfg = compose_cfg([*fast_overrides(cache_dir, tmp_path), "n_samples=30", f"shard={shard}"])
    with pytest.raises(ConfigError, match="shard="):
        evaluate(cfg, output_dir=tmp_path / "run", choices={"defense": "none"})
    assert not (tmp_path / "run" / "record.json").exists()


def _comparable(run_dir: Path) -> dict:
    record = read_record(run_dir / "record.json")
    assert record.status == "completed"
    return {
        "clean": record.clean_acc,
        "robust": record.robust_acc,
        "rules": record.rules,
        "attacks": {k: (a.robust_acc, a.n_attacked, a.passes) for k, a in record.attacks.items()},
        "per_sample": pd.read_csv(run_dir / "per_sample.csv").to_dict("list"),
    }


def test_a_run_killed_with_sigkill_resumes_to_the_same_record(cache_dir: Path, tmp_path) -> None:
    overrides = [
        *fast_overrides(cache_dir, tmp_path / "results"),
        "suite=pgd",
        "suite.attacks.pgd.steps=40",
        "batch_size=4",
        "n_samples=32",
        "diagnostics.enabled=false",
    ]
    reference = _cli([*overrides, f"hydra.run.dir={tmp_path / 'reference'}"])
    assert reference.returncode == 0, reference.stderr[-2000:]
    resume_dir = tmp_path / "results" / "resume"
    assert not list(resume_dir.glob("*.pt")), "a completed run deletes its checkpoint"

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *overrides, f"hydra.run.dir={killed}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it after its clean judgement and at least one attack batch were checkpointed.
    saves, last, deadline = 0, None, time.monotonic() + 300
    while saves < 3 and proc.poll() is None and time.monotonic() < deadline:
        files = list(resume_dir.glob("*.pt"))
        stamp = files[0].stat().st_mtime_ns if files else None
        if stamp is not None and stamp != last:
            saves, last = saves + 1, stamp
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed: give it more work"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "record.json").exists(), "a killed run leaves no record"
    assert list(resume_dir.glob("*.pt")), "the checkpoint survives the kill"

    resumed = _cli([*overrides, f"hydra.run.dir={tmp_path / 'resumed'}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert _comparable(tmp_path / "resumed") == _comparable(tmp_path / "reference")
    assert not list(resume_dir.glob("*.pt"))


def _nan_defense_config(tmp_path: Path) -> Path:
    conf = tmp_path / "extra_conf"
    (conf / "defense").mkdir(parents=True)
    (conf / "defense" / "nan_out.yaml").write_text("_target_: tests.planted.NaNDefense\n")
    return conf


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_a_sweep_survives_a_failing_job_and_rebuilds_the_leaderboard(
    cache_dir: Path, tmp_path: Path, launcher: str
) -> None:
    results = tmp_path / "results"
    extra = _nan_defense_config(tmp_path)
    args = [
        "-m",
        *fast_overrides(cache_dir, results),
        "suite=clean",
        "n_samples=16",
        "defense=none,nan_out",
        f"hydra.searchpath=[file://{extra}]",
        f"hydra.sweep.dir={results / 'multiruns' / 'sweep'}",
    ]
    if launcher != "basic":
        args.append(f"hydra/launcher={launcher}")
    if launcher == "joblib":
        args.append("hydra.launcher.n_jobs=2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = _cli(args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {read_record(p).defense: read_record(p) for p in results.rglob("record.json")}
    assert records["none"].status == "completed"
    assert records["nan_out"].status == "failed" and "NaN" in records["nan_out"].error
    table = pd.read_csv(results / "leaderboard.csv")
    status = dict(zip(table["defense"], table["status"], strict=True))
    assert status["none"] == "completed"
    assert status["nan_out"].startswith("failed") and "NaN" in status["nan_out"]


def test_slurm_launcher_exposes_the_cluster_knobs(compose_cfg) -> None:
    cfg = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu"
    for knob in ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
        assert knob in launcher
    # Plain values, nothing left to resolve at submit time.
    json.dumps(OmegaConf.to_container(launcher, resolve=True))
