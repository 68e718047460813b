"""The evaluation runner: ``evaluate(cfg) -> RunRecord`` and its thin Hydra entry point.

Order of work, so bad input fails before anything heavy and leaves no record: validate the
scalars, instantiate the dataset (checks its files), the defense, the classifier source and the
attack partials, select the evaluation subset; only then load or train the classifier and run
the attacks. From that point on any failure still writes a complete record with
``status: failed`` and the error.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import Tensor
from tqdm.auto import tqdm

from attacks.base import NORMS, Attack
from bench.attack_view import AttackView
from bench.config import CONF_DIR
from bench.data import ImageDataset, eval_subset
from bench.devices import resolve_device
from bench.errors import ConfigError, PureBenchError, ThreatModelViolation
from bench.metrics import Accuracy
from bench.records import (
    PER_SAMPLE_NAME,
    AttackResult,
    RunRecord,
    git_state,
    package_versions,
    write_record,
)
from defenses.base import Defense

log = logging.getLogger(__name__)

# Slack on the eps check, as AutoAttack's own sanity line: float rounding of x + delta.
EPS_TOLERANCE = 1e-6


@dataclass
class _Plan:
    """What a run needs, instantiated and validated before any heavy compute."""

    dataset: ImageDataset
    classifier: Any  # a bench.classifiers.ClassifierSource
    defense: Defense
    attacks: dict[str, Callable[..., Attack]]
    indices: Tensor
    device: torch.device
    norm: str
    eps: float


class _Probe(torch.nn.Module):
    """Stand-in model for checking attack constructors before the real classifier exists."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :2] * self.weight


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a positive integer")
    return value


def _threat(cfg: DictConfig) -> tuple[str, float]:
    try:
        norm, eps = cfg.threat.norm, cfg.threat.eps
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"threat.eps is not set for dataset {cfg.dataset.get('_target_', '?')} and threat "
            f"norm {cfg.threat.get('norm')}: pass threat.eps=<value> or pick a named threat "
            "(e.g. threat=linf_8)"
        ) from err
    if norm not in NORMS:
        raise ConfigError(f"threat.norm={norm!r} is not allowed; allowed: {', '.join(NORMS)}")
    is_number = isinstance(eps, int | float) and not isinstance(eps, bool)
    if not is_number or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"threat.eps={eps!r} is not allowed; it must be a finite number > 0")
    if norm == "Linf" and eps > 1:
        raise ConfigError(f"threat.eps={eps} exceeds 1, the whole [0, 1] pixel range, for Linf")
    return norm, float(eps)


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        # Hydra wraps the constructor's own error; surface ours (they name the bad value).
        cause = err.__cause__
        if isinstance(cause, PureBenchError):
            raise cause from None
        raise ConfigError(f"cannot build the {what} from its config: {err}") from err


def plan(cfg: DictConfig) -> _Plan:
    """Validate ``cfg`` and instantiate every cheap part of the run (no training, no attack)."""
    norm, eps = _threat(cfg)
    n_samples = _positive_int(cfg, "n_samples")
    _positive_int(cfg, "batch_size")
    device = resolve_device(str(cfg.device))
    if not cfg.suite.get("attacks"):
        raise ConfigError("the suite has no attacks; pick one with suite=<name>")
    attacks = {}
    for name, node in cfg.suite.attacks.items():
        if node.get("norm", norm) != norm:
            raise ConfigError(
                f"attack {name!r} has norm={node.norm!r} but the threat is {norm}; attacks take "
                "their norm from the threat (norm: ${threat.norm})"
            )
        attacks[name] = _instantiate(node, f"attack {name!r}")
        try:  # constructors validate their arguments: bind to a stand-in model to run them now
            attacks[name](model=_Probe())
        except (TypeError, ValueError) as err:
            raise ConfigError(f"attack {name!r}: {err}") from err
    dataset = _instantiate(cfg.dataset, "dataset")
    defense = _instantiate(cfg.defense, "defense")
    if not isinstance(defense, Defense):
        raise ConfigError(f"defense config builds {type(defense).__name__}, not a defenses.Defense")
    classifier = _instantiate(cfg.classifier, "classifier")
    indices = eval_subset(dataset.n_test, n_samples, cfg.subset_seed)
    return _Plan(dataset, classifier, defense, attacks, indices, device, norm, eps)


