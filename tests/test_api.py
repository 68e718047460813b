"""The Python API (bench/api.py, bench/adapters.py): in-memory defenses, classifiers and data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bench
from bench import adapters
from bench.data import digits
from common.errors import ConfigError
from defenses.base import DefenseInfo

ROOT = Path(__file__).resolve().parents[1]
FAST = {"profile": "quick", "n_samples": 32, "threads": 1}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A small MLP on digits, trained in memory (about 97% clean)."""
    torch.manual_seed(0)
    x, y = digits().train()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


class Noise(nn.Module):
    """Gaussian noise from torch's global generator: stochastic, differentiable."""

    def purify(self, x: Tensor) -> Tensor:
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def detached(x: Tensor) -> Tensor:
    """A function purifier that cuts the graph."""
    return x.detach().clamp(0.1, 0.9)


def test_readme_notebook_example_runs_and_ranks_both_rows(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- notebook-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its notebook example"
    (tmp_path / "example.py").write_text(block.group(1), encoding="utf-8")
    env = {**os.environ, "WANDB_MODE": "disabled", "PUREBENCH_CACHE_DIR": str(tmp_path / "c")}
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    board = (tmp_path / "notebook_results" / "leaderboard.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip() for line in board.splitlines() if line.startswith("| ")]
    assert {"none", "Blur"} <= set(rows), board


def test_wrapped_purifier_facts_are_measured(model: nn.Module) -> None:
    probe = digits().test()[0][:8]
    noisy = adapters.as_defense(Noise(), probe)
    assert type(noisy).info.stochastic and type(noisy).info.differentiable
    # Global-RNG randomness is the harness's generator's: same seed, same draw.
    draws = [noisy.purify(probe, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*draws)
    cut = adapters.as_defense(detached, probe)
    assert not type(cut).info.stochastic and not type(cut).info.differentiable
    assert type(cut).__name__ == "detached"
    declared = adapters.as_defense(Noise(), probe, info=DefenseInfo(True, False))
    assert not type(declared).info.differentiable


def test_evaluate_in_memory_defense_on_tensors(model: nn.Module, tmp_path: Path) -> None:
    x, y = digits().test()
    record = bench.evaluate(
        Noise(), model, data=(x[:64], y[:64]), eps=0.1, results_dir=tmp_path, **FAST
    )
    assert record.status == "completed" and record.defense == "Noise"
    assert record.dataset == "tensors" and record.defense_info["stochastic"]
    saved = json.loads(
        next(tmp_path.glob("runs/tensors/Noise__Sequential/*/record.json")).read_text()
    )
    assert saved["classifier_info"]["kind"] == "in-memory"
    assert 0 < record.robust_acc.value <= record.clean_acc.value


def test_other_weights_are_another_configuration(model: nn.Module, tmp_path: Path) -> None:
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    a = bench.evaluate("none", model, dataset="digits", results_dir=tmp_path, **FAST)
    b = bench.evaluate("none", other, dataset="digits", results_dir=tmp_path, **FAST)
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"classifier": nn.Linear(64, 10)}, "fails on an image of shape"),
        ({"classifier": nn.Sequential(nn.Flatten(), nn.Linear(64, 3))}, "(1, 10) logits"),
        ({"defense": 3}, "neither a defenses.Defense"),
        ({"defense": lambda x: x[:, :, :4]}, "input's shape"),
    ],
)
def test_bad_objects_are_refused_with_one_line(
    model: nn.Module, tmp_path: Path, kwargs: dict, says: str
) -> None:
    args = {"defense": "none", "classifier": model, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(says)) as err:
        bench.evaluate(dataset="digits", results_dir=tmp_path, **args, **FAST)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("runs/**/record.json")), "a refused run wrote a record"


def test_tensors_cannot_train_a_config_classifier(tmp_path: Path) -> None:
    x, y = digits().test()
    with pytest.raises(ConfigError, match="no training split"):
        bench.evaluate(
            "none",
            "small_cnn",
            data=(x[:32], y[:32]),
            eps=0.1,
            results_dir=tmp_path,
            **{**FAST, "paths.cache_dir": str(tmp_path / "cache")},
        )


def test_attack_view_and_run_attack(model: nn.Module) -> None:
    x, y = digits().test()
    x, y = x[:64], y[:64]
    view = bench.attack_view(Noise(), model, x[:8], eot_samples=4)
    adv = bench.run_attack(view, x, y, "pgd", eps=0.1, steps=10)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert (model(adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()
