"""``perf.md`` and ``perf.json``: the table of one ``make perf`` run, one row per measurement."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.reporting.records import write_json_atomic

PERF_MD, PERF_JSON = "perf.md", "perf.json"

Row = tuple[str, str, str, str, str]  # measurement, value, target, met, details

_CLOCK_NOTE = {
    "cpu": "this process's CPU time, blind to other processes holding the cores",
    "wall": "elapsed time",
}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _met(flag: bool | None) -> str:
    return "" if flag is None else ("yes" if flag else "**no**")


def chunk_rows(c: Mapping[str, Any]) -> list[Row]:
    """Row 0: the EOT chunk sweep."""
    ms = ", ".join(f"{k}: {v:.0f} ms" for k, v in c["pass_ms"].items())
    details = (
        f"EOT-{c['eot_samples']} on {c['batch']} images, chunk {ms}; auto_chunk="
        f"{c['auto_chunk']} is {_fmt(c['auto_vs_best'])}x the best ({c['best_chunk']})"
    )
    value = f"one call / K calls {_fmt(c['one_call_vs_k_calls'])}"
    return [("0. EOT chunk (one fwd+bwd pass)", value, "", "", details)]


def overhead_rows(o: Mapping[str, Any]) -> list[Row]:
    """Row 1: the engine's attack against the floor of its own passes."""
    raw = f"; vs raw classifier(purify(x)) loop {_fmt(o['ratio_raw'])}" if "ratio_raw" in o else ""
    details = (
        f"{_fmt(o['attack']['median_s'])} s vs {_fmt(o['floor']['median_s'])} s; "
        f"{o['view_calls']} view calls ({o['grad_calls']} with grad), chunk {o['chunk']}"
        f"{raw}; wall-clock ratio {_fmt(o['ratio_wall'])}"
    )
    measurement = "1. Engine overhead (attack / floor)"
    return [(measurement, _fmt(o["ratio"]), f"<= {o['target']}", _met(o["met"]), details)]


def torchattacks_rows(ta: Mapping[str, Any]) -> list[Row]:
    """Rows 2: every harness variant against EOTPGD, stochastic and deterministic."""
    if "skipped" in ta:
        return []
    rows = []
    for kind in ("stochastic", "deterministic"):
        t = ta.get(kind)
        if t is None:
            continue
        lib = t["torchattacks"]
        for name, h in t["harness"].items():
            opts = ", ".join(f"{k}={v}" for k, v in h["options"].items()) or "defaults"
            measurement = (
                f"2. vs torchattacks EOTPGD: {t['defense']} EOT-{t['eot_samples']}, "
                f"harness {name} ({opts})"
            )
            details = (
                f"{_fmt(h['median_s'])} s vs {_fmt(lib['median_s'])} s; robust acc "
                f"{100 * h['robust_acc']:.1f}% vs {100 * lib['robust_acc']:.1f}% (clean "
                f"{100 * t['clean_acc']:.1f}%, {t['judge_draws']} fresh draw(s) per image; "
                f"{100 * h['robust_acc_any']:.1f}% with success_at=any); wall-clock ratio "
                f"{_fmt(h['ratio_wall'])}"
            )
            target = f"<= {ta['target']}, acc no higher"
            rows.append((measurement, _fmt(h["ratio"]), target, _met(h["met"]), details))
    return rows


def autoattack_rows(a: Mapping[str, Any]) -> list[Row]:
    """Row 3: the AutoAttack adapter against pyautoattack."""
    details = (
        f"{_fmt(a['adapter']['median_s'])} s vs {_fmt(a['direct']['median_s'])} s; "
        f"{'+'.join(a['attacks'])}, {a['n_iter']} iter, EOT-{a['eot_samples']} view; "
        f"identical output: {a['same_output']}; wall-clock ratio {_fmt(a['ratio_wall'], 3)}"
    )
    measurement = "3. AutoAttack adapter / pyautoattack"
    return [(measurement, _fmt(a["ratio"], 3), f"<= {a['target']}", _met(a["met"]), details)]


def cascade_rows(c: Mapping[str, Any]) -> list[Row]:
    """Row 4: the suite cascade against every attack on every point."""
    per = ", ".join(
        f"{k} {c['cascade']['per_attack'][k]['n_attacked']}/{v['n_attacked']} pts"
        for k, v in c["full"]["per_attack"].items()
    )
    details = (
        f"{_fmt(c['cascade']['median_s'])} s vs {_fmt(c['full']['median_s'])} s "
        f"(saving {100 * c['saving']:.0f}%; the runner's own loading excluded); attacked {per}; "
        f"robust acc {100 * c['cascade']['robust_acc']:.1f}% vs "
        f"{100 * c['full']['robust_acc']:.1f}%; wall-clock ratio {_fmt(c['ratio_wall'])}"
    )
    measurement = "4. Cascade (suite time / every attack on every point)"
    return [(measurement, _fmt(c["ratio"]), "", "", details)]


