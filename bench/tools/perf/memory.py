"""Item 5 of ``make perf``: the memory one exact, checkpointed gradient adds, against steps.

For DiffPure's sampler steps and PurSAMERE's purification steps, each defense at several
values, read with :func:`bench.tools.fidelity.memory` (the tensor bytes the gradient holds at
once, :func:`bench.devices.allocation_peak_mb`) ``memory.repeats`` times per value: the spread
of the readings is part of the result, and the log-log exponent of peak memory against the
value says how the checkpointed gradient scales. The data, the classifier and the defenses'
score models are prepared before any measurement (:func:`prepare_memory`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from bench.tools import fidelity
from bench.tools.perf.setup import Preparation, classifier_status, compose_config, parts_status
from bench.tools.perf.timing import fit_exponent
from defenses.base import Defense


@dataclass
class MemoryCase:
    """One defense's memory measurement, prepared: its fidelity config, batch and defenses."""

    cfg: DictConfig
    inputs: fidelity.Inputs
    defenses: dict[str, Defense]


def _fidelity_config(cfg: DictConfig, node: DictConfig, choices: Mapping[str, str]) -> DictConfig:
    """``conf/fidelity.yaml`` for one entry of ``cfg.memory.defenses``."""
    values = ",".join(str(int(v)) for v in node["values"])
    return compose_config(
        "fidelity",
        [
            f"dataset={choices['dataset']}",
            f"classifier={choices['classifier']}",
            f"defense={node.defense}",
            f"n_samples={int(cfg.memory.n_samples)}",
            f"device={cfg.device}",
            f"seed={int(cfg.seed)}",
            f"paths.data_dir={cfg.paths.data_dir}",
            f"paths.cache_dir={cfg.paths.cache_dir}",
            f"memory.key={node.key}",
            f"memory.values=[{values}]",
            f"memory.repeats={int(cfg.memory.repeats)}",
            *list(node.get("overrides", [])),
        ],
    )


def prepare_memory(
    cfg: DictConfig, choices: Mapping[str, str], prep: Preparation
) -> dict[str, MemoryCase]:
    """Load (or train) what every memory measurement needs, each a timed preparation step."""
    cases = {}
    for name, node in cfg.memory.defenses.items():
        fcfg = _fidelity_config(cfg, node, choices)
        dataset = instantiate(fcfg.dataset)
        source = instantiate(fcfg.classifier)
        what = f"classifier {choices['classifier']} on {dataset.name} for the {name} memory item"
        with prep.step(what, classifier_status(source, dataset)):
            inputs = fidelity.load_inputs(fcfg)
        info = inputs.source.describe()
        status = parts_status(instantiate(fcfg.defense), inputs.dataset, info) or "no learned parts"
        values = ", ".join(str(v) for v in fcfg.memory["values"])
        with prep.step(f"{name} at {fcfg.memory.key} {values} for the memory item", status):
            defenses = fidelity.memory_defenses(fcfg, inputs)
        cases[str(name)] = MemoryCase(fcfg, inputs, defenses)
    return cases


def gradient_memory(cfg: DictConfig, cases: Mapping[str, MemoryCase]) -> dict[str, Any]:
    """Peak exact-gradient memory against the value of each defense's key, its repeats' spread."""
    out: dict[str, Any] = {}
    for name, case in cases.items():
        result = fidelity.memory(case.cfg, case.inputs, case.defenses)
        values = [float(v) for v in result["peak_mb"]]
        peaks = list(result["peak_mb"].values())
        exponent = fit_exponent(values, peaks) if all(p > 0 for p in peaks) else float("nan")
        target = float(cfg.targets.memory_spread)
        out[name] = {
            **result,
            "exponent": exponent,
            "target_spread": target,
            "met": result["max_spread"] <= target,
        }
    return out
