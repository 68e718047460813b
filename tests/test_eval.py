from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import open_dict

from bench.data import eval_subset
from bench.engine.threat import check_threat
from bench.reporting.leaderboard import write_leaderboard
from bench.run import evaluate
from common.errors import ConfigError, DataNotFoundError, ThreatModelViolation
from tests.conftest import fast_overrides


def run(compose_cfg, cache_dir: Path, out: Path, *extra: str):
    cfg = compose_cfg([*fast_overrides(cache_dir, out.parent), *extra])
    return evaluate(cfg, output_dir=out, choices=cfg.hydra.runtime.choices)


def test_end_to_end_on_digits(compose_cfg, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    record = run(compose_cfg, cache_dir, out)
    assert record.status == "completed" and record.error is None
    saved = json.loads((out / "record.json").read_text())
    assert saved["status"] == "completed"
    assert saved["choices"]["dataset"] == "digits" and saved["choices"]["suite"] == "smoke"
    assert saved["config"]["threat"] == {"norm": "Linf", "eps": 0.1}
    assert saved["indices"] == eval_subset(record_n_test(), 64, 0).tolist()
    assert saved["versions"]["torchattacks"] == "3.5.1"
    assert saved["versions"]["pyautoattack"] == "0.2.0"
    assert set(saved["git"]) == {"sha", "dirty", "source"}
    assert saved["classifier_info"]["kind"] == "trained"
    assert saved["classifier_info"]["training"]["test_clean_acc"] > 0.8

    assert record.clean_acc.value > 0.8
    # The suite's attacks, then the escalation's levels of its lead PGD.
    assert set(record.attacks) - {"escalate@1", "escalate@2"} == {"pgd", "apgd_ce"}
    assert "escalate@1" in record.attacks and record.escalation["lead"] == "pgd"
    for result in record.attacks.values():
        assert result.robust_acc.value <= record.clean_acc.value
        assert result.max_perturbation <= 0.1 + 1e-6
        assert result.kind == "white-box" and result.view["grad"] == "exact"
        assert result.passes["forward"] > 0 and result.passes["backward"] > 0
    # A cascade: PGD attacks every clean-correct image, APGD only the ones PGD left standing.
    pgd, apgd = record.attacks["pgd"], record.attacks["apgd_ce"]
    assert pgd.n_attacked == round(record.clean_acc.value * 64)
    assert apgd.n_attacked == round(pgd.robust_acc.value * 64)
    assert apgd.robust_acc.value <= pgd.robust_acc.value
    # A deterministic defense: one draw, every decision rule agrees.
    assert record.decision["draws"] == 1 and record.headline_rule == "single"
    assert {r["robust"].value for r in record.rules.values()} == {record.robust_acc.value}
    # The suite's robust accuracy is the per-sample worst case over its attacks.
    samples = pd.read_csv(out / "per_sample.csv")
    assert len(samples) == 64
    worst = samples["clean_correct"] & samples["pgd_correct"] & samples["apgd_ce_correct"]
    assert (samples["robust"] == worst).all()
    assert record.robust_acc.value == worst.mean()
    assert record.robust_acc.value <= min(a.robust_acc.value for a in record.attacks.values())
    assert record.robust_acc.low <= record.robust_acc.value <= record.robust_acc.high
    # The undefended digits classifier falls under eps=0.1.
    assert record.robust_acc.value < record.clean_acc.value - 0.2
    # A few images per stage beside the record, which the detail page embeds.
    from PIL import Image

    png = Image.open(out / "examples.png")
    rows = png.text["rows"].split(", ")
    assert rows[:3] == ["clean", "adversarial/pgd", "purified/pgd"] and png.size[1] > 8 * len(rows)
    board = write_leaderboard(tmp_path, tmp_path / "board")
    (page,) = (tmp_path / "board" / "details").glob("*.html")
    assert "data:image/png;base64," in page.read_text() and board.html.is_file()


def test_training_a_missing_network_is_setup_not_evaluation_cost(
    compose_cfg, tmp_path: Path
) -> None:
    # A fresh cache: this run trains its classifier before evaluating.
    out = tmp_path / "run"
    record = run(compose_cfg, tmp_path / "cold-cache", out, "n_samples=16")
    cost = json.loads((out / "record.json").read_text())["cost"]
    assert record.classifier_info["kind"] == "trained"
    train_s = record.classifier_info["training"]["train_s"]
    assert cost["setup_s"] >= train_s > 0
    assert cost["eval_s"] == pytest.approx(record.wall_s - cost["setup_s"])
    assert 0 < cost["eval_s"] < record.wall_s


def record_n_test() -> int:
    from bench.data import digits

    return digits().n_test


def test_same_images_and_numbers_when_repeated(compose_cfg, cache_dir: Path, tmp_path) -> None:
    a = run(compose_cfg, cache_dir, tmp_path / "a")
    b = run(compose_cfg, cache_dir, tmp_path / "b")
    assert a.indices == b.indices
    assert a.clean_acc == b.clean_acc and a.robust_acc == b.robust_acc
    assert a.classifier_info["cache_key"] == b.classifier_info["cache_key"]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["threat.eps=-0.1"], ConfigError, "threat.eps=-0.1"),
        (["threat.eps=0"], ConfigError, "threat.eps=0"),
        (["threat.norm=L7"], ConfigError, "threat.norm='L7'"),
        (["n_samples=100000"], ConfigError, "n_samples=100000"),
        (["n_samples=0"], ConfigError, "n_samples=0"),
        (["batch_size=-3"], ConfigError, "batch_size=-3"),
        (
            ["device=cuda:0"] if not torch.cuda.is_available() else ["device=tpu"],
            ConfigError,
            "device=",
        ),
        (
            ["dataset=mnist", "paths.data_dir=/nonexistent/purebench"],
            DataNotFoundError,
            "/nonexistent/purebench",
        ),
        (["suite.attacks.pgd.norm=L2"], ConfigError, "norm='L2' but the threat is Linf"),
        (["suite.attacks.pgd.steps=0"], ConfigError, "steps=0"),
        (["suite.attacks.apgd_ce.version=turbo"], ConfigError, "version='turbo'"),
    ],
)
def test_bad_input_fails_clearly_before_work_and_leaves_no_record(
    compose_cfg, tmp_path: Path, overrides, error, message
) -> None:
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        run(compose_cfg, cache, out, *overrides)
    assert not (out / "record.json").exists()
    assert not cache.exists(), "nothing may be trained before the config is validated"