def check_threat(x: Tensor, x_adv: Tensor, norm: str, eps: float, attack: str) -> float:
    """Assert the threat model on one adversarial batch and return its largest perturbation.

    Raises:
        ThreatModelViolation: NaN or inf, a pixel outside [0, 1], or a perturbation beyond eps.
    """
    if x_adv.shape != x.shape:
        raise ThreatModelViolation(
            f"{attack} returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x_adv).all():
        raise ThreatModelViolation(f"{attack} returned NaN or inf pixels")
    low, high = x_adv.min().item(), x_adv.max().item()
    if low < 0 or high > 1:
        raise ThreatModelViolation(f"{attack} left [0, 1]: pixel range [{low:.6g}, {high:.6g}]")
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)
    worst = dist.max().item() if len(dist) else 0.0
    if worst > eps + EPS_TOLERANCE:
        raise ThreatModelViolation(
            f"{attack} exceeded the threat model: {norm} perturbation {worst:.8g} > eps {eps:.8g} "
            f"(+{EPS_TOLERANCE:g}) on {(dist > eps + EPS_TOLERANCE).sum().item()} image(s)"
        )
    return worst


@torch.inference_mode()
def _predict(view: AttackView, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    preds = [
        view(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _run_attack(
    name: str,
    make: Callable[..., Attack],
    view: AttackView,
    x: Tensor,
    y: Tensor,
    *,
    plan_: _Plan,
    batch_size: int,
    seed: int,
) -> tuple[Tensor, float, list[str]]:
    """Run one attack over ``x`` in batches.

    Returns:
        Predictions on the adversarial images, the largest perturbation, the attack's warnings.
    """
    attack = make(model=view)
    # torchattacks draws random starts from torch's global generator; seed it per attack so a
    # run is reproducible and attacks do not depend on their order in the suite.
    torch.manual_seed(seed)
    preds, worst, warnings = [], 0.0, []
    for i in tqdm(range(0, len(x), batch_size), desc=name, leave=False, disable=None):
        xb = x[i : i + batch_size].to(plan_.device)
        yb = y[i : i + batch_size].to(plan_.device)
        x_adv = attack(xb, yb).detach()
        worst = max(worst, check_threat(xb, x_adv, plan_.norm, plan_.eps, name))
        with torch.inference_mode():
            preds.append(view(x_adv).argmax(1).cpu())
        warnings += [w for w in getattr(attack, "warnings", []) if w not in warnings]
    return (torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)), worst, warnings


def evaluate(
    cfg: DictConfig, *, output_dir: Path, choices: Mapping[str, str | None] | None = None
) -> RunRecord:
    """Run one evaluation and write ``record.json`` and ``per_sample.csv`` into ``output_dir``.

    Args:
        cfg: the composed config (``conf/eval.yaml``).
        output_dir: where the record goes (the Hydra run dir under ``python -m bench``).
        choices: the config-group choices (``hydra.runtime.choices``); taken from the Hydra
            config when not given.

    Returns:
        The record, ``status="completed"``.

    Raises:
        ConfigError, DataNotFoundError, CheckpointError: bad input, before any heavy compute;
            no record is written.
        Exception: anything failing later; a record with ``status="failed"`` is written first.
    """
    started, t0 = datetime.now(UTC), time.perf_counter()
    choices = dict(choices if choices is not None else _hydra_choices(cfg))
    p = plan(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {  # the run's own config; the `hydra` node (present under compose) is Hydra's
        key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        for key, node in cfg.items()
        if key != "hydra"
    }
    record = RunRecord(
        status="failed",
        choices={k: v for k, v in choices.items() if not k.startswith("hydra/")},
        config=resolved,
        dataset=p.dataset.name,
        classifier=str(choices.get("classifier")),
        defense=str(choices.get("defense")),
        threat={"norm": p.norm, "eps": p.eps, "name": choices.get("threat")},
        n_samples=len(p.indices),
        indices=p.indices.tolist(),
        seeds={"seed": int(cfg.seed), "subset_seed": int(cfg.subset_seed)},
        device=str(p.device),
        started=started.isoformat(timespec="seconds"),
        finished="",
        wall_s=0.0,
        versions=package_versions(),
        git=git_state(),
        defense_info=asdict(type(p.defense).info),
    )
    try:
        _execute(cfg, p, record, output_dir)
        record.status = "completed"
    except Exception as err:
        record.error = "".join(traceback.format_exception_only(err)).strip()
        log.error("run failed: %s", record.error)
        raise
    finally:
        record.finished = datetime.now(UTC).isoformat(timespec="seconds")
        record.wall_s = time.perf_counter() - t0
        write_record(record, output_dir)
    return record


def _execute(cfg: DictConfig, p: _Plan, record: RunRecord, output_dir: Path) -> None:
    x_test, y_test = p.dataset.test()
    x, y = x_test[p.indices], y_test[p.indices]
    classifier = p.classifier.load(p.dataset, p.device)
    record.classifier_info = p.classifier.describe()
    view = AttackView(classifier, p.defense.to(p.device)).eval()
    batch_size = int(cfg.batch_size)

    clean_pred = _predict(view, x, batch_size, p.device)
    clean_ok = clean_pred == y
    record.clean_acc = Accuracy.from_counts(int(clean_ok.sum()), len(y))
    log.info("clean accuracy %.2f%% on %d images", 100 * record.clean_acc.value, len(y))

    table = pd.DataFrame(
        {
            "index": p.indices.numpy(),
            "label": y.numpy(),
            "clean_pred": clean_pred.numpy(),
            "clean_correct": clean_ok.numpy(),
        }
    )
    robust_ok = clean_ok.clone()
    targets = clean_ok.nonzero().squeeze(1)  # attacks run on the clean-correct images only
    for k, (name, make) in enumerate(p.attacks.items()):
        t0 = time.perf_counter()
        adv_pred, worst, warnings = _run_attack(
            name,
            make,
            view,
            x[targets],
            y[targets],
            plan_=p,
            batch_size=batch_size,
            seed=int(cfg.seed) * 1000 + k,
        )
        ok = torch.zeros_like(clean_ok)
        ok[targets] = adv_pred == y[targets]
        robust_ok &= ok
        record.attacks[name] = AttackResult(
            target=str(cfg.suite.attacks[name]._target_),
            robust_acc=Accuracy.from_counts(int(ok.sum()), len(y)),
            n_attacked=len(targets),
            wall_s=time.perf_counter() - t0,
            max_perturbation=worst,
            warnings=warnings,
        )
        table[f"{name}_correct"] = ok.numpy()
        result = record.attacks[name]
        log.info(
            "%s: robust accuracy %.2f%% (%.0f s)", name, 100 * result.robust_acc.value, result.wall_s
        )
        for w in warnings:
            log.warning("%s: %s", name, w)
    table["robust"] = robust_ok.numpy()
    record.robust_acc = Accuracy.from_counts(int(robust_ok.sum()), len(y))
    table.to_csv(output_dir / PER_SAMPLE_NAME, index=False)
    record.per_sample_file = PER_SAMPLE_NAME
    log.info(
        "robust accuracy (worst case over %s): %.2f%%",
        ", ".join(p.attacks),
        100 * record.robust_acc.value,
    )


def _hydra_choices(cfg: DictConfig) -> dict[str, str | None]:
    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    if "hydra" in cfg:
        return dict(cfg.hydra.runtime.choices)
    raise ConfigError("evaluate() needs `choices` when called outside a Hydra app")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``python -m bench`` and ``purebench run``."""
    evaluate(cfg, output_dir=Path(HydraConfig.get().runtime.output_dir))
