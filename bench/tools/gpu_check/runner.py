"""One ``make gpu-check`` run: the command line, the device check, every step in order."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.devices import set_threads
from bench.provenance import git_state, package_versions
from bench.tools.gpu_check.networks import train_networks
from bench.tools.gpu_check.options import error_text, measure_subject
from bench.tools.gpu_check.paper_row import paper_row
from bench.tools.gpu_check.report import markdown, write_results
from bench.tools.gpu_check.settings import RECOMPILE_LIMIT
from bench.tools.gpu_check.sizes import FULL, TINY, Sizes
from bench.tools.gpu_check.subjects import Subject, subjects
from bench.tools.gpu_check.tests_step import gpu_tests
from common.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_FAILED, EXIT_NO_CUDA = 1, 2
# A test run's gpu.md (--tiny, or not on CUDA) must not replace results/gpu.md, the GPU run's
# numbers that get committed: without --out it goes below runs/, which git ignores.
TEST_OUT = Path("runs") / "gpu-check-test"


def machine(device: torch.device) -> dict[str, Any]:
    """The device, the library versions and the float32 settings the numbers were taken with."""
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if cuda else "CPU",
        "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)) if cuda else None,
        "memory_gib": props.total_memory / 2**30 if props is not None else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


class Run:
    """One check's results, rewritten to ``out`` after every step."""

    def __init__(self, out: Path, result: dict[str, Any]) -> None:
        self.out, self.result = out, result
        self.t0 = time.perf_counter()

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` as step ``name``: its result (or error) and time, then the files written.

        Returns ``fn()``'s value, or ``None`` when it raised.
        """
        log.info("gpu-check: %s ...", name)
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # reported; the steps that do not need this one still run
            log.error("gpu-check: %s failed:\n%s", name, traceback.format_exc())
            value, entry = None, {"error": error_text(err)}
        else:
            entry = value if isinstance(value, dict) else dict(getattr(value, "facts", {}))
        self.result[name] = {**entry, "step_s": time.perf_counter() - t0}
        self.write()
        log.info("gpu-check: %s done in %.1f s", name, self.result[name]["step_s"])
        return value

    def write(self) -> None:
        """The files as they stand."""
        self.result["wall_s"] = time.perf_counter() - self.t0
        write_results(self.result, self.out)


def run_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every step; the results as plain data (``gpu.json``)."""
    sizes = TINY if args.tiny else FULL
    threads = set_threads(args.threads)
    backend = None if args.no_compile else args.compile_backend
    run = Run(
        Path(args.out),
        {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "tiny": bool(args.tiny),
            "sizes": asdict(sizes),
            "compile_backend": backend,
            "machine": machine(device),
            "versions": package_versions(),
            "git": git_state(),
        },
    )
    if args.no_tests:
        run.result["tests"] = {"not_run": "--no-tests"}
    else:
        run.step("tests", lambda: gpu_tests(args.tests))
    nets = run.step("networks", lambda: train_networks(sizes, device))
    if nets is not None:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for subject in subjects(nets, sizes, backend):
                run.step(f"options/{subject.name}", _measure(subject, sizes, device))
        run.step("paper_row", lambda: paper_row(nets, sizes, device, Path(args.out), threads))
    run.result["failures"] = failures(run.result)
    run.result["ok"] = not run.result["failures"]
    run.write()
    return run.result


def _measure(subject: Subject, sizes: Sizes, device: torch.device) -> Callable[[], Any]:
    return lambda: measure_subject(subject, sizes, device)


def failures(result: Mapping[str, Any]) -> list[str]:
    """What went wrong: a failed step, GPU test or setting, a paper row that did not complete."""
    found = []
    for key, value in result.items():
        if not isinstance(value, dict):
            continue
        if "error" in value and value["error"] is not None:
            found.append(f"{key}: {value['error']}")
        if key == "tests" and value.get("ok") is False:
            found.append(f"tests: {value['summary'] or 'pytest exited with ' + str(value['rc'])}")
        for name, row in value.get("settings", {}).items():
            if "error" in row:
                found.append(f"{key} {name}: {row['error']}")
        if key == "paper_row" and value.get("status", "completed") != "completed":
            found.append(f"paper_row: {value['status']}")
    return found


def is_test_run(tiny: bool, device: str) -> bool:
    """Whether a run tests the steps rather than measures a GPU: ``--tiny``, or not CUDA."""
    return tiny or device.split(":", 1)[0] != "cuda"


def default_out(tiny: bool, device: str) -> Path:
    """Where ``gpu.md`` goes without ``--out``: the results folder, or :data:`TEST_OUT` in it."""
    results = Path(os.environ.get("PUREBENCH_RESULTS_DIR", "results"))
    return results / TEST_OUT if is_test_run(tiny, device) else results


def device_problem(name: str) -> str | None:
    """Why ``name`` cannot run this check (one line), or ``None``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device; use cuda, cuda:N or cpu"
    if device.type not in ("cuda", "cpu"):
        return f"--device {name!r}: this check runs on cuda (or on cpu with --tiny, as a test)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return (
            f"CUDA is not available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}): this check needs a GPU; `--device cpu --tiny` runs its "
            "steps on the CPU at test sizes"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``python -m bench.tools.gpu_check``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.tools.gpu_check",
        description="GPU tests, bf16 / channels-last / torch.compile against fp32, and one "
        "paper-profile row, on one GPU; writes gpu.md and gpu.json.",
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a test of the steps)")
    p.add_argument("--tiny", action="store_true", help="test sizes (seconds on a CPU)")
    p.add_argument(
        "--out",
        default=None,
        help="where gpu.md, gpu.json and the paper row's record (runs/, git-ignored) go; "
        f"default: $PUREBENCH_RESULTS_DIR or results, for a test run its {TEST_OUT}",
    )
    p.add_argument("--tests", nargs="+", default=["tests"], help="paths for pytest -m gpu")
    p.add_argument("--no-tests", action="store_true", help="skip step 1 (pytest -m gpu)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    p.add_argument("--threads", default="auto", help="torch CPU threads: auto or an integer")
    args = p.parse_args(argv)
    args.threads = int(args.threads) if str(args.threads).isdigit() else args.threads
    args.default_out = args.out is None
    if args.default_out:
        args.out = str(default_out(args.tiny, args.device))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Check the device, run every step, print ``gpu.md``; the exit status."""
    args = parse_args(argv)
    problem = device_problem(args.device)
    if problem is not None:
        sys.stderr.write(f"gpu-check: {problem}\n")
        return EXIT_NO_CUDA
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    if args.default_out and is_test_run(args.tiny, args.device):
        log.info(
            "gpu-check: a test run without --out writes to %s, not over a GPU run's gpu.md",
            args.out,
        )
    try:
        result = run_check(args, torch.device(args.device))
    except ConfigError as err:
        sys.stderr.write(f"gpu-check: {err}\n")
        return EXIT_FAILED
    sys.stdout.write(markdown(result))
    return 0 if result["ok"] else EXIT_FAILED
