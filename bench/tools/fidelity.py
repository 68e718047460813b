"""Gradient fidelity and gradient memory of a purifier: the numbers behind a gradient mode.

An attack is only as good as its gradients. Two measurements on a small batch of clean-correct
test images, through the run's own classifier:

* **agreement**: the per-image cosine similarity between the input gradient of the
  cross-entropy through a *candidate* configuration of the defense (e.g. DiffPure's stochastic
  adjoint, a surrogate with fewer steps) and through the *reference* (exact backprop), with the
  same generator seed, so both see the same noise;
* **memory**: the peak memory one exact gradient adds (:func:`bench.devices.allocation_peak_mb`:
  the most tensor bytes held at once beyond those allocated before it, from the CUDA allocator
  or the CPU allocator's profiler events), for several values of one defense argument (e.g.
  ``steps``), each read ``memory.repeats`` times, with the spread of the readings and the
  growth factor between the smallest and the largest value.

``python -m bench.tools.fidelity defense=diffpure`` (config ``conf/fidelity.yaml``) writes
``fidelity.json`` in its run dir and logs a summary.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench.config import CONF_DIR
from bench.data import ImageDataset, eval_subset
from bench.devices import allocation_peak_mb, resolve_device
from bench.models.classifiers import ClassifierSource
from bench.models.parts import prepare_parts
from bench.reporting.records import write_json_atomic
from common.errors import ConfigError
from defenses.base import Defense

log = logging.getLogger(__name__)

TASKS = ("all", "agreement", "memory")


@dataclass
class Inputs:
    """What every measurement of one config shares.

    Attributes:
        device: where everything runs.
        dataset: the evaluated dataset (the defense's parts train on it).
        source: the classifier's source (its description keys parts trained against it).
        classifier: the loaded classifier (frozen, eval mode).
        x: the batch, ``n_samples`` clean-correct test images on ``device``.
        y: their labels.
    """

    device: torch.device
    dataset: ImageDataset
    source: ClassifierSource
    classifier: nn.Module
    x: Tensor
    y: Tensor


def load_inputs(cfg: DictConfig) -> Inputs:
    """Load the dataset and the classifier (training it if not cached); pick the batch."""
    device = resolve_device(str(cfg.device))
    dataset = instantiate(cfg.dataset)
    source = instantiate(cfg.classifier)
    classifier = source.load(dataset, device)
    x, y = dataset.test()
    n = int(cfg.n_samples)
    idx = eval_subset(dataset.n_test, min(4 * n, dataset.n_test), int(cfg.subset_seed))
    x, y = x[idx].to(device), y[idx].to(device)
    with torch.inference_mode():
        ok = classifier(x).argmax(1) == y
    return Inputs(device, dataset, source, classifier, x[ok][:n], y[ok][:n])


def build_defense(cfg: DictConfig, inputs: Inputs, arguments: Mapping[str, Any]) -> Defense:
    """``cfg.defense`` with ``arguments`` changed, its parts trained or loaded, on the device."""
    defense = instantiate(OmegaConf.merge(cfg.defense, dict(arguments)))
    if not isinstance(defense, Defense):
        raise ConfigError(f"defense builds {type(defense).__name__}, not a defenses.Defense")
    prepare_parts(
        defense,
        inputs.dataset,
        inputs.device,
        classifier=inputs.classifier,
        classifier_info=inputs.source.describe(),
    )
    return defense.to(inputs.device).eval()


def input_gradient(
    defense: Defense, classifier: nn.Module, x: Tensor, y: Tensor, seed: int
) -> Tensor:
    """Input gradient of the summed cross-entropy through ``classifier(defense.purify(x))``."""
    x = x.clone().requires_grad_(True)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with torch.enable_grad():
        loss = F.cross_entropy(
            classifier(defense.purify(x, generator=generator)), y, reduction="sum"
        )
        (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


def cosine_per_image(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of two gradients, image by image."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def agreement(cfg: DictConfig, inputs: Inputs | None = None) -> dict[str, Any]:
    """Cosine between the candidate's and the reference's input gradients, per image."""
    inputs = load_inputs(cfg) if inputs is None else inputs
    reference = build_defense(cfg, inputs, cfg.reference)
    candidate = build_defense(cfg, inputs, cfg.candidate)
    x, y, seed = inputs.x, inputs.y, int(cfg.seed)
    cos = cosine_per_image(
        input_gradient(candidate, inputs.classifier, x, y, seed),
        input_gradient(reference, inputs.classifier, x, y, seed),
    )
    return {
        "reference": OmegaConf.to_container(cfg.reference),
        "candidate": OmegaConf.to_container(cfg.candidate),
        "n": len(x),
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "cosine_per_image": cos.tolist(),
    }


def gradient_peak_mb(
    cfg: DictConfig, inputs: Inputs | None = None, defense: Defense | None = None
) -> float:
    """Peak memory (MiB) that one exact gradient through ``defense`` adds on the device.

    ``defense`` defaults to the reference configuration. A pass without a graph runs first, so
    state created lazily on first use (thread pools, cached kernels) is not counted.
    """
    inputs = load_inputs(cfg) if inputs is None else inputs
    if defense is None:
        defense = build_defense(cfg, inputs, cfg.reference)
    x, y, seed = inputs.x, inputs.y, int(cfg.seed)
    with torch.inference_mode():
        defense.purify(x, generator=torch.Generator(device=x.device).manual_seed(seed))
    return allocation_peak_mb(
        lambda: input_gradient(defense, inputs.classifier, x, y, seed), inputs.device
    )


def memory_defenses(cfg: DictConfig, inputs: Inputs) -> dict[str, Defense]:
    """The defenses :func:`memory` measures: the reference at each of ``memory.values``."""
    key, values = str(cfg.memory.key), list(cfg.memory["values"])
    if len(values) < 2:
        raise ConfigError(f"memory.values={values} needs at least two values to give a growth")
    fixed = {
        **OmegaConf.to_container(cfg.reference, resolve=True),
        **OmegaConf.to_container(cfg.memory.overrides, resolve=True),
    }
    return {str(v): build_defense(cfg, inputs, {**fixed, key: v}) for v in values}


def memory(
    cfg: DictConfig, inputs: Inputs | None = None, defenses: Mapping[str, Defense] | None = None
) -> dict[str, Any]:
    """Peak gradient memory at each ``memory.values`` of ``defense.<memory.key>``.

    Every value is read ``memory.repeats`` times; ``spread`` is (max - min) / min of a value's
    readings, the evidence that the probe measures the gradient and not noise.
    """
    inputs = load_inputs(cfg) if inputs is None else inputs
    defenses = memory_defenses(cfg, inputs) if defenses is None else defenses
    repeats = int(cfg.memory.repeats)
    if repeats < 1:
        raise ConfigError(f"memory.repeats={repeats} must be at least 1")
    runs = {
        value: [gradient_peak_mb(cfg, inputs, defense) for _ in range(repeats)]
        for value, defense in defenses.items()
    }
    peaks = {value: statistics.median(r) for value, r in runs.items()}
    spread = {value: (max(r) - min(r)) / max(min(r), 1e-9) for value, r in runs.items()}
    values = [float(v) for v in defenses]
    first, last = peaks[next(iter(peaks))], peaks[list(peaks)[-1]]
    return {
        "key": str(cfg.memory.key),
        "overrides": OmegaConf.to_container(cfg.memory.overrides),
        "n": len(inputs.x),
        "probe": "cuda allocator peak" if inputs.device.type == "cuda" else "cpu allocator peak",
        "peak_mb": peaks,
        "peak_mb_runs": runs,
        "spread": spread,
        "max_spread": max(spread.values()),
        "value_ratio": values[-1] / values[0],
        "memory_ratio": last / max(first, 1e-9),
    }


def _log_summary(result: Mapping[str, Any]) -> None:
    if "agreement" in result:
        a = result["agreement"]
        log.info(
            "gradient cosine %s vs %s on %d images: mean %.4f, min %.4f",
            a["candidate"],
            a["reference"],
            a["n"],
            a["cosine_mean"],
            a["cosine_min"],
        )
    if "memory" in result:
        m = result["memory"]
        log.info(
            "peak gradient memory by %s: %s MiB (readings %s, max spread %.1f%%); "
            "x%.1f %s -> x%.2f memory",
            m["key"],
            json.dumps({k: round(v, 2) for k, v in m["peak_mb"].items()}),
            json.dumps({k: [round(v, 2) for v in r] for k, r in m["peak_mb_runs"].items()}),
            100 * m["max_spread"],
            m["value_ratio"],
            m["key"],
            m["memory_ratio"],
        )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fidelity")
def main(cfg: DictConfig) -> None:
    """Entry point of ``python -m bench.tools.fidelity``."""
    task = str(cfg.task)
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not allowed; allowed: {', '.join(TASKS)}")
    t0 = time.perf_counter()
    inputs = load_inputs(cfg)
    result: dict[str, Any] = {"setup_s": time.perf_counter() - t0}
    if task in ("all", "agreement"):
        result["agreement"] = agreement(cfg, inputs)
    if task in ("all", "memory"):
        result["memory"] = memory(cfg, inputs)
    out = Path(HydraConfig.get().runtime.output_dir) / "fidelity.json"
    write_json_atomic(out, result)
    _log_summary(result)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