def test_unknown_dataset_names_the_options(compose_cfg) -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_cfg(["dataset=imagenet21k"])
    assert "imagenet21k" in str(info.value) and "fashion_mnist" in str(info.value)


@pytest.mark.parametrize(
    ("target", "match"),
    [("tests.planted.Overstep", "exceeded the threat model"), ("tests.planted.NaNs", "NaN")],
)
def test_broken_attack_fails_the_run_with_a_complete_record(
    compose_cfg, cache_dir: Path, tmp_path: Path, target: str, match: str
) -> None:
    out = tmp_path / "run"
    extra = "eps: ${threat.eps}" if "Overstep" in target else ""
    node = "{_target_: " + target + ", _partial_: true" + (", " + extra if extra else "") + "}"
    with pytest.raises(ThreatModelViolation, match=match):
        run(compose_cfg, cache_dir, out, "suite=pgd", f"+suite.attacks.broken={node}")
    saved = json.loads((out / "record.json").read_text())
    assert saved["status"] == "failed"
    assert match in saved["error"] and "ThreatModelViolation" in saved["error"]
    assert saved["robust_acc"] is None


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_check_threat(norm: str) -> None:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    delta = torch.zeros_like(x)
    delta[0, 0, 0, 0] = 0.1
    assert check_threat(x, x + delta, norm, 0.1, "a") == pytest.approx(0.1)
    with pytest.raises(ThreatModelViolation, match="exceeded"):
        check_threat(x, x + 1.5 * delta, norm, 0.1, "a")
    with pytest.raises(ThreatModelViolation, match=r"left \[0, 1\]"):
        check_threat(x, x + 0.9, norm, 10.0, "a")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_restarts_for_each_job_of_a_worker_process() -> None:
    # A sweep's worker runs many jobs: each must report its own peak, not the largest so far.
    from bench.devices import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    del big
    high = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < high - 200


def test_a_swapped_in_defense_is_named_by_its_class_or_by_name(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    """defense._target_=... under the default option must not be recorded as the baseline."""
    from bench.engine.plan import defense_name

    cfg = compose_cfg([*fast_overrides(cache_dir, tmp_path), "defense._target_=tests.planted.Blur"])
    assert defense_name(cfg, "none") == "Blur"
    assert defense_name(compose_cfg(["defense=diffpure"]), "diffpure") == "diffpure"
    # Options that extend another (defaults: [atop]) keep their own name, not the class's.
    for option in ("atop_pretrained", "atop_rt3", "ramrm_pure", "carso_mean", "carso_vote"):
        assert defense_name(compose_cfg([f"defense={option}"]), option) == option
    with open_dict(cfg):
        cfg.name = "my blur"
    assert defense_name(cfg, "none") == "my blur"
