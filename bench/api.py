"""The Python API: one call evaluates a defense from a notebook, the way the CLI does.

``bench.evaluate(MyPurifier(), my_classifier, dataset="digits")`` composes ``conf/eval.yaml``
with the keyword arguments as overrides, puts the in-memory objects in place of their config
nodes (:mod:`bench.adapters`), and runs the same engine as ``python -m bench``: judging rules,
diagnostics, escalation, resume, the record under ``paths.results_dir``, and, when asked, the
leaderboard next to every other record there. :func:`attack_view` and :func:`run_attack` are
the smaller entry points: the harness's view of ``classifier(defense.purify(x))`` and one
attack on it, without judging, diagnostics or a record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bench import adapters
from bench.config import CONF_DIR
from bench.engine.attack_view import AttackView, ViewOptions
from bench.reporting.records import RunRecord
from common.errors import ConfigError
from defenses.base import Defense, DefenseInfo

log = logging.getLogger(__name__)

Data = tuple[Tensor, Tensor]


def compose_run(overrides: Sequence[str], config_name: str = "eval") -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides``, as the command line would."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def _override(key: str, value: Any) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, str | Path) and any(c in str(value) for c in " ,=[]{}()'\""):
        escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"{key}='{escaped}'"
    return f"{key}={value}"


def _overrides(
    named: Mapping[str, Any], extra: Mapping[str, Any], more: Sequence[str]
) -> list[str]:
    """Command-line overrides from the keyword arguments; ``None`` means the config's own."""
    out = [_override(k, v) for k, v in named.items() if v is not None]
    return out + [_override(k, v) for k, v in extra.items()] + list(more)


def _dataset_part(cfg: DictConfig, data: Data | None, name: str, classifier: Any) -> Any:
    """The evaluated dataset: ``data`` as tensors, else the composed config's own."""
    if data is None:
        from bench.engine.plan import instantiate_checked

        return instantiate_checked(cfg.dataset, "dataset")
    x, y = data
    if isinstance(classifier, nn.Module):
        classes = int(adapters.eval_forward(classifier, x[:1]).shape[-1])
    else:
        classes = int(y.max()) + 1
    return adapters.tensor_dataset(x, y, name=name, num_classes=classes)


def _run_dir(cfg: DictConfig, choices: Mapping[str, Any]) -> Path:
    """Where Hydra would put this run (``conf/eval.yaml``'s ``hydra.run.dir``)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    leaf = f"{choices['defense']}__{choices['classifier']}"
    return Path(str(cfg.paths.results_dir)) / "runs" / str(choices["dataset"]) / leaf / stamp


def _in_memory(
    cfg: DictConfig,
    defense: Any,
    classifier: Any,
    data: Data | None,
    info: DefenseInfo | None,
    named_dataset: bool,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The in-memory parts and the names they take in ``choices``; ``cfg`` records them."""
    parts: dict[str, Any] = {}
    names: dict[str, str] = {}
    dataset_name = str(cfg.hydra.runtime.choices.get("dataset"))
    if data is not None:
        # Tensors named by no option are their own dataset; the config records their digest.
        dataset_name = dataset_name if named_dataset else "tensors"
        names["dataset"] = dataset_name
        cfg.dataset = OmegaConf.create(
            {"_target_": f"tensors of {dataset_name}", "digest": adapters.digest_tensors(*data)}
        )
    parts["dataset"] = dataset = _dataset_part(cfg, data, dataset_name, classifier)
    if isinstance(classifier, nn.Module):
        source = adapters.ModuleClassifier(classifier)
        parts["classifier"], names["classifier"] = source, source.name
        cfg.classifier = OmegaConf.create(
            {"_target_": adapters.qualified_name(classifier), **source.fingerprint()}
        )
    if defense is not None and not isinstance(defense, str):
        probe = dataset.subset(torch.arange(min(8, dataset.n_test)))[0]
        built = adapters.as_defense(defense, probe, info=info)
        parts["defense"] = built
        target = adapters.qualified_name(built if isinstance(defense, Defense) else defense)
        cfg.defense = OmegaConf.create({"_target_": target, "digest": adapters.digest(defense)})
        if not cfg.get("name"):
            cfg.name = type(built).__name__
    return parts, names


def _check_arguments(defense: Any, data: Data | None, dataset: str | None, eps: Any) -> None:
    """What :func:`evaluate` refuses before composing anything."""
    if isinstance(defense, DictConfig):
        raise ConfigError(
            "evaluate() takes a defense object or option name; a composed config runs with "
            "bench.run.evaluate(cfg, output_dir=...)"
        )
    if data is not None and dataset is None and eps is None:
        raise ConfigError(
            "data=(x, y) needs the threat's budget: pass eps=<value>, or dataset=<name> whose "
            "standard budget applies"
        )


