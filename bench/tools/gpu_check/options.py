"""Step 3 of ``make gpu-check``: every setting on a subject, against fp32.

Per setting, on one batch: how far the outputs move from fp32's (agreement of the predictions,
largest absolute difference, cosine similarity of the input gradients), and how long a forward
and a gradient pass take, the settings interleaved (:func:`bench.tools.perf.timing.interleave`).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.tools.gpu_check.settings import SETTINGS, synchronize
from bench.tools.gpu_check.sizes import Sizes
from bench.tools.gpu_check.subjects import Subject
from bench.tools.perf.timing import interleave

log = logging.getLogger(__name__)


def error_text(err: BaseException) -> str:
    """An exception as one report cell: its type and message, at most 800 characters."""
    return f"{type(err).__name__}: {err}".strip()[:800]


def passes(subject: Subject, call: Callable[..., Tensor]) -> dict[str, Callable[[], Any]]:
    """The subject's passes: ``forward`` returns the outputs, ``gradient`` (outputs, grad)."""

    def forward() -> Tensor:
        with torch.no_grad():
            return call(*subject.inputs)

    def gradient() -> tuple[Tensor, Tensor]:
        first = subject.inputs[0].detach().requires_grad_(True)
        out = call(first, *subject.inputs[1:])
        (grad,) = torch.autograd.grad(subject.loss(out), first)
        return out.detach(), grad

    thunks = {"forward": forward, "gradient": gradient}
    return {name: thunks[name] for name in subject.passes}


def warm(
    thunks: Mapping[str, Callable[[], Any]], sizes: Sizes, device: torch.device
) -> tuple[dict[str, float], dict[str, Any]]:
    """Warm every pass up: its first call's seconds (compilation included), then its results."""
    first: dict[str, float] = {}
    for name, thunk in thunks.items():
        synchronize(device)
        t0 = time.perf_counter()
        thunk()
        synchronize(device)
        first[name] = time.perf_counter() - t0
        for _ in range(sizes.warmup - 1):
            thunk()
    return first, {name: thunk() for name, thunk in thunks.items()}


def _outputs(results: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
    """The forward pass's outputs (else the gradient pass's) and the input gradient."""
    grad = results["gradient"][1] if "gradient" in results else None
    out = results["forward"] if "forward" in results else results["gradient"][0]
    return out, grad


def agreement(
    subject: Subject, ref: Mapping[str, Any], other: Mapping[str, Any]
) -> dict[str, float]:
    """How far ``other``'s outputs and input gradients are from ``ref``'s."""
    (out_ref, grad_ref), (out, grad) = _outputs(ref), _outputs(other)
    with torch.no_grad():
        diff = (out - out_ref).abs()
        same = subject.predict(out) == subject.predict(out_ref)
        found = {
            "agreement": same.float().mean().item(),
            "disagreeing": int((~same).sum()),
            "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "ref_max_abs": out_ref.abs().max().item(),
        }
        if grad is not None and grad_ref is not None:
            cos = F.cosine_similarity(grad.flatten(1), grad_ref.flatten(1), dim=1)
            found |= {"grad_cosine_mean": cos.mean().item(), "grad_cosine_min": cos.min().item()}
    return found


def _repeat(thunk: Callable[[], Any], inner: int, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            thunk()
        synchronize(device)

    return run


def time_passes(
    subject: Subject,
    ready: Mapping[str, Mapping[str, Callable[[], Any]]],
    sizes: Sizes,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Per setting and pass: milliseconds per call and speedup over fp32, settings interleaved."""
    timed: dict[str, dict[str, Any]] = {name: {} for name in ready}
    for pass_name in subject.passes:
        variants = {s: _repeat(t[pass_name], sizes.inner, device) for s, t in ready.items()}
        synchronize(device)
        times = interleave(variants, sizes.repeats, clock="wall")
        for name in variants:
            runs_ms = [1000 * t / sizes.inner for t in times.wall[name]]
            timed[name][pass_name] = {
                "ms_per_call": statistics.median(runs_ms),
                "runs_ms": [round(t, 4) for t in runs_ms],
                "speedup": times.ratio("fp32", name, "wall") if "fp32" in variants else None,
            }
    return timed


def measure_subject(subject: Subject, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Every setting on ``subject``: agreement with fp32, first-call and per-call times.

    A setting that fails to build or run (a compiler the machine lacks) is a result: its row
    holds the error, and the other settings still run.
    """
    rows: dict[str, dict[str, Any]] = {}
    ready: dict[str, dict[str, Callable[[], Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for setting in SETTINGS:
        reason = subject.not_run(setting) if subject.not_run else None
        if reason is not None:
            rows[setting.name] = {"not_run": reason}
            continue
        try:
            thunks = passes(subject, subject.build(setting))
            first, results[setting.name] = warm(thunks, sizes, device)
        except Exception as err:  # the row says why; the other settings still run
            log.warning("gpu-check: %s under %s failed: %s", subject.name, setting.name, err)
            rows[setting.name] = {"error": error_text(err)}
            continue
        ready[setting.name] = thunks
        rows[setting.name] = {"first_call_s": first}
    if "fp32" in results:
        again = {name: thunk() for name, thunk in ready["fp32"].items()}
        for name, res in results.items():
            other = again if name == "fp32" else res
            rows[name]["vs_fp32"] = agreement(subject, results["fp32"], other)
    for name, timed in time_passes(subject, ready, sizes, device).items():
        rows[name].update(timed)
    return {"what": subject.what, "passes": list(subject.passes), "settings": rows}
