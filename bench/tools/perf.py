"""``make perf``: how close the evaluation engine runs to the cost of its own passes (issue 7).

Adversarial evaluation of a purifier is dominated by forward and backward passes through it, so
the engine is judged against that floor and against the libraries it replaces, side by side in
one run, on the same model, the same points and the same attack budget. Compared variants run
interleaved (A B, B A, A B, ...) so that drift in the machine's load hits both; every ratio is
the median over the repetitions of the per-repetition ratio.

1. **overhead**: the harness's EOT-PGD on a stochastic defense against the *floor*: the same
   forward+backward passes of the same view (same batch sizes, as recorded during the attack,
   early exit included), timed bare at the engine's chunk size. Target <= 1.15.
2. **torchattacks**: ``torchattacks.EOTPGD`` on ``classifier(defense.purify(x))`` with the same
   eps, step size, steps, EOT samples and random start; time ratio harness / torchattacks
   (target <= 0.8) and robust accuracy of both judged on the same fresh purifications (the
   harness's must be no higher).
3. **autoattack**: :class:`attacks.autoattack.AutoAttack` against ``pyautoattack.AutoAttack``
   called directly, same version, budget and seed on the same view. Target <= 1.05.
4. **cascade**: a suite through :func:`bench.eval.evaluate` with ``suite.cascade`` true
   against false (every attack on every clean-correct point).
5. **memory**: peak memory of one exact gradient with checkpointing against DiffPure's steps
   and PurSAMERE's purification steps (:func:`bench.fidelity.memory`, fresh processes).
6. **scaling**: the harness's EOT-PGD over ``n`` images in the runner's batches, and the
   exponent of time against ``n`` fitted in log-log.

Also measured: the EOT chunk sweep behind :func:`bench.attack_view.auto_chunk` (K batches of
B images against fewer, larger calls) and, on CUDA, bf16 / channels-last / ``torch.compile``
with their accuracy impact.

``python -m bench.tools.perf`` (config ``conf/perf.yaml``) writes ``perf.md`` and ``perf.json`` in
``paths.results_dir`` and prints the table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from attacks.pgd_eot import PGDEOT
from bench.config import CONF_DIR
from bench.data import eval_subset
from bench.devices import resolve_device
from bench.engine.attack_view import AttackView, ViewOptions, auto_chunk
from bench.provenance import package_versions
from bench.reporting.records import write_json_atomic
from common.errors import ConfigError
from defenses.base import Defense
from defenses.none import NoDefense

log = logging.getLogger(__name__)

PERF_MD, PERF_JSON = "perf.md", "perf.json"


class Composed(nn.Module):
    """``classifier(defense.purify(x))`` as a library user writes it (noise from torch's RNG)."""

    def __init__(self, classifier: nn.Module, defense: Defense) -> None:
        super().__init__()
        self.classifier, self.defense = classifier, defense

    def forward(self, x: Tensor) -> Tensor:
        """Logits of one purification of ``x``."""
        return self.classifier(self.defense.purify(x))


# -- timing helpers --------------------------------------------------------------------------


CLOCKS = ("cpu", "wall")


@dataclass
class Timings:
    """Seconds per variant and repetition on both clocks; ratios use ``clock``.

    ``cpu`` is this process's CPU time (all its threads): on a shared machine it leaves out the
    time other processes hold the cores, which wall time cannot. With one torch thread it is
    the work the engine does; wall time is kept beside it.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    clock: str = "cpu"

    def of(self, name: str) -> list[float]:
        """The headline clock's seconds of ``name``, one per repetition."""
        return (self.cpu if self.clock == "cpu" else self.wall)[name]

    def median(self, name: str) -> float:
        """Median seconds of ``name`` on the headline clock."""
        return statistics.median(self.of(name))

    def ratio(self, a: str, b: str, clock: str | None = None) -> float:
        """Median over repetitions of ``a / b`` (both timed in the same repetition)."""
        clock = clock or self.clock
        src = self.cpu if clock == "cpu" else self.wall
        return paired_ratio(src[a], src[b])

    def summary(self, name: str) -> dict[str, Any]:
        """Medians and every repetition, on both clocks."""
        return {
            "median_s": self.median(name),
            "wall_median_s": statistics.median(self.wall[name]),
            "cpu_median_s": statistics.median(self.cpu[name]),
            "wall_runs_s": [round(t, 4) for t in self.wall[name]],
            "cpu_runs_s": [round(t, 4) for t in self.cpu[name]],
        }


def interleave(
    variants: Mapping[str, Callable[[], Any]], repeats: int, clock: str = "cpu"
) -> Timings:
    """Time every variant, repetitions interleaved, the order reversed every other one.

    Interleaving spreads drift in the machine's load (other processes) over all variants; the
    reversal cancels a systematic advantage of running first or second.
    """
    if clock not in CLOCKS:
        raise ConfigError(f"clock={clock!r} is not allowed; allowed: {', '.join(CLOCKS)}")
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    items = list(variants.items())
    for r in range(repeats):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return Timings(wall, cpu, clock)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repetitions of ``a[i] / b[i]`` (both timed in the same repetition)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def fit_exponent(n: list[int], seconds: list[float]) -> float:
    """Least-squares slope of ``log(seconds)`` against ``log(n)``."""
    xs, ys = [math.log(v) for v in n], [math.log(v) for v in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / den


# -- the setup every measurement shares ------------------------------------------------------


@dataclass
class Setup:
    """The model, the points and the attack budget shared by every measurement.

    Attributes:
        classifier: the bare classifier (frozen, eval mode).
        defense: the stochastic defense in front of it.
        x: images of the evaluation subset (the first ``n`` are the benchmark's points).
        y: their labels.
        device: where everything runs.
        norm: threat norm; eps: threat budget.
        steps: PGD steps; eot: EOT samples; alpha: absolute step size.
        batch_size: the runner's batch size (images per attack call).
        seed: seeds of the attacks and views.
    """

    classifier: nn.Module
    defense: Defense
    x: Tensor
    y: Tensor
    device: torch.device
    norm: str
    eps: float
    steps: int
    eot: int
    alpha: float
    batch_size: int
    seed: int

    def points(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` points on the device."""
        return self.x[:n].to(self.device), self.y[:n].to(self.device)

    def view(self, **options: Any) -> AttackView:
        """A fresh attack view of the defended classifier (EOT ``eot`` unless given)."""
        options.setdefault("eot_samples", self.eot)
        return AttackView(self.classifier, self.defense, ViewOptions(**options), seed=self.seed)

    def pgd(self, model: nn.Module, **kwargs: Any) -> PGDEOT:
        """The harness's PGD at the shared budget."""
        return PGDEOT(
            model,
            norm=self.norm,
            eps=self.eps,
            steps=self.steps,
            step_size=self.alpha,
            random_start=True,
            seed=self.seed,
            **kwargs,
        )


def build_setup(cfg: DictConfig) -> Setup:
    """Load the dataset, the classifier and the defense named by ``cfg``."""
    device = resolve_device(str(cfg.device))
    norm, eps = str(cfg.threat.norm), float(cfg.threat.eps)
    dataset = instantiate(cfg.dataset)
    classifier = instantiate(cfg.classifier).load(dataset, device)
    defense = instantiate(cfg.defense)
    if not isinstance(defense, Defense):
        raise ConfigError(f"perf defense builds {type(defense).__name__}, not a defenses.Defense")
    n = max([int(cfg.n_samples), *[int(v) for v in cfg.scaling.n]])
    x, y = dataset.test()
    idx = eval_subset(dataset.n_test, min(n, dataset.n_test), int(cfg.subset_seed))
    steps = int(cfg.attack.steps)
    alpha = float(cfg.attack.rel_stepsize) * eps
    return Setup(
        classifier=classifier,
        defense=defense.to(device).eval(),
        x=x[idx],
        y=y[idx],
        device=device,
        norm=norm,
        eps=eps,
        steps=steps,
        eot=int(cfg.attack.eot_samples),
        alpha=alpha,
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
    )


def judge_correct(setup: Setup, x: Tensor, y: Tensor, draws: int, seed: int) -> Tensor:
    """Per image, the fraction of ``draws`` fresh purifications classified correctly.

    The evaluator's own seeds, the same for every caller: two attacks' outputs are judged on
    the same noise (the runner's ``avg`` rule).
    """
    view = AttackView(setup.classifier, setup.defense, ViewOptions(eot_samples=1), seed=seed)
    correct = torch.zeros(len(x))
    with torch.inference_mode():
        for _ in range(draws):
            correct += (view(x).argmax(1) == y).float().cpu()
    return correct / draws


def judge_accuracy(setup: Setup, x: Tensor, y: Tensor, draws: int, seed: int) -> float:
    """Accuracy averaged over ``draws`` fresh purifications (:func:`judge_correct`)."""
    return judge_correct(setup, x, y, draws, seed).mean().item()


def _warm_up(setup: Setup) -> None:
    """A few passes first: thread pools, the allocator and lazy initialisation are not measured."""
    view = setup.view()
    x, y = setup.points(min(setup.batch_size, len(setup.x)))
    for _ in range(3):
        _bare_pass(view, x, y, grad=True)


def _bare_pass(view: AttackView, x: Tensor, y: Tensor, *, grad: bool) -> None:
    """One pass of the view as an attack step does it, without the attack around it."""
    if not grad:
        with torch.inference_mode():
            view.sample_logits(x)
        return
    xg = x.clone().requires_grad_(True)
    logits = view.sample_logits(xg)
    if view.options.eot_reduce == "loss":
        k = logits.shape[0]
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
        loss = loss.view(k, -1).mean(0)
    else:
        loss = F.cross_entropy(logits.mean(0), y, reduction="none")
    torch.autograd.grad(loss.sum(), xg)


def _raw_pass(setup: Setup, x: Tensor, y: Tensor, *, grad: bool, eot: int) -> None:
    """The same pass without the view: ``eot`` calls of ``classifier(defense.purify(x))``."""
    model = Composed(setup.classifier, setup.defense)
    if not grad:
        with torch.inference_mode():
            for _ in range(eot):
                model(x)
        return
    xg = x.clone().requires_grad_(True)
    logits = torch.stack([model(xg) for _ in range(eot)])
    loss = F.cross_entropy(logits.mean(0), y, reduction="sum")
    torch.autograd.grad(loss, xg)


def record_calls(view: AttackView, run: Callable[[], Any]) -> list[tuple[int, bool]]:
    """``(images, with_grad)`` of every ``sample_logits`` call made during ``run()``."""
    calls: list[tuple[int, bool]] = []
    method = view.sample_logits

    def recording(x: Tensor) -> Tensor:
        calls.append((len(x), bool(x.requires_grad and torch.is_grad_enabled())))
        return method(x)

    view.sample_logits = recording  # type: ignore[method-assign]  # the instance shadows it
    try:
        run()
    finally:
        del view.sample_logits
    return calls


# -- 0. the EOT chunk sweep ------------------------------------------------------------------


def chunk_sweep(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """Time one forward+backward of EOT-K on B images for several chunk sizes.

    ``chunk`` EOT samples share one purifier call of ``chunk * B`` stacked images; chunk 1 is
    K calls of B images, chunk K one call of K * B.
    """
    eot, batch = int(cfg.chunk.eot_samples), int(cfg.chunk.batch)
    chunks = sorted({int(c) for c in cfg.chunk.chunks if int(c) <= eot} | {1, eot})
    x, y = setup.points(batch)
    views = {c: setup.view(eot_samples=eot, chunk=c) for c in chunks}
    passes = int(cfg.chunk.passes)

    def timed(view: AttackView) -> Callable[[], None]:
        return lambda: [_bare_pass(view, x, y, grad=True) for _ in range(passes)]

    times = interleave({str(c): timed(v) for c, v in views.items()}, int(cfg.repeats), cfg.clock)
    per_pass = {c: times.median(str(c)) / passes for c in chunks}
    best = min(per_pass, key=per_pass.__getitem__)
    chosen = auto_chunk(setup.device, eot)
    return {
        "eot_samples": eot,
        "batch": batch,
        "pass_ms": {str(c): round(1000 * per_pass[c], 2) for c in chunks},
        "images_per_call": {str(c): c * batch for c in chunks},
        "runs": {str(c): times.summary(str(c)) for c in chunks},
        "best_chunk": best,
        "auto_chunk": chosen,
        "auto_vs_best": per_pass[chosen] / per_pass[best],
        "one_call_vs_k_calls": per_pass[eot] / per_pass[1],
    }


# -- 1. engine overhead ----------------------------------------------------------------------


def engine_overhead(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """The harness's EOT-PGD against the same passes of the same view, timed bare."""
    x, y = setup.points(int(cfg.n_samples))
    view = setup.view(eot_reduce=str(cfg.attack.eot_reduce))
    attack = setup.pgd(view)

    def run_attack() -> None:
        view.reseed(setup.seed)
        attack(x, y)

    view.counter.reset()
    calls = record_calls(view, run_attack)  # untimed: also the attack's warm-up
    counts = view.counter.snapshot()
    chunk = view.options.chunk or auto_chunk(setup.device, view.eot_samples)

    def floor() -> None:
        view.reseed(setup.seed)
        for n, grad in calls:
            _bare_pass(view, x[:n], y[:n], grad=grad)

    def raw_floor() -> None:
        for n, grad in calls:
            _raw_pass(setup, x[:n], y[:n], grad=grad, eot=view.eot_samples)

    variants = {"attack": run_attack, "floor": floor}
    if cfg.overhead.raw:
        variants["raw"] = raw_floor
    times = interleave(variants, int(cfg.repeats), cfg.clock)
    ratio = times.ratio("attack", "floor")
    out = {
        "n": len(x),
        "chunk": chunk,
        "eot_reduce": view.options.eot_reduce,
        "view_calls": len(calls),
        "grad_calls": sum(g for _, g in calls),
        "images_per_step": [n for n, _ in calls],
        "passes": counts,
        "attack": times.summary("attack"),
        "floor": times.summary("floor"),
        "ratio": ratio,
        "ratio_wall": times.ratio("attack", "floor", "wall"),
        "target": float(cfg.targets.overhead),
        "met": ratio <= float(cfg.targets.overhead),
    }
    if "raw" in variants:
        out["raw_floor"] = times.summary("raw")
        out["ratio_raw"] = times.ratio("attack", "raw")
    return out


# -- 2. against torchattacks' EOTPGD ---------------------------------------------------------


def versus_torchattacks(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """The harness's EOT-PGD (loss averaged over EOT, as EOTPGD) against torchattacks'.

    On the stochastic defense, every variant in ``cfg.torchattacks.variants`` (PGDEOT options:
    the success rule, early exit) runs interleaved with EOTPGD, each judged on the same fresh
    purifications. With ``cfg.torchattacks.deterministic``, the harness's default PGD also runs
    against EOTPGD on the bare classifier (EOT-1), where a fooled point stays fooled.
    """
    if setup.norm != "Linf":
        return {"skipped": f"torchattacks.EOTPGD is Linf only; the threat is {setup.norm}"}
    variants = {str(k): OmegaConf.to_container(v) for k, v in cfg.torchattacks.variants.items()}
    out = {"stochastic": _compare_torchattacks(setup, cfg, variants)}
    if cfg.torchattacks.deterministic:
        bare = dataclasses.replace(setup, defense=NoDefense().to(setup.device), eot=1)
        out["deterministic"] = _compare_torchattacks(bare, cfg, {"default": {}}, draws=1)
    out["target"] = float(cfg.targets.torchattacks)
    return out


def _compare_torchattacks(
    setup: Setup, cfg: DictConfig, variants: dict[str, Any], draws: int | None = None
) -> dict[str, Any]:
    import torchattacks

    x, y = setup.points(int(cfg.n_samples))
    library = torchattacks.EOTPGD(
        Composed(setup.classifier, setup.defense),
        eps=setup.eps,
        alpha=setup.alpha,
        steps=setup.steps,
        eot_iter=setup.eot,
        random_start=True,
    )
    outputs: dict[str, Tensor] = {}
    seen: dict[str, Tensor] = {}

    def harness(name: str, options: dict[str, Any]) -> Callable[[], None]:
        view = setup.view(eot_reduce="loss")
        attack = setup.pgd(view, **options)

        def go() -> None:
            view.reseed(setup.seed)
            outputs[name] = attack(x, y)
            seen[name] = attack.fooled_any

        return go

    def run_library() -> None:
        torch.manual_seed(setup.seed)  # torchattacks draws starts and noise from the global RNG
        outputs["torchattacks"] = library(x, y)

    runs = {name: harness(name, opts) for name, opts in variants.items()}
    times = interleave({**runs, "torchattacks": run_library}, int(cfg.repeats), cfg.clock)
    draws = int(cfg.judge_draws) if draws is None else draws
    judge_seed = setup.seed + 12345
    correct = {
        name: judge_correct(setup, adv, y, draws, judge_seed) for name, adv in outputs.items()
    }
    acc = {name: c.mean().item() for name, c in correct.items()}
    target = float(cfg.targets.torchattacks)
    rows = {}
    for name, opts in variants.items():
        ratio = times.ratio(name, "torchattacks")
        rows[name] = {
            "options": opts,
            **times.summary(name),
            "robust_acc": acc[name],
            # The runner's success_at=any: a point the attack saw fooled counts as broken.
            "robust_acc_any": (correct[name] * ~seen[name]).mean().item(),
            "ratio": ratio,
            "ratio_wall": times.ratio(name, "torchattacks", "wall"),
            "acc_gap": acc[name] - acc["torchattacks"],
            "met": ratio <= target and acc[name] <= acc["torchattacks"],
        }
    return {
        "n": len(x),
        "defense": type(setup.defense).__name__,
        "eot_samples": setup.eot,
        "harness": rows,
        "torchattacks": {**times.summary("torchattacks"), "robust_acc": acc["torchattacks"]},
        "clean_acc": judge_accuracy(setup, x, y, draws, judge_seed),
        "judge_draws": draws,
    }


# -- 3. the AutoAttack adapter against pyautoattack directly ---------------------------------


def versus_pyautoattack(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """:class:`attacks.autoattack.AutoAttack` against ``pyautoattack.AutoAttack`` itself."""
    from pyautoattack import AutoAttack as PyAutoAttack

    from attacks.autoattack import AutoAttack

    aa = cfg.autoattack
    x, y = setup.points(int(cfg.n_samples))
    view = setup.view(eot_samples=int(aa.eot_samples))
    attacks, n_iter = list(aa.attacks), int(aa.n_iter)
    adapter = AutoAttack(
        view,
        norm=setup.norm,
        eps=setup.eps,
        version="custom",
        attacks=attacks,
        n_iter=n_iter,
        seed=setup.seed,
        batch_size=setup.batch_size,
    )
    outputs: dict[str, Tensor] = {}

    def run_adapter() -> None:
        view.reseed(setup.seed)
        outputs["adapter"] = adapter(x, y)

    def run_direct() -> None:
        view.reseed(setup.seed)
        direct = PyAutoAttack(
            view,
            attacks=attacks,
            device=x.device,
            eps=setup.eps,
            norm=setup.norm,
            seed=setup.seed,
            version="custom",
        )
        direct.apgd.n_iter = direct.apgd_targeted.n_iter = direct.fab.n_iter = n_iter
        outputs["direct"], _ = direct.run_standard_evaluation(x, y, batch_size=setup.batch_size)

    times = interleave({"adapter": run_adapter, "direct": run_direct}, int(cfg.repeats), cfg.clock)
    ratio = times.ratio("adapter", "direct")
    return {
        "n": len(x),
        "attacks": attacks,
        "n_iter": n_iter,
        "eot_samples": view.eot_samples,
        "adapter": times.summary("adapter"),
        "direct": times.summary("direct"),
        "ratio_wall": times.ratio("adapter", "direct", "wall"),
        "same_output": bool(torch.equal(outputs["adapter"], outputs["direct"])),
        "ratio": ratio,
        "target": float(cfg.targets.autoattack),
        "met": ratio <= float(cfg.targets.autoattack),
    }


# -- 4. cascade savings ----------------------------------------------------------------------


def _compose(name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<name>.yaml`` inside a Hydra app (``make perf``) or outside."""
    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def _eval_cfg(
    cfg: DictConfig, results_dir: Path, cascade: bool, choices: Mapping[str, str]
) -> DictConfig:
    """The runner's config for the cascade measurement: our model, defense and suite."""
    c = cfg.cascade
    overrides = [
        f"dataset={choices['dataset']}",
        f"classifier={choices['classifier']}",
        f"threat={choices['threat']}",
        f"n_samples={int(c.n_samples)}",
        f"batch_size={int(cfg.batch_size)}",
        f"device={cfg.device}",
        f"seed={int(cfg.seed)}",
        f"subset_seed={int(cfg.subset_seed)}",
        f"decision.draws={int(c.draws)}",
        f"eot_default={int(cfg.attack.eot_samples)}",
        "diagnostics.enabled=false",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.cache_dir={cfg.paths.cache_dir}",
        f"paths.results_dir={results_dir}",
        *list(c.overrides),
    ]
    ecfg = _compose("eval", overrides)
    OmegaConf.set_struct(ecfg, False)
    ecfg.defense = OmegaConf.to_container(cfg.defense)
    suite = OmegaConf.to_container(c.suite, resolve=False)
    suite["cascade"] = cascade
    ecfg.suite = suite
    return ecfg


def cascade_savings(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str]) -> dict[str, Any]:
    """A suite's wall time through the runner with the cascade against without it."""
    from bench.run import evaluate

    record_choices = {**choices, "defense": str(cfg.cascade.defense_name)}
    records: dict[str, Any] = {}

    def run(cascade: bool) -> Callable[[], None]:
        name = "cascade" if cascade else "full"

        def go() -> None:
            ecfg = _eval_cfg(cfg, run_dir / "cascade_runs", cascade, choices)
            out = run_dir / "cascade_runs" / f"{name}_{len(records.get(name, []))}"
            records.setdefault(name, []).append(
                evaluate(ecfg, output_dir=out, choices=record_choices)
            )

        return go

    times = interleave(
        {"cascade": run(True), "full": run(False)}, int(cfg.cascade.repeats), cfg.clock
    )
    ratio = times.ratio("cascade", "full")

    def describe(rec: Any) -> dict[str, Any]:
        return {
            "wall_s": rec.wall_s,
            "attacks_s": sum(a.wall_s for a in rec.attacks.values()),
            "robust_acc": rec.robust_acc.value,
            "clean_acc": rec.clean_acc.value,
            "per_attack": {
                k: {
                    "n_attacked": a.n_attacked,
                    "wall_s": a.wall_s,
                    "robust_acc": a.robust_acc.value,
                }
                for k, a in rec.attacks.items()
            },
        }

    cas, full = records["cascade"][-1], records["full"][-1]
    return {
        "n": cas.n_samples,
        "attacks": list(cas.attacks),
        "draws": int(cfg.cascade.draws),
        "cascade": {**times.summary("cascade"), **describe(cas)},
        "full": {**times.summary("full"), **describe(full)},
        "ratio_wall": times.ratio("cascade", "full", "wall"),
        "ratio": ratio,
        "saving": 1 - ratio,
    }


# -- 5. gradient memory with checkpointing ---------------------------------------------------


def gradient_memory(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str]) -> dict[str, Any]:
    """Peak exact-gradient memory against steps (:func:`bench.fidelity.memory`), per defense."""
    from bench.tools.fidelity import memory

    out: dict[str, Any] = {}
    for name, node in cfg.memory.defenses.items():
        key, values = str(node.key), [int(v) for v in node["values"]]
        overrides = [
            f"dataset={choices['dataset']}",
            f"classifier={choices['classifier']}",
            f"defense={node.defense}",
            f"n_samples={int(cfg.memory.n_samples)}",
            f"device={cfg.device}",
            f"paths.data_dir={cfg.paths.data_dir}",
            f"paths.cache_dir={cfg.paths.cache_dir}",
            f"memory.key={key}",
            f"memory.values=[{','.join(str(v) for v in values)}]",
            f"memory.repeats={int(cfg.memory.repeats)}",
            *list(node.get("overrides", [])),
        ]
        fcfg = _compose("fidelity", overrides)
        t0 = time.perf_counter()
        env = os.environ.copy()
        if cfg.threads is not None:  # the fresh processes use as many threads as this one
            os.environ["OMP_NUM_THREADS"] = str(int(cfg.threads))
        try:
            result = memory(fcfg, overrides, run_dir / "memory" / str(name))
        finally:
            os.environ.clear()
            os.environ.update(env)
        peaks = [result["peak_mb"][str(v)] for v in values]
        exponent = fit_exponent(values, peaks) if all(p > 0 for p in peaks) else float("nan")
        out[str(name)] = {**result, "exponent": exponent, "wall_s": time.perf_counter() - t0}
    return out


# -- 6. scaling ------------------------------------------------------------------------------


def scaling(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """The harness's EOT-PGD on n images in the runner's batches; the log-log exponent.

    ``scaling.batch_sizes``: the first is the headline (the runner's default), the others show
    how the images per call change the exponent on this device.
    """
    sizes = [int(b) for b in cfg.scaling.batch_sizes]
    result = _scaling_at(setup, cfg, sizes[0])
    result["other_batch_sizes"] = {str(b): _scaling_at(setup, cfg, b) for b in sizes[1:]}
    result["target"] = float(cfg.targets.scaling)
    result["met"] = result["exponent"] <= result["target"]
    return result


def _scaling_at(setup: Setup, cfg: DictConfig, batch: int) -> dict[str, Any]:
    ns = [int(v) for v in cfg.scaling.n]
    view = setup.view(eot_reduce=str(cfg.attack.eot_reduce))
    attack = setup.pgd(view)

    def run(n: int) -> Callable[[], None]:
        x, y = setup.points(n)

        def go() -> None:
            view.reseed(setup.seed)
            for i in range(0, n, batch):
                attack(x[i : i + batch], y[i : i + batch])

        return go

    times = interleave({str(n): run(n) for n in ns}, int(cfg.scaling.repeats), cfg.clock)
    medians = [times.median(str(n)) for n in ns]
    # One exponent per repetition: the spread says how far the fit is from noise.
    per_rep = [
        fit_exponent(ns, list(reps)) for reps in zip(*(times.of(str(n)) for n in ns), strict=True)
    ]
    return {
        "n": ns,
        "batch_size": batch,
        "median_s": medians,
        "runs": {str(n): times.summary(str(n)) for n in ns},
        "exponent": fit_exponent(ns, medians),
        "exponent_per_repetition": per_rep,
        "exponent_wall": fit_exponent(ns, [statistics.median(times.wall[str(n)]) for n in ns]),
    }


# -- CUDA-only options -----------------------------------------------------------------------


def cuda_options(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """bf16 autocast, channels-last and ``torch.compile`` of the view: time and accuracy."""
    if setup.device.type != "cuda":
        return {"skipped": f"device is {setup.device.type}: these are CUDA options"}
    x, y = setup.points(int(cfg.n_samples))
    variants = {"fp32": {}, **{k: dict(v) for k, v in cfg.cuda.variants.items()}}
    views = {name: setup.view(eot_reduce="logits", **opts) for name, opts in variants.items()}
    attacks = {name: setup.pgd(v) for name, v in views.items()}
    outputs: dict[str, Tensor] = {}

    def run(name: str) -> Callable[[], None]:
        def go() -> None:
            views[name].reseed(setup.seed)
            outputs[name] = attacks[name](x, y)
            torch.cuda.synchronize(setup.device)

        return go

    for name in variants:  # compile and autotune outside the timing
        run(name)()
    times = interleave({name: run(name) for name in variants}, int(cfg.repeats), "wall")
    draws, judge_seed = int(cfg.judge_draws), setup.seed + 12345
    out = {}
    for name in variants:
        with torch.inference_mode():
            clean = (views[name](x).argmax(1) == y).float().mean().item()
        out[name] = {
            **times.summary(name),
            "speedup": times.ratio("fp32", name),
            "clean_acc_own_view": clean,
            "robust_acc": judge_accuracy(setup, outputs[name], y, draws, judge_seed),
        }
    return out


# -- the run, the table ----------------------------------------------------------------------


def run_perf(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str]) -> dict[str, Any]:
    """Every measurement ``cfg.items`` names, in one process; the result as plain data."""
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.perf_counter()
    setup = build_setup(cfg)
    _warm_up(setup)
    x, y = setup.points(int(cfg.n_samples))
    with torch.inference_mode():
        clean_bare = (setup.classifier(x).argmax(1) == y).float().mean().item()
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "device": str(setup.device),
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(setup.device)
            if setup.device.type == "cuda"
            else None,
        },
        "versions": package_versions(),
        "setup": {
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
        },
    }
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "chunk": lambda: chunk_sweep(setup, cfg),
        "overhead": lambda: engine_overhead(setup, cfg),
        "torchattacks": lambda: versus_torchattacks(setup, cfg),
        "autoattack": lambda: versus_pyautoattack(setup, cfg),
        "cascade": lambda: cascade_savings(cfg, run_dir, choices),
        "memory": lambda: gradient_memory(cfg, run_dir, choices),
        "scaling": lambda: scaling(setup, cfg),
        "cuda": lambda: cuda_options(setup, cfg),
    }
    unknown = sorted(set(cfg["items"]) - set(steps))
    if unknown:
        raise ConfigError(f"perf items {unknown} are unknown; allowed: {', '.join(steps)}")
    for name in cfg["items"]:
        t = time.perf_counter()
        log.info("perf: %s ...", name)
        result[name] = steps[name]()
        result[name]["item_wall_s"] = time.perf_counter() - t
        log.info("perf: %s done in %.1f s", name, result[name]["item_wall_s"])
    result["machine"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - t0
    return result


_CLOCK_NOTE = {
    "cpu": "this process's CPU time, blind to other processes holding the cores",
    "wall": "elapsed time",
}


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _met(flag: bool | None) -> str:
    return "" if flag is None else ("yes" if flag else "**no**")


def markdown(result: Mapping[str, Any]) -> str:
    """The table of ``perf.md``: one row per measurement, then the setup."""
    s = result["setup"]
    m = result["machine"]
    rows: list[tuple[str, str, str, str, str]] = []
    if "chunk" in result:
        c = result["chunk"]
        ms = ", ".join(f"{k}: {v:.0f} ms" for k, v in c["pass_ms"].items())
        rows.append(
            (
                "0. EOT chunk (one fwd+bwd pass)",
                f"one call / K calls {_fmt(c['one_call_vs_k_calls'])}",
                "",
                "",
                f"EOT-{c['eot_samples']} on {c['batch']} images, chunk {ms}; auto_chunk="
                f"{c['auto_chunk']} is {_fmt(c['auto_vs_best'])}x the best ({c['best_chunk']})",
            )
        )
    if "overhead" in result:
        o = result["overhead"]
        raw = (
            f"; vs raw classifier(purify(x)) loop {_fmt(o['ratio_raw'])}"
            if "ratio_raw" in o
            else ""
        )
        rows.append(
            (
                "1. Engine overhead (attack / floor)",
                _fmt(o["ratio"]),
                f"<= {o['target']}",
                _met(o["met"]),
                f"{_fmt(o['attack']['median_s'])} s vs {_fmt(o['floor']['median_s'])} s; "
                f"{o['view_calls']} view calls ({o['grad_calls']} with grad), chunk {o['chunk']}"
                f"{raw}; wall-clock ratio {_fmt(o['ratio_wall'])}",
            )
        )
    if "torchattacks" in result and "skipped" not in result["torchattacks"]:
        for kind in ("stochastic", "deterministic"):
            t = result["torchattacks"].get(kind)
            if t is None:
                continue
            ta = t["torchattacks"]
            for name, h in t["harness"].items():
                opts = ", ".join(f"{k}={v}" for k, v in h["options"].items()) or "defaults"
                rows.append(
                    (
                        f"2. vs torchattacks EOTPGD: {t['defense']} EOT-{t['eot_samples']}, "
                        f"harness {name} ({opts})",
                        _fmt(h["ratio"]),
                        f"<= {result['torchattacks']['target']}, acc no higher",
                        _met(h["met"]),
                        f"{_fmt(h['median_s'])} s vs {_fmt(ta['median_s'])} s; robust acc "
                        f"{100 * h['robust_acc']:.1f}% vs {100 * ta['robust_acc']:.1f}% (clean "
                        f"{100 * t['clean_acc']:.1f}%, {t['judge_draws']} fresh draw(s) per image; "
                        f"{100 * h['robust_acc_any']:.1f}% with success_at=any); wall-clock ratio "
                        f"{_fmt(h['ratio_wall'])}",
                    )
                )
    if "autoattack" in result:
        a = result["autoattack"]
        rows.append(
            (
                "3. AutoAttack adapter / pyautoattack",
                _fmt(a["ratio"], 3),
                f"<= {a['target']}",
                _met(a["met"]),
                f"{_fmt(a['adapter']['median_s'])} s vs {_fmt(a['direct']['median_s'])} s; "
                f"{'+'.join(a['attacks'])}, {a['n_iter']} iter, EOT-{a['eot_samples']} view; "
                f"identical output: {a['same_output']}; "
                f"wall-clock ratio {_fmt(a['ratio_wall'], 3)}",
            )
        )
    if "cascade" in result:
        c = result["cascade"]
        per = ", ".join(
            f"{k} {c['cascade']['per_attack'][k]['n_attacked']}/{v['n_attacked']} pts"
            for k, v in c["full"]["per_attack"].items()
        )
        rows.append(
            (
                "4. Cascade (suite time / every attack on every point)",
                _fmt(c["ratio"]),
                "",
                "",
                f"{_fmt(c['cascade']['median_s'])} s vs {_fmt(c['full']['median_s'])} s "
                f"(saving {100 * c['saving']:.0f}%); attacked {per}; robust acc "
                f"{100 * c['cascade']['robust_acc']:.1f}% vs {100 * c['full']['robust_acc']:.1f}%; "
                f"wall-clock ratio {_fmt(c['ratio_wall'])}",
            )
        )
    for name, mem in result.get("memory", {}).items():
        if not isinstance(mem, dict) or "peak_mb" not in mem:
            continue
        peaks = ", ".join(f"{k}: {v:.0f}" for k, v in mem["peak_mb"].items())
        rows.append(
            (
                f"5. Gradient memory, {name} (checkpointed)",
                f"x{_fmt(mem['memory_ratio'])} for x{_fmt(mem['value_ratio'], 0)} {mem['key']}",
                "",
                "",
                f"peak MiB by {mem['key']}: {peaks}; log-log exponent {_fmt(mem['exponent'])}",
            )
        )
    if "scaling" in result:
        sc = result["scaling"]
        times = ", ".join(f"{n}: {t:.1f} s" for n, t in zip(sc["n"], sc["median_s"], strict=True))
        rows.append(
            (
                "6. Scaling exponent (time vs n)",
                _fmt(sc["exponent"]),
                f"<= {sc['target']}",
                _met(sc["met"]),
                f"{times} (batches of {sc['batch_size']}); per repetition "
                f"{', '.join(_fmt(e) for e in sc['exponent_per_repetition'])}; wall clock "
                f"{_fmt(sc['exponent_wall'])}",
            )
        )
        for size, other in sc.get("other_batch_sizes", {}).items():
            times = ", ".join(
                f"{n}: {t:.1f} s" for n, t in zip(other["n"], other["median_s"], strict=True)
            )
            rows.append(
                (
                    f"6. Scaling exponent, batches of {size}",
                    _fmt(other["exponent"]),
                    "",
                    "",
                    f"{times}; per repetition "
                    f"{', '.join(_fmt(e) for e in other['exponent_per_repetition'])}",
                )
            )
    cuda = result.get("cuda", {})
    if cuda and "skipped" not in cuda:
        for name, v in cuda.items():
            if name in ("fp32", "item_wall_s"):
                continue
            rows.append(
                (
                    f"CUDA {name}",
                    f"speedup {_fmt(v['speedup'])}",
                    "",
                    "",
                    f"robust acc {100 * v['robust_acc']:.1f}% vs fp32 "
                    f"{100 * cuda['fp32']['robust_acc']:.1f}%",
                )
            )
    lines = [
        "| Measurement | Value | Target | Met | Details |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
        f"Setup: {s['dataset']}, {s['classifier']}, defense {s['defense']}, {s['norm']} eps "
        f"{s['eps']:g}, PGD-{s['steps']} (step {s['step_size']:.4g}) with EOT-{s['eot_samples']} "
        f"on {s['n_samples']} images (clean acc of the bare classifier "
        f"{100 * s['clean_acc_bare']:.1f}%); times are medians over {s['repeats']} interleaved "
        f"repetitions on the {s['clock']} clock ({_CLOCK_NOTE[s['clock']]}), ratios medians "
        "of per-repetition ratios.",
        f"Machine: {m['device']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, "
        f"1-min load average {_fmt(m['load_avg_start'][0])} at start and "
        f"{_fmt(m['load_avg_end'][0])} at the end"
        + (f", {m['cuda']}" if m.get("cuda") else "")
        + f". Wall time {result['wall_s']:.0f} s.",
    ]
    if cuda.get("skipped"):
        lines.append(f"CUDA options (bf16, channels-last, torch.compile): {cuda['skipped']}.")
    notes = _notes(result)
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _notes(result: Mapping[str, Any]) -> list[str]:
    """Why a target is missed, from the numbers of this run."""
    notes = []
    ta = result.get("torchattacks", {})
    sto, det = ta.get("stochastic"), ta.get("deterministic")
    if sto and not any(h["met"] for h in sto["harness"].values()):
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
        notes.append(text + ".")
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="perf")
def main(cfg: DictConfig) -> None:
    """Entry point of ``python -m bench.tools.perf``: measure, write, print the table."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    runtime = HydraConfig.get().runtime.choices
    choices = {k: str(runtime.get(k)) for k in ("dataset", "classifier", "threat")}
    result = run_perf(cfg, run_dir, choices)
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    md, js = write_results(result, Path(cfg.paths.results_dir))
    write_json_atomic(run_dir / PERF_JSON, result)
    log.info("wrote %s and %s (%.0f s)", md, js, result["wall_s"])
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