def evaluate(
    defense: Defense | nn.Module | Any | str | None = None,
    classifier: nn.Module | str | None = None,
    *,
    data: Data | None = None,
    dataset: str | None = None,
    threat: str | None = None,
    eps: float | None = None,
    suite: str | None = None,
    profile: str | None = None,
    name: str | None = None,
    n_samples: int | None = None,
    device: str | None = None,
    results_dir: str | Path | None = None,
    leaderboard: bool | str | Path = False,
    info: DefenseInfo | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> RunRecord:
    """Evaluate ``defense`` in front of ``classifier``: the record of one run.

    Args:
        defense: a :class:`defenses.Defense`; an ``nn.Module`` with ``purify(x)`` or any
            callable ``x -> x`` on images in [0, 1] (wrapped, its facts declared by ``info`` or
            measured); a ``conf/defense/`` option's name; ``None`` for the config's (``none``).
        classifier: an ``nn.Module`` mapping images in [0, 1] to logits, or a
            ``conf/classifier/`` option's name (``None``: ``small_cnn``, trained and cached).
        data: ``(images, labels)`` tensors to evaluate on, in place of the dataset's test split
            (``dataset`` then names them and sets the threat's budget, else give ``eps``).
        dataset: a ``conf/dataset/`` option (``digits``, ``fashion_mnist``...).
        threat: a ``conf/threat/`` option (``linf``, ``l2``...).
        eps: the threat's budget (``threat.eps``).
        suite: a ``conf/suite/`` option (``quick``, ``paper_full``...).
        profile: a ``conf/profile/`` option (``quick`` on a CPU, ``paper``).
        name: the defense's name on the leaderboard (default: its option's or class's name).
        n_samples: images of the fixed evaluation subset.
        device: ``auto``, ``cpu`` or ``cuda``.
        results_dir: where the record goes (``paths.results_dir``).
        leaderboard: ``True`` rebuilds the leaderboard of every record in ``results_dir``; a
            path writes it there instead.
        info: the wrapped purifier's facts, when they should not be measured.
        overrides: further command-line overrides (``"escalation.probe=8"``).
        **options: further top-level or dotted keys as values (``seed=1``,
            ``**{"decision.draws": 8}``).

    Raises:
        ConfigError, DataNotFoundError, CheckpointError: bad input, before any heavy compute.
    """
    from bench import run

    _check_arguments(defense, data, dataset, eps)
    named = {
        "defense": defense if isinstance(defense, str) else None,
        "classifier": classifier if isinstance(classifier, str) else None,
        "dataset": dataset,
        "threat": threat,
        "threat.eps": eps,
        "suite": suite,
        "profile": profile,
        "name": name,
        "n_samples": n_samples,
        "device": device,
        "paths.results_dir": results_dir,
    }
    cfg = compose_run(_overrides(named, options, overrides))
    choices = dict(cfg.hydra.runtime.choices)
    parts, names = _in_memory(cfg, defense, classifier, data, info, dataset is not None)
    choices.update(names)
    choices["defense"] = str(cfg.get("name") or choices.get("defense"))
    record = run.evaluate(cfg, output_dir=_run_dir(cfg, choices), choices=choices, parts=parts)
    if leaderboard:
        _write_leaderboard(Path(str(cfg.paths.results_dir)), leaderboard)
    return record


def _write_leaderboard(records: Path, where: bool | str | Path) -> None:
    from bench.reporting.leaderboard import write_leaderboard

    out = records if where is True else Path(where)
    written = write_leaderboard(records, out)
    log.info("leaderboard: %s", written.md)


def attack_view(
    defense: Defense | nn.Module | Any,
    classifier: nn.Module,
    probe: Tensor,
    *,
    info: DefenseInfo | None = None,
    seed: int = 0,
    **view: Any,
) -> AttackView:
    """The harness's view of ``classifier(defense.purify(x))`` for an attack to run on.

    Args:
        defense: as for :func:`evaluate`.
        classifier: the classifier, in eval mode.
        probe: a few images of the data, on which a wrapped purifier's facts are measured.
        info: the wrapped purifier's facts, when they should not be measured.
        seed: the view's randomness (its EOT draws).
        **view: :class:`bench.engine.attack_view.ViewOptions` (``grad="bpda"``,
            ``eot_samples=8``...).
    """
    try:
        options = ViewOptions(**view)
    except TypeError as err:
        raise ConfigError(f"attack_view options: {err}") from None
    wrapped = adapters.as_defense(defense, probe, info=info)
    return AttackView(classifier, wrapped, options, seed=seed)


def run_attack(
    view: nn.Module, x: Tensor, y: Tensor, attack: str = "pgd", *, eps: float, **options: Any
) -> Tensor:
    """Adversarial images of ``conf/attack/<attack>.yaml`` (``options`` override it) on ``view``.

    Norm ``Linf`` unless ``norm="L2"`` is among ``options``. No judging: what is broken is what
    the caller then decides (``view(x_adv).argmax(1) != y``, over fresh draws if stochastic).
    """
    from bench.engine.plan import attack_partial

    norm = options.pop("norm", "Linf")
    cfg = compose_run([f"+attack@one={attack}", f"threat.norm={norm}", f"threat.eps={eps}"])
    node = OmegaConf.merge(OmegaConf.to_container(cfg.one, resolve=True), options)
    return attack_partial(node, attack)(model=view)(x, y)
