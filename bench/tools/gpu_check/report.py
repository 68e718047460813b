"""``gpu.md`` and ``gpu.json``: one ``make gpu-check`` run, a section per step."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.reporting.records import write_json_atomic

GPU_MD, GPU_JSON = "gpu.md", "gpu.json"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def machine_line(m: Mapping[str, Any], backend: str | None) -> str:
    """The device, the versions and the float32 settings in one sentence."""
    if m["device"].startswith("cuda"):
        where = (
            f"{m['name']} (compute capability {m['capability']}, {m['memory_gib']:.0f} GiB), "
            f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}"
        )
    else:
        where = f"CPU ({m['cpus']} cores, torch threads: {m['torch_threads']}), torch {m['torch']}"
    compiled = f"torch.compile backend {backend}" if backend else "torch.compile not run"
    return (
        f"{where}; fp32 convolutions with cudnn.allow_tf32={m['cudnn_allow_tf32']}, matmul "
        f"precision {m['matmul_precision']}, cudnn.benchmark={m['cudnn_benchmark']}; {compiled}."
    )


def tests_section(t: Mapping[str, Any] | None) -> list[str]:
    """Section 1: the GPU tests' counts."""
    lines = ["## 1. GPU tests (`pytest -m gpu`)", ""]
    if not t:
        return [*lines, "Not run yet.", ""]
    if "not_run" in t or "error" in t:
        return [*lines, f"Not run: {t.get('not_run') or t.get('error')}.", ""]
    counts = ", ".join(f"{t.get(k, '?')} {k}" for k in ("passed", "failed", "skipped"))
    lines.append(f"`{t['command']}`: {counts} (status {t['rc']}, {t['wall_s']:.1f} s).")
    if not t["ok"]:
        lines += ["", "```", t.get("output_tail", "").strip()[-2000:], "```"]
    return [*lines, ""]


def networks_section(n: Mapping[str, Any] | None) -> list[str]:
    """Section 2: the task and what the trained networks reach."""
    lines = ["## 2. Networks", ""]
    if not n or "error" in n:
        return [*lines, f"Not trained: {(n or {}).get('error', 'not run yet')}.", ""]
    for key in ("classifier", "purifier"):
        f = n[key]
        lines.append(
            f"- {key}: {f['arch']}, {f['parameters'] / 1e6:.2f} M parameters, {f['steps']} "
            f"steps in {f['train_s']:.1f} s (last loss {f['final_loss']:.3f})"
        )
    lines += [
        f"- data: {n['data']} ({n['data_s']:.1f} s to build)",
        f"- on the measured batch: clean accuracy {_pct(n['clean_acc_batch'])}, after AToP's "
        f"purification {_pct(n['purified_acc_batch'])}",
        "",
    ]
    return lines


HEADER = (
    "| network | setting | agreement | max abs diff (fp32 max) | grad cosine mean (min) "
    "| forward ms | forward speedup | gradient ms | gradient speedup | first call s |"
)


def _timing(row: Mapping[str, Any], pass_name: str) -> tuple[str, str]:
    t = row.get(pass_name)
    if t is None:
        return "", ""
    speed = "n/a" if t["speedup"] is None else f"{t['speedup']:.2f}x"
    return f"{t['ms_per_call']:.3f}", speed


def option_row(network: str, setting: str, row: Mapping[str, Any]) -> str:
    """One table row: a network under a setting."""
    if "not_run" in row or "error" in row:
        what = f"not run: {row['not_run']}" if "not_run" in row else f"**failed**: {row['error']}"
        return f"| {network} | {setting} | {_cell(what)} |" + " |" * 7
    a = row.get("vs_fp32", {})
    agree = f"{100 * a['agreement']:.2f}% ({a['disagreeing']} differ)" if a else "n/a"
    diff = f"{a['max_abs_diff']:.3g} ({a['ref_max_abs']:.3g})" if a else "n/a"
    cos = "n/a"
    if "grad_cosine_mean" in a:
        cos = f"{a['grad_cosine_mean']:.4f} ({a['grad_cosine_min']:.4f})"
    fwd, grad = _timing(row, "forward"), _timing(row, "gradient")
    first = " / ".join(f"{v:.2f}" for v in row["first_call_s"].values())
    cells = (network, setting, agree, diff, cos, *fwd, *grad, first)
    return "| " + " | ".join(cells) + " |"


