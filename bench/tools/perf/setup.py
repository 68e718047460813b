"""What every ``make perf`` measurement shares, and the time it takes to prepare it.

Preparing (loading the data, loading a classifier or a score model from the cache, or training
one that is not there) can take longer than every measurement together on a fresh clone, so it
is done before the first measurement, announced in the log before it starts, timed per network
(:class:`Preparation`) and reported on its own; no measurement's time includes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from attacks.pgd_eot import PGDEOT
from bench.config import CONF_DIR
from bench.data import ImageDataset, eval_subset
from bench.devices import resolve_device
from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.decision import Judge
from bench.models.cache import Entry
from bench.models.classifiers import TrainedClassifier
from bench.models.parts import TrainedPart, prepare_parts
from bench.models.score import TrainedScoreNet
from bench.models.training import classifier_entry
from common import seeds
from common.errors import ConfigError
from defenses.base import Defense

log = logging.getLogger(__name__)

CACHED, NOT_CACHED = "cached: loading it", "not cached: training it"


@dataclass
class Prepared:
    """One dataset or network made ready before the measurements, and how long it took."""

    what: str
    status: str
    setup_s: float


@dataclass
class Preparation:
    """The preparation steps of one ``make perf`` run, in order."""

    steps: list[Prepared] = field(default_factory=list)

    @contextmanager
    def step(self, what: str, status: str) -> Iterator[None]:
        """Announce preparing ``what`` (``status`` says whether it trains), then time it."""
        log.info("perf: preparing %s (%s)", what, status)
        t0 = time.perf_counter()
        yield
        self.steps.append(Prepared(what, status, time.perf_counter() - t0))
        log.info("perf: %s ready in %.1f s", what, self.steps[-1].setup_s)

    @property
    def setup_s(self) -> float:
        """Seconds of every step together."""
        return sum(s.setup_s for s in self.steps)

    def to_list(self) -> list[dict[str, Any]]:
        """The steps as plain data (``perf.json``'s ``prepared``)."""
        return [asdict(s) for s in self.steps]


def classifier_status(source: Any, dataset: ImageDataset) -> str:
    """Whether loading ``source`` for ``dataset`` finds it cached or trains it."""
    if isinstance(source, TrainedClassifier):
        entry = classifier_entry(source.arch, source.recipe, source.seed, dataset, source.cache_dir)
        return CACHED if entry.exists() else NOT_CACHED
    return "from its checkpoint: loading it"


def _part_status(part: nn.Module, dataset: ImageDataset, classifier_info: Any) -> str | None:
    """How one learned part will be prepared; ``None`` for a module that is not one."""
    if isinstance(part, TrainedPart):
        if part.checkpoint is not None:
            return f"from {part.checkpoint}: loading it"
        name = f"{dataset.name}-{part.name}"
        entry = Entry(part.cache_dir, name, part.spec(dataset, classifier_info))
    elif isinstance(part, TrainedScoreNet):
        if part.pretrained is not None:
            return f"from {part.pretrained}: loading it"
        entry = part.entry(dataset)
    else:
        return None
    return CACHED if entry.exists() else NOT_CACHED


def parts_status(defense: nn.Module, dataset: ImageDataset, classifier_info: Any) -> str | None:
    """Whether preparing the defense's learned parts trains one; ``None`` if it has none."""
    found, sources = [], []
    for name, part in defense.named_modules():
        # A part's own earlier stages (``init``) are trained only if the part is not cached.
        if part is defense or any(name.startswith(f"{s}.") for s in sources):
            continue
        if isinstance(part, TrainedPart):
            sources.append(name)
        if (status := _part_status(part, dataset, classifier_info)) is not None:
            found.append(status)
    if not found:
        return None
    return NOT_CACHED if NOT_CACHED in found else found[0]


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<name>.yaml`` inside a Hydra app (``make perf``) or outside."""
    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def runner_overrides(
    cfg: DictConfig, results_dir: Path, choices: Mapping[str, str], *, n_samples: int, draws: int
) -> list[str]:
    """Overrides of ``conf/eval.yaml`` for a perf item that runs the runner itself.

    The perf run's dataset, threat, batch size, device, seeds and paths; ``n_samples`` images
    judged on ``draws`` purifications; no diagnostics (they are not what an item measures).
    """
    return [
        f"dataset={choices['dataset']}",
        f"threat={choices['threat']}",
        f"n_samples={n_samples}",
        f"decision.draws={draws}",
        f"batch_size={int(cfg.batch_size)}",
        f"device={cfg.device}",
        f"seed={int(cfg.seed)}",
        f"subset_seed={int(cfg.subset_seed)}",
        "diagnostics.enabled=false",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.cache_dir={cfg.paths.cache_dir}",
        f"paths.results_dir={results_dir}",
    ]


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
        seed: seeds of the attacks and views; the judge's seed derives from it.
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

    def judged(self, x: Tensor, y: Tensor, draws: int) -> Tensor:
        """Per image, the fraction of ``draws`` fresh purifications classified correctly.

        The engine's :class:`~bench.engine.decision.Judge` on a view seeded with the
        evaluator's seed (:func:`common.seeds.perf_judge`), the same for every caller: two
        attacks' outputs are judged on the same noise (the runner's ``avg`` rule).
        """
        view = AttackView(
            self.classifier,
            self.defense,
            ViewOptions(eot_samples=1),
            seed=seeds.perf_judge(self.seed),
        )
        preds = Judge(view, draws=draws, batch_size=self.batch_size).predictions(x, self.device)
        return (preds == y.cpu()).float().mean(0)


def build_setup(cfg: DictConfig, prep: Preparation, choices: Mapping[str, str]) -> Setup:
    """Load the dataset, the classifier and the defense's parts, each a timed preparation step."""
    device = resolve_device(str(cfg.device))
    with prep.step(f"dataset {choices['dataset']}", "loading it"):
        dataset = instantiate(cfg.dataset)
        x, y = dataset.test()
    source = instantiate(cfg.classifier)
    what = f"classifier {choices['classifier']} on {dataset.name}"
    with prep.step(what, classifier_status(source, dataset)):
        classifier = source.load(dataset, device)
    defense = instantiate(cfg.defense)
    if not isinstance(defense, Defense):
        raise ConfigError(f"perf defense builds {type(defense).__name__}, not a defenses.Defense")
    status = parts_status(defense, dataset, source.describe())
    if status is not None:
        with prep.step(f"the parts of {type(defense).__name__}", status):
            prepare_parts(
                defense, dataset, device, classifier=classifier, classifier_info=source.describe()
            )
    n = max([int(cfg.n_samples), *[int(v) for v in cfg.scaling.n]])
    idx = eval_subset(dataset.n_test, min(n, dataset.n_test), int(cfg.subset_seed))
    eps = float(cfg.threat.eps)
    return Setup(
        classifier=classifier,
        defense=defense.to(device).eval(),
        x=x[idx],
        y=y[idx],
        device=device,
        norm=str(cfg.threat.norm),
        eps=eps,
        steps=int(cfg.attack.steps),
        eot=int(cfg.attack.eot_samples),
        # Relative to eps and to the steps (a fixed fraction stops short when steps shrink).
        alpha=float(cfg.attack.rel_stepsize or 2.5 / int(cfg.attack.steps)) * eps,
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
    )
