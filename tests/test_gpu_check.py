"""``make gpu-check`` (bench/tools/gpu_check/): every step on the CPU at tiny sizes; on CUDA,
the same steps and the view's CUDA options (``gpu``-marked, skipped without CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.models.architectures import ResNet18
from bench.tools.gpu_check import runner
from bench.tools.gpu_check.options import measure_subject
from bench.tools.gpu_check.report import GPU_JSON, GPU_MD, option_row
from bench.tools.gpu_check.settings import SETTINGS
from bench.tools.gpu_check.sizes import TINY
from bench.tools.gpu_check.subjects import Subject, module_call, view_call
from defenses.atop import Inpainter

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SUBJECTS = ("classifier", "purifier", "pipeline")
THIS_FILE = str(Path(__file__).relative_to(ROOT))


def run_tiny(out: Path, device: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    """``runner.main`` at tiny sizes (``torch.compile`` with the eager backend)."""
    args = ["--device", device, "--tiny", "--out", str(out), "--compile-backend", "eager"]
    rc = runner.main([*args, "--threads", "1", *extra])
    result = json.loads((out / GPU_JSON).read_text(encoding="utf-8"))
    return rc, result, (out / GPU_MD).read_text(encoding="utf-8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of machines without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.tools.gpu_check", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == runner.EXIT_NO_CUDA
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: CUDA is not available"), run.stderr
    assert run.stdout == "" and not any(tmp_path.iterdir())


def test_tiny_check_on_cpu_runs_every_step_and_writes_every_row(tmp_path: Path) -> None:
    rc, result, md = run_tiny(tmp_path, "cpu", "--tests", THIS_FILE)
    assert rc == 0, result["failures"]
    assert result["ok"] and result["failures"] == []
    # Step 1: this file's gpu tests, collected by `pytest -m gpu`; they skip without CUDA.
    tests = result["tests"]
    assert tests["rc"] == 0 and tests["failed"] == 0
    ran = "passed" if torch.cuda.is_available() else "skipped"
    assert tests[ran] == 2, tests
    # Step 2: the networks learned the task (chance is 10%).
    assert result["networks"]["clean_acc_batch"] > 0.5
    # Step 3: every subject under every setting, each row real numbers or a reason.
    for subject in SUBJECTS:
        rows = result[f"options/{subject}"]["settings"]
        assert list(rows) == [s.name for s in SETTINGS]
        for name, row in rows.items():
            assert f"| {subject} | {name} |" in md
            if "not_run" in row:
                continue
            for pass_name in result[f"options/{subject}"]["passes"]:
                timing = row[pass_name]
                assert timing["ms_per_call"] > 0 and len(timing["runs_ms"]) == 3
                assert timing["speedup"] > 0
        assert rows["fp32"]["vs_fp32"]["max_abs_diff"] == 0  # CPU: a rerun is bit-identical
        assert 0 < rows["bf16"]["vs_fp32"]["max_abs_diff"] < rows["bf16"]["vs_fp32"]["ref_max_abs"]
    classifier = result["options/classifier"]["settings"]
    assert classifier["compile"]["vs_fp32"]["max_abs_diff"] <= 1e-5  # eager backend: same ops
    assert classifier["bf16"]["vs_fp32"]["grad_cosine_mean"] > 0.8
    pipeline = result["options/pipeline"]["settings"]
    assert "inductor" in pipeline["compile"]["not_run"]  # the view's compile is not eager
    # Step 4: the paper-profile row, at the tiny run's budgets.
    paper = result["paper_row"]
    assert paper["status"] == "completed" and paper["evaluate_s"] > 0
    assert paper["overrides"] == list(TINY.paper_overrides)
    assert set(paper["attacks"]) == {"pgd", "apgd_ce"}  # suite=smoke
    assert any(a["n_attacked"] > 0 for a in paper["attacks"].values())
    assert next(tmp_path.glob("runs/tensors/*/*/record.json")).is_file()
    assert "## 4. One paper-profile row" in md and md.rstrip().endswith("None.")


def test_a_setting_that_fails_is_a_row_not_a_crash() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10))
    net = net.eval().requires_grad_(False)
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    subject = Subject(
        "net",
        "a conv net",
        (x,),
        lambda s: module_call(net, s, "no_such_backend"),
        lambda out: F.cross_entropy(out, y),
        lambda out: out.argmax(1),
    )
    found = measure_subject(subject, TINY, torch.device("cpu"))
    rows = found["settings"]
    for name in ("compile", "bf16+channels_last+compile"):
        assert "no_such_backend" in rows[name]["error"]
        assert "**failed**" in option_row("net", name, rows[name])
    assert rows["channels_last"]["gradient"]["ms_per_call"] > 0
    failed = runner.failures({"options/net": found})
    assert len(failed) == 2 and all("no_such_backend" in f for f in failed)


def test_a_test_run_without_out_does_not_write_over_the_gpu_runs_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PUREBENCH_RESULTS_DIR", str(tmp_path))
    assert runner.parse_args([]).out == str(tmp_path)  # a GPU run: results/gpu.md
    assert runner.parse_args(["--device", "cuda:1"]).out == str(tmp_path)
    test_out = str(tmp_path / runner.TEST_OUT)
    for argv in (["--tiny"], ["--device", "cpu"], ["--device", "cpu", "--tiny"]):
        assert runner.parse_args(argv).out == test_out, argv
    assert runner.parse_args(["--tiny", "--out", "x"]).out == "x"


@pytest.mark.gpu
@needs_cuda
def test_tiny_check_on_cuda(tmp_path: Path) -> None:
    rc, result, _ = run_tiny(tmp_path, "cuda", "--no-tests")
    assert rc == 0, result["failures"]
    assert result["machine"]["name"] == torch.cuda.get_device_name()
    for subject in SUBJECTS:
        bf16 = result[f"options/{subject}"]["settings"]["bf16"]["vs_fp32"]
        assert bf16["max_abs_diff"] > 0  # autocast changed the computation on CUDA
        assert bf16["grad_cosine_mean"] > 0.8
    assert result["paper_row"]["status"] == "completed"


@pytest.mark.gpu
@needs_cuda
def test_view_options_on_cuda_give_fp32_logits_and_gradients() -> None:
    torch.manual_seed(0)
    classifier = ResNet18(3, 10, 32, width=4).cuda().eval().requires_grad_(False)
    inpainter = Inpainter(3, width=4).cuda().eval().requires_grad_(False)
    x = torch.rand(8, 3, 32, 32, device="cuda")
    for setting in SETTINGS[:3]:  # fp32, bf16, channels_last (no compiling)
        xg = x.clone().requires_grad_(True)
        logits = view_call(classifier, inpainter, setting)(xg)
        (grad,) = torch.autograd.grad(logits.sum(), xg)
        assert logits.dtype == grad.dtype == torch.float32, setting
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, setting