def options_section(result: Mapping[str, Any]) -> list[str]:
    """Section 3: the table of every network under every setting."""
    s = result["sizes"]
    lines = [
        "## 3. bf16, channels-last and torch.compile against fp32",
        "",
        f"One batch of {s['batch']} images of 3x32x32. Each pass: {s['warmup']} warm-up call(s) "
        "(the first, compilation included, is *first call*, forward / gradient), then the "
        f"median of {s['repeats']} synchronised repetitions of {s['inner']} call(s), the settings "
        "interleaved; speedup: the median of the per-repetition ratios fp32 / setting (above 1 "
        "is faster). *agreement*: predictions equal to fp32's; *max abs diff*: of the outputs "
        "(logits; images in [0, 1] for the purifier), next to fp32's largest absolute output; "
        "*grad cosine*: of the input gradients, per image. The fp32 row is fp32 against a "
        "second fp32 run. The gradient pass is forward and backward to the input (an attack "
        "step).",
        "",
        HEADER,
        "|" + " --- |" * 10,
    ]
    for key, value in result.items():
        if not key.startswith("options/"):
            continue
        network = key.split("/", 1)[1]
        if "error" in value:
            lines.append(f"| {network} | | **failed**: {_cell(value['error'])} |" + " |" * 7)
        for setting, row in value.get("settings", {}).items():
            lines.append(option_row(network, setting, row))
    notes = [
        f"- {k.split('/', 1)[1]}: {v['what']}"
        for k, v in result.items()
        if k.startswith("options/") and "what" in v
    ]
    return [*lines, "", *notes, ""]


def paper_section(p: Mapping[str, Any] | None) -> list[str]:
    """Section 4: the paper-profile row's time and accuracies."""
    lines = ["## 4. One paper-profile row", ""]
    if not p or "what" not in p:
        return [*lines, f"Not run: {(p or {}).get('error', 'not run yet')}.", ""]
    extra = f" with overrides `{' '.join(p['overrides'])}`" if p["overrides"] else ""
    lines.append(
        f"{p['what']}{extra} (suite {p['suite']}): {p['status']} in {p['evaluate_s']:.1f} s "
        f"(`bench.evaluate` as a whole; the record's wall time {p['record_wall_s']:.1f} s); "
        f"clean {_pct(p['clean_acc'])}, robust {_pct(p['robust_acc'])}, verdict "
        f"{_cell(p['verdict'])}."
    )
    if p["attacks"]:
        per = ", ".join(
            f"{k} {a['wall_s']:.1f} s ({a['n_attacked']} images, "
            f"{a['purifier_calls_per_image']:.0f} purifier calls per image)"
            for k, a in p["attacks"].items()
        )
        lines += ["", f"Per attack: {per}."]
    return [*lines, ""]


def markdown(result: Mapping[str, Any]) -> str:
    """``gpu.md``: the whole check, readable."""
    m, git = result["machine"], result.get("git", {})
    sha = str(git.get("sha") or "unknown")[:10] + (
        " (uncommitted changes)" if git.get("dirty") else ""
    )
    head = [
        "# GPU check (`make gpu-check`)",
        "",
        machine_line(m, result["compile_backend"]),
        "",
        f"Started {result['started']}, git {sha}; wall time {result.get('wall_s', 0):.1f} s.",
        "",
    ]
    if result["tiny"] or not m["device"].startswith("cuda"):
        head += [
            f"**A test run ({'tiny sizes' if result['tiny'] else 'full sizes'} on "
            f"{m['device']})**: every step ran, but these are not GPU measurements.",
            "",
        ]
    body = [
        *tests_section(result.get("tests")),
        *networks_section(result.get("networks")),
        *options_section(result),
        *paper_section(result.get("paper_row")),
    ]
    problems = result.get("failures")
    tail = ["## Failures", ""]
    if problems is None:
        tail.append("The check has not finished.")
    else:
        tail += [f"- {_cell(p)}" for p in problems] or ["None."]
    return "\n".join(head + body + tail) + "\n"


def write_results(result: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``gpu.md`` and ``gpu.json`` into ``out`` (each through a temporary file)."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / GPU_MD, out / GPU_JSON
    write_json_atomic(js, dict(result))
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{GPU_MD}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
    os.replace(tmp, md)
    return md, js
