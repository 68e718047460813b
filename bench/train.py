"""``purebench train``: train (or find in the cache) one classifier or one purifier part.

``purebench train classifier=small_cnn_at`` composes ``conf/train.yaml``;
``purebench train purifier=score dataset=fashion_mnist`` composes ``conf/train_purifier.yaml``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from bench.config import CONF_DIR
from bench.devices import resolve_device, set_threads

log = logging.getLogger(__name__)


def train_classifier(cfg: DictConfig) -> dict[str, Any]:
    """Train (or find cached) the classifier of a ``conf/train.yaml`` config; return its facts."""
    set_threads(cfg.get("threads"))
    dataset = instantiate(cfg.dataset)
    source = instantiate(cfg.classifier)
    source.check(dataset)
    model = source.load(dataset, resolve_device(str(cfg.device)))
    info = source.describe()
    log.info("%s ready: %s", type(model).__name__, json.dumps(info, indent=2, default=str))
    return info


def train_part(cfg: DictConfig) -> dict[str, Any]:
    """Train (or find cached) the purifier part of a ``conf/train_purifier.yaml`` config."""
    set_threads(cfg.get("threads"))
    dataset = instantiate(cfg.dataset)
    part = instantiate(cfg.purifier)
    part.prepare(dataset, resolve_device(str(cfg.device)))
    info = part.describe()
    log.info("%s ready: %s", type(part).__name__, json.dumps(info, indent=2, default=str))
    return info


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def classifier_main(cfg: DictConfig) -> None:
    """Hydra entry point of ``purebench train classifier=...``."""
    _reporting(train_classifier, cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_purifier")
def part_main(cfg: DictConfig) -> None:
    """Hydra entry point of ``purebench train purifier=...``."""
    _reporting(train_part, cfg)


def _reporting(task: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Run ``task``; a user's error leaves as :class:`bench.cli.ReportedError`.

    Raised as is, Hydra would print a line of its own before the CLI's one-line error.
    """
    from bench.cli import reported

    try:
        task(cfg)
    except Exception as err:
        report = reported(err)
        if report is not None:
            raise report from err
        raise