def memory_rows(memory: Mapping[str, Any]) -> list[Row]:
    """Rows 5: one per defense, peak gradient memory against its key, with every reading."""
    rows = []
    for name, mem in memory.items():
        if not isinstance(mem, dict) or "peak_mb" not in mem:
            continue
        peaks = ", ".join(f"{k}: {v:.1f}" for k, v in mem["peak_mb"].items())
        runs = "; ".join(
            f"{k}: {' / '.join(f'{r:.2f}' for r in v)}" for k, v in mem["peak_mb_runs"].items()
        )
        details = (
            f"peak MiB by {mem['key']}: {peaks} ({mem['probe']}, {mem['n']} images); readings "
            f"{runs}; max spread {100 * mem['max_spread']:.1f}%; log-log exponent "
            f"{_fmt(mem['exponent'])}"
        )
        options = ", ".join(f"{k}={v}" for k, v in mem["overrides"].items()) or "as configured"
        rows.append(
            (
                f"5. Gradient memory, {name} ({options})",
                f"x{_fmt(mem['memory_ratio'])} for x{_fmt(mem['value_ratio'], 0)} {mem['key']}",
                f"spread <= {100 * mem['target_spread']:.0f}%",
                _met(mem["met"]),
                details,
            )
        )
    return rows


def _times(sc: Mapping[str, Any]) -> str:
    return ", ".join(f"{n}: {t:.1f} s" for n, t in zip(sc["n"], sc["median_s"], strict=True))


def scaling_rows(sc: Mapping[str, Any]) -> list[Row]:
    """Rows 6: the scaling exponent at the headline batch size, then at the others."""
    per_rep = ", ".join(_fmt(e) for e in sc["exponent_per_repetition"])
    details = (
        f"{_times(sc)} (batches of {sc['batch_size']}); per repetition {per_rep}; wall clock "
        f"{_fmt(sc['exponent_wall'])}"
    )
    measurement = "6. Scaling exponent (time vs n)"
    rows = [(measurement, _fmt(sc["exponent"]), f"<= {sc['target']}", _met(sc["met"]), details)]
    for size, other in sc.get("other_batch_sizes", {}).items():
        per_rep = ", ".join(_fmt(e) for e in other["exponent_per_repetition"])
        details = f"{_times(other)}; per repetition {per_rep}"
        rows.append(
            (f"6. Scaling exponent, batches of {size}", _fmt(other["exponent"]), "", "", details)
        )
    return rows


def cuda_rows(cuda: Mapping[str, Any]) -> list[Row]:
    """Rows of the CUDA options against fp32 (none when skipped)."""
    if not cuda or "skipped" in cuda:
        return []
    fp32 = 100 * cuda["fp32"]["robust_acc"]
    return [
        (
            f"CUDA {name}",
            f"speedup {_fmt(v['speedup'])}",
            "",
            "",
            f"robust acc {100 * v['robust_acc']:.1f}% vs fp32 {fp32:.1f}%",
        )
        for name, v in cuda.items()
        if name not in ("fp32", "item_wall_s")
    ]


def escalation_rows(e: Mapping[str, Any]) -> list[Row]:
    """Row 7: per defense, the escalating evaluation against the fixed strong budget."""
    rows = []
    for name, r in e["rows"].items():
        esc, strong = r["escalating"], r["strong"]
        details = (
            f"{name}, {e['n']} images: robust {100 * esc['robust_acc']:.1f}% ({esc['verdict']}, "
            f"{esc['levels']} levels) vs {100 * strong['robust_acc']:.1f}% "
            f"[{100 * strong['low']:.1f}, {100 * strong['high']:.1f}]; "
            f"{_fmt(esc['purifications_per_image'], 0)} vs "
            f"{_fmt(strong['purifications_per_image'], 0)} purifications per image; "
            f"{_fmt(esc['eval_s'], 0)} s vs {_fmt(strong['eval_s'], 0)} s"
        )
        rows.append(
            (
                "7. Escalation / fixed strong budget (purifications)",
                _fmt(r["calls_ratio"], 3),
                f"<= {r.get('target', '')} and inside the interval",
                _met(r["met"]),
                details,
            )
        )
    return rows


ROWS: dict[str, Callable[[Mapping[str, Any]], list[Row]]] = {
    "chunk": chunk_rows,
    "overhead": overhead_rows,
    "torchattacks": torchattacks_rows,
    "autoattack": autoattack_rows,
    "cascade": cascade_rows,
    "memory": memory_rows,
    "scaling": scaling_rows,
    "cuda": cuda_rows,
    "escalation": escalation_rows,
}


def preparation_line(result: Mapping[str, Any]) -> str:
    """The line of the time spent preparing data and networks, which no measurement includes."""
    steps = "; ".join(
        f"{p['what']} ({p['status']}) {p['setup_s']:.1f} s" for p in result.get("prepared", [])
    )
    return f"Preparation (excluded from every measurement): {result.get('setup_s', 0.0):.0f} s" + (
        f": {steps}." if steps else "."
    )


