"""Step 1 of ``make gpu-check``: ``pytest -m gpu`` in a subprocess, counted from its JUnit XML."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.provenance import REPO


def junit_counts(path: Path) -> dict[str, int]:
    """Passed, failed (failures and errors) and skipped tests of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))

    def total(key: str) -> int:
        return sum(int(s.get(key, 0)) for s in suites)

    failed, skipped = total("failures") + total("errors"), total("skipped")
    return {"passed": total("tests") - failed - skipped, "failed": failed, "skipped": skipped}


def gpu_tests(paths: Sequence[str]) -> dict[str, Any]:
    """``pytest -m gpu`` on ``paths`` (relative to the checkout), in a subprocess.

    Status 0 passes. Anything else fails, 5 (nothing collected) included: no test is marked.
    """
    args = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *paths]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *args, f"--junitxml={junit}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t0
        counts = junit_counts(junit) if junit.exists() else {}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    out: dict[str, Any] = {
        "command": "python " + " ".join(args),
        "rc": proc.returncode,
        "ok": proc.returncode == 0,
        "wall_s": wall,
        "summary": lines[-1].strip("= ") if lines else "",
        **counts,
    }
    if not out["ok"]:
        out["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
    return out
