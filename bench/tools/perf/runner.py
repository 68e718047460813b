"""One ``make perf`` run: prepare everything first, then every measurement ``items`` names."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bench.provenance import package_versions
from bench.tools.perf.cascade import cascade_savings
from bench.tools.perf.chunk import chunk_sweep
from bench.tools.perf.cuda import cuda_options
from bench.tools.perf.escalation import escalation_vs_strong
from bench.tools.perf.memory import gradient_memory, prepare_memory
from bench.tools.perf.overhead import engine_overhead
from bench.tools.perf.passes import warm_up
from bench.tools.perf.scaling import scaling
from bench.tools.perf.setup import Preparation, Setup, build_setup
from bench.tools.perf.vs_autoattack import versus_pyautoattack
from bench.tools.perf.vs_torchattacks import versus_torchattacks
from common.errors import ConfigError

log = logging.getLogger(__name__)

ITEMS = (
    "chunk",
    "overhead",
    "torchattacks",
    "autoattack",
    "cascade",
    "memory",
    "scaling",
    "cuda",
    "escalation",
)


def _load_avg() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _machine(device: torch.device) -> dict[str, Any]:
    """The machine the numbers were taken on."""
    return {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": _load_avg(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _describe(cfg: DictConfig, setup: Setup, choices: Mapping[str, str]) -> dict[str, Any]:
    """The shared model, points and budget, with the bare classifier's clean accuracy."""
    x, y = setup.points(int(cfg.n_samples))
    with torch.inference_mode():
        clean_bare = (setup.classifier(x).argmax(1) == y).float().mean().item()
    return {
        "dataset": choices["dataset"],
        "classifier": choices["classifier"],
        "defense": OmegaConf.to_container(cfg.defense),
        "norm": setup.norm,
        "eps": setup.eps,
        "steps": setup.steps,
        "step_size": setup.alpha,
        "eot_samples": setup.eot,
        "n_samples": int(cfg.n_samples),
        "batch_size": setup.batch_size,
        "repeats": int(cfg.repeats),
        "clock": str(cfg.clock),
        "clean_acc_bare": clean_bare,
    }


def run_perf(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str]) -> dict[str, Any]:
    """Prepare, then every measurement ``cfg.items`` names, in one process; plain data.

    ``setup_s`` (and ``prepared``, per dataset and network) is the preparation; no item's
    ``item_wall_s`` includes it.
    """
    items = [str(i) for i in cfg["items"]]
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise ConfigError(f"perf items {unknown} are unknown; allowed: {', '.join(ITEMS)}")
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.perf_counter()
    prep = Preparation()
    setup = build_setup(cfg, prep, choices)
    cases = prepare_memory(cfg, choices, prep) if "memory" in items else {}
    log.info("perf: prepared in %.1f s, excluded from every measurement", prep.setup_s)
    warm_up(setup)
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(setup.device),
        "versions": package_versions(),
        "setup": _describe(cfg, setup, choices),
        "setup_s": prep.setup_s,
        "prepared": prep.to_list(),
    }
    measure: dict[str, Callable[[], dict[str, Any]]] = {
        "chunk": lambda: chunk_sweep(setup, cfg),
        "overhead": lambda: engine_overhead(setup, cfg),
        "torchattacks": lambda: versus_torchattacks(setup, cfg),
        "autoattack": lambda: versus_pyautoattack(setup, cfg),
        "cascade": lambda: cascade_savings(cfg, run_dir, choices),
        "memory": lambda: gradient_memory(cfg, cases),
        "scaling": lambda: scaling(setup, cfg),
        "cuda": lambda: cuda_options(setup, cfg),
        "escalation": lambda: escalation_vs_strong(cfg, run_dir, choices),
    }
    for name in items:
        t = time.perf_counter()
        log.info("perf: %s ...", name)
        result[name] = measure[name]()
        result[name]["item_wall_s"] = time.perf_counter() - t
        log.info("perf: %s done in %.1f s", name, result[name]["item_wall_s"])
    result["machine"]["load_avg_end"] = _load_avg()
    result["wall_s"] = time.perf_counter() - t0
    return result