def footer_lines(result: Mapping[str, Any]) -> list[str]:
    """The setup, the preparation and the machine, under the table."""
    s, m = result["setup"], result["machine"]
    cuda = result.get("cuda", {})
    lines = [
        f"Setup: {s['dataset']}, {s['classifier']}, defense {s['defense']}, {s['norm']} eps "
        f"{s['eps']:g}, PGD-{s['steps']} (step {s['step_size']:.4g}) with EOT-{s['eot_samples']} "
        f"on {s['n_samples']} images (clean acc of the bare classifier "
        f"{100 * s['clean_acc_bare']:.1f}%); times are medians over {s['repeats']} interleaved "
        f"repetitions on the {s['clock']} clock ({_CLOCK_NOTE[s['clock']]}), ratios medians "
        "of per-repetition ratios.",
        preparation_line(result),
        f"Machine: {m['device']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, "
        f"1-min load average {_fmt(m['load_avg_start'][0])} at start and "
        f"{_fmt(m['load_avg_end'][0])} at the end"
        + (f", {m['cuda']}" if m.get("cuda") else "")
        + f". Wall time {result['wall_s']:.0f} s.",
    ]
    if cuda.get("skipped"):
        lines.append(f"CUDA options (bf16, channels-last, torch.compile): {cuda['skipped']}.")
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    """The table of ``perf.md``: one row per measurement, then the setup and notes."""
    rows = [row for key, fn in ROWS.items() if key in result for row in fn(result[key])]
    lines = [
        "| Measurement | Value | Target | Met | Details |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
        *footer_lines(result),
    ]
    notes = _notes(result)
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _torchattacks_note(ta: Mapping[str, Any]) -> str | None:
    """Why target 2 is missed on the stochastic defense, from this run's numbers."""
    sto, det = ta.get("stochastic"), ta.get("deterministic")
    if not sto or any(h["met"] for h in sto["harness"].values()):
        return None
    lib = 100 * sto["torchattacks"]["robust_acc"]
    # early_stop=auto (the default) does not exit early on a stochastic view.
    exits = [h for h in sto["harness"].values() if h["options"].get("early_stop") is True]
    full = [h for h in sto["harness"].values() if h["options"].get("early_stop") is not True]
    text = (
        f"Target 2 on the stochastic defense: EOTPGD ends at {lib:.1f}% robust accuracy "
        "(judged on fresh purifications, the runner's success_at=final). "
    )
    if exits:
        best = min(exits, key=lambda h: h["robust_acc"])
        text += (
            f"Early exit saves passes (ratio {_fmt(best['ratio'])}) but freezes points on "
            "the attack's own EOT estimate, which fresh noise still classifies correctly "
            f"({100 * best['robust_acc']:.1f}%). "
        )
    if full:
        h = full[0]
        text += (
            f"Without early exit the harness makes EOTPGD's passes plus one forward of the "
            f"final iterate (it keeps the best iterate): ratio {_fmt(h['ratio'])} at "
            f"{100 * h['robust_acc']:.1f}%. "
        )
    first = next(iter(sto["harness"].values()))
    text += (
        "None of the variants meets both: at ratio <= "
        f"{ta['target']} a PGD with EOTPGD's budget must skip passes on points it believes "
        "broken. Early exit is exact where the decision rule allows it: with success_at=any "
        "(a point the attack saw fooled counts as broken) the first variant (ratio "
        f"{_fmt(first['ratio'])}) reaches {100 * first['robust_acc_any']:.1f}% against "
        f"{lib:.1f}%"
    )
    if det:
        d, d_lib = det["harness"]["default"], det["torchattacks"]["robust_acc"]
        text += (
            f"; on a deterministic model the ratio is {_fmt(d['ratio'])} at "
            f"{100 * d['robust_acc']:.1f}% against {100 * d_lib:.1f}%"
        )
    return text + "."


def _notes(result: Mapping[str, Any]) -> list[str]:
    """Why a target is missed, from the numbers of this run."""
    notes = []
    if (note := _torchattacks_note(result.get("torchattacks", {}))) is not None:
        notes.append(note)
    for key, label in (("overhead", "Target 1"), ("autoattack", "Target 3")):
        item = result.get(key)
        if item and not item["met"]:
            notes.append(
                f"{label} missed at {_fmt(item['ratio'], 3)} (wall clock "
                f"{_fmt(item['ratio_wall'], 3)}); every repetition is in perf.json."
            )
    return notes


def write_results(result: Mapping[str, Any], results_dir: Path) -> tuple[Path, Path]:
    """Write ``perf.md`` and ``perf.json`` into ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    md, js = results_dir / PERF_MD, results_dir / PERF_JSON
    write_json_atomic(js, dict(result))
    fd, tmp = tempfile.mkstemp(dir=results_dir, suffix=".md.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("# Engine performance (`make perf`)\n\n" + markdown(result))
    os.replace(tmp, md)
    return md, js
