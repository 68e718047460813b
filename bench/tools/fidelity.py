"""Gradient fidelity and gradient memory of a purifier: the numbers behind a gradient mode.

An attack is only as good as its gradients. Two measurements on a small batch of clean-correct
test images, through the run's own classifier:

* **agreement**: the per-image cosine similarity between the input gradient of the
  cross-entropy through a *candidate* configuration of the defense (e.g. DiffPure's stochastic
  adjoint, a surrogate with fewer steps) and through the *reference* (exact backprop), with the
  same generator seed, so both see the same noise;
* **memory**: the peak memory one exact gradient adds (CUDA allocator peak; on a Linux CPU the
  resident high-water mark, reset just before the gradient), for several values of one defense
  argument (e.g. ``steps``), each in a fresh process, and the growth factor between the
  smallest and the largest value.

``python -m bench.tools.fidelity defense=diffpure`` (config ``conf/fidelity.yaml``) writes
``fidelity.json`` in its run dir and logs a summary.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import subprocess
import sys
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
from bench.data import eval_subset
from bench.devices import proc_status_mb, reset_peak_rss, resolve_device
from bench.models.parts import prepare_parts
from bench.reporting.records import write_json_atomic
from common.errors import ConfigError
from defenses.base import Defense

log = logging.getLogger(__name__)


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


def _build(
    cfg: DictConfig,
    overrides: DictConfig | dict,
    dataset: Any,
    device: torch.device,
    source: Any,
    classifier: nn.Module,
):
    node = OmegaConf.merge(cfg.defense, overrides)
    defense = instantiate(node)
    prepare_parts(
        defense, dataset, device, classifier=classifier, classifier_info=source.describe()
    )
    return defense.to(device).eval()


def _batch(cfg: DictConfig, dataset: Any, classifier: nn.Module, device: torch.device):
    x, y = dataset.test()
    idx = eval_subset(dataset.n_test, min(4 * cfg.n_samples, dataset.n_test), cfg.subset_seed)
    x, y = x[idx].to(device), y[idx].to(device)
    with torch.inference_mode():
        ok = classifier(x).argmax(1) == y
    return x[ok][: cfg.n_samples], y[ok][: cfg.n_samples]


def agreement(cfg: DictConfig) -> dict[str, Any]:
    """Cosine between the candidate's and the reference's input gradients, per image."""
    device = resolve_device(str(cfg.device))
    dataset = instantiate(cfg.dataset)
    source = instantiate(cfg.classifier)
    classifier = source.load(dataset, device)
    x, y = _batch(cfg, dataset, classifier, device)
    reference = _build(cfg, cfg.reference, dataset, device, source, classifier)
    candidate = _build(cfg, cfg.candidate, dataset, device, source, classifier)
    cos = cosine_per_image(
        input_gradient(candidate, classifier, x, y, cfg.seed),
        input_gradient(reference, classifier, x, y, cfg.seed),
    )
    return {
        "reference": OmegaConf.to_container(cfg.reference),
        "candidate": OmegaConf.to_container(cfg.candidate),
        "n": len(x),
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "cosine_per_image": cos.tolist(),
    }


def gradient_peak_mb(cfg: DictConfig) -> float:
    """Peak resident memory (MiB) that one exact gradient adds, in this process."""
    device = resolve_device(str(cfg.device))
    dataset = instantiate(cfg.dataset)
    source = instantiate(cfg.classifier)
    classifier = source.load(dataset, device)
    x, y = _batch(cfg, dataset, classifier, device)
    defense = _build(cfg, cfg.reference, dataset, device, source, classifier)
    with torch.inference_mode():  # warm up allocators and lazy state without a graph
        defense.purify(x, generator=torch.Generator(device=device).manual_seed(cfg.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        input_gradient(defense, classifier, x, y, cfg.seed)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if reset_peak_rss():
        # Linux: the high-water mark restarts here, so loading the data does not hide the peak.
        base = proc_status_mb("VmRSS")
        input_gradient(defense, classifier, x, y, cfg.seed)
        return proc_status_mb("VmHWM") - base
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    input_gradient(defense, classifier, x, y, cfg.seed)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _hydra_value(value: Any) -> str:
    """A value as a Hydra override literal (``true``, not Python's ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def memory(cfg: DictConfig, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """Peak gradient memory at each ``memory.values`` of ``defense.<memory.key>``.

    Each value is measured in a fresh process, so the high-water mark is its gradient's alone.
    """
    key, values = cfg.memory.key, list(cfg.memory["values"])
    if len(values) < 2:
        raise ConfigError(f"memory.values={values} needs at least two values to give a growth")
    peaks, runs = {}, {}
    for value in values:
        extra = [f"++reference.{key}={value}", "hydra.output_subdir=null"]
        extra += [f"hydra.run.dir={out_dir / f'peak_{key}_{value}'}"]
        extra += [f"++reference.{k}={_hydra_value(v)}" for k, v in cfg.memory.overrides.items()]
        # Resident memory is a coarse, allocator-dependent measure: take the median of repeats.
        samples = []
        for _ in range(cfg.memory.repeats):
            out = subprocess.run(
                [sys.executable, "-m", "bench.tools.fidelity", *overrides, *extra, "task=peak"],
                capture_output=True,
                text=True,
                check=True,
            )
            samples.append(float(out.stdout.strip().splitlines()[-1]))
        runs[str(value)] = samples
        peaks[str(value)] = statistics.median(samples)
    first, last = peaks[str(values[0])], peaks[str(values[-1])]
    return {
        "key": key,
        "overrides": OmegaConf.to_container(cfg.memory.overrides),
        "peak_mb": peaks,
        "peak_mb_runs": runs,
        "value_ratio": values[-1] / values[0],
        "memory_ratio": last / max(first, 1e-9),
    }


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fidelity")
def main(cfg: DictConfig) -> None:
    """Entry point of ``python -m bench.tools.fidelity``."""
    if cfg.task == "peak":  # one measurement, in its own process (see `memory`)
        sys.stdout.write(f"{gradient_peak_mb(cfg):.3f}\n")
        return
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("task=")]
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = {"agreement": agreement(cfg), "memory": memory(cfg, overrides, run_dir)}
    out = run_dir / "fidelity.json"
    write_json_atomic(out, result)
    a, m = result["agreement"], result["memory"]
    log.info(
        "gradient cosine %s vs %s on %d images: mean %.4f, min %.4f",
        a["candidate"],
        a["reference"],
        a["n"],
        a["cosine_mean"],
        a["cosine_min"],
    )
    log.info(
        "peak gradient memory by %s: %s MiB; x%.1f %s -> x%.2f memory",
        m["key"],
        json.dumps(m["peak_mb"]),
        m["value_ratio"],
        m["key"],
        m["memory_ratio"],
    )
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
