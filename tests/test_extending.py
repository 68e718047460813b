"""Extending PureBench touches only the files the README names.

A new defense is one Python file and one YAML file; a new attack that needs a non-exact view is
one YAML file (its own ``view``) that any suite lists without repeating the view. Both live here
outside the repository (a module on PYTHONPATH and a config dir on Hydra's search path) and run
through the real command line, so nothing else in the repository can be involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import fast_overrides

ROOT = Path(__file__).resolve().parents[1]

DEFENSE_PY = '''
import torch
from defenses.base import Defense, DefenseInfo


class MyBlur(Defense):
    """A 3x3 box blur: the smallest purifier that is not the identity."""

    info = DefenseInfo(stochastic=False, differentiable=True, paper="", purifier_calls=1)

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = weight

    def purify(self, x, *, generator=None):
        blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
        return (1 - self.weight) * x + self.weight * blurred
'''


def _run(tmp_path: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'code'}{os.pathsep}{ROOT}"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *fast_overrides(cache_dir, tmp_path / "results"),
            "diagnostics.enabled=false",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            f"hydra.run.dir={tmp_path / 'run'}",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_defense_is_one_python_file_and_one_yaml(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "my_blur.py").write_text(DEFENSE_PY)
    (tmp_path / "conf" / "defense").mkdir(parents=True)
    (tmp_path / "conf" / "defense" / "my_blur.yaml").write_text(
        "_target_: my_blur.MyBlur\nweight: 0.25\n"
    )
    done = _run(tmp_path, cache_dir, "defense=my_blur", "suite=pgd")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "completed" and record["defense"] == "my_blur"
    assert record["config"]["defense"] == {"_target_": "my_blur.MyBlur", "weight": 0.25}


def test_an_attack_with_its_own_view_is_one_yaml(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "conf" / "attack").mkdir(parents=True)
    (tmp_path / "conf" / "attack" / "my_bpda.yaml").write_text(
        "defaults:\n  - pgd\n  - _self_\n\nsteps: 5\nview:\n  grad: bpda\n"
    )
    done = _run(tmp_path, cache_dir, "suite=pgd", "+attack@suite.attacks.mine=my_bpda")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["attacks"]["mine"]["view"]["grad"] == "bpda"
    assert record["attacks"]["pgd"]["view"]["grad"] == "exact"
    assert record["config"]["suite"].get("views") is None, "the suite names no view"
