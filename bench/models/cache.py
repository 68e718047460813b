"""The one cache of everything the harness trains: classifiers, the score model, purifier parts.

An entry is identified by everything that determines its weights (a *spec*: architecture,
dataset, recipe, seed, and for parts trained against a classifier that classifier's identity).
Its canonical JSON is hashed into a key; the entry is the directory
``<cache_dir>/<name>-<key>/`` holding the weights, ``spec.json`` and ``metrics.json``.

One key function (:func:`cache_key`), one lock per entry (``filelock``, so parallel jobs of a
sweep train a network once, on every platform), one atomic save (a temporary directory renamed
into place, removed on every failure path) and one loader (:func:`fetch`), which sets a
corrupt entry aside with a warning and rebuilds it instead of failing every later run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from bench.models.checkpoints import check_finite, load_state_dict_checked, sha256_files
from bench.provenance import package_versions
from common.errors import CheckpointError

log = logging.getLogger(__name__)

# Bump when a change to the code changes the weights a spec produces, or when specs name
# callables that moved (keys hash their module paths). 2: the models/ layout of issue 14.
FORMAT = 2
SPEC_NAME = "spec.json"
METRICS_NAME = "metrics.json"
WEIGHTS_NAME = "weights.pt"
# Sub-directories of a cache dir that are not entries.
LOCKS, CORRUPT = ".locks", ".corrupt"

T = TypeVar("T")

# Field metadata of a spec dataclass: the field is left out of the key while it holds its
# default, so a field added later (defaulting to the old behaviour) keeps every cached entry.
OMIT_IF_DEFAULT = "omit_if_default"


def canonical(obj: Any) -> Any:
    """JSON-able canonical form of a spec (partials, dataclasses, configs, primitives).

    Equal specs give equal keys whichever way they were built (from YAML through Hydra or in
    Python).
    """
    if isinstance(obj, DictConfig | ListConfig):
        return canonical(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, functools.partial):
        if obj.args:
            raise TypeError(f"cannot fingerprint a partial with positional arguments: {obj!r}")
        return {"_target_": _qualname(obj.func), **canonical(dict(obj.keywords))}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            f.name: canonical(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get(OMIT_IF_DEFAULT) and getattr(obj, f.name) == f.default)
        }
        return {"_target_": _qualname(type(obj)), **fields}
    if isinstance(obj, dict):
        return {str(k): canonical(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if callable(obj) and hasattr(obj, "__qualname__"):
        return _qualname(obj)
    raise TypeError(f"cannot fingerprint {type(obj).__name__} value {obj!r}")


def _qualname(fn: Any) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def cache_key(spec: dict[str, Any]) -> str:
    """Short SHA-256 of a canonical spec (the cache format is part of it)."""
    blob = json.dumps(canonical({"format": FORMAT, **spec}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """One cache entry: ``<root>/<name>-<key>/``.

    Attributes:
        root: the cache directory (``${paths.cache_dir}/classifiers``, ``.../purifiers``).
        name: what it holds, for people (``fashion_mnist-SmallCNN``).
        spec: everything that determines the weights (canonical JSON).
    """

    root: Path
    name: str
    spec: dict[str, Any]

    @property
    def key(self) -> str:
        """The hash of the spec."""
        return cache_key(self.spec)

    @property
    def path(self) -> Path:
        """The entry's directory."""
        return self.root / f"{self.name}-{self.key}"

    def exists(self) -> bool:
        """Whether a complete entry is in place (the spec is written last, by the rename)."""
        return (self.path / SPEC_NAME).is_file()

    def lock(self) -> FileLock:
        """The entry's inter-process lock (held while one job trains it)."""
        (self.root / LOCKS).mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / LOCKS / f"{self.key}.lock"))

    def metrics(self) -> dict[str, Any]:
        """The training metrics stored with the weights."""
        with open(self.path / METRICS_NAME) as fh:
            return json.load(fh)

    def digest(self) -> str:
        """SHA-256 of the entry's weight files (everything but the spec and the metrics)."""
        files = sorted(
            p
            for p in self.path.rglob("*")
            if p.is_file() and p.name not in (SPEC_NAME, METRICS_NAME)
        )
        return sha256_files(files)

    def save(self, write: Callable[[Path], None], metrics: dict[str, Any]) -> None:
        """Write the weights (``write(tmp_dir)``), spec and metrics, then rename into place.

        A crash (or a full disk) at any point leaves either no entry or the complete one, and
        no temporary directory behind.
        """
        tmp = self.root / f".tmp-{self.path.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            _write_json(tmp / METRICS_NAME, {**metrics, "versions": package_versions()})
            _write_json(tmp / SPEC_NAME, canonical({"format": FORMAT, **self.spec}))
            shutil.rmtree(self.path, ignore_errors=True)  # a partial entry from an older crash
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def set_aside(self, why: BaseException) -> Path:
        """Move a corrupt entry to ``<root>/.corrupt/`` (kept for inspection) and warn."""
        target = self.root / CORRUPT / f"{self.path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)
        log.warning(
            "cache entry %s is unreadable (%s): moved to %s; building it again",
            self.path,
            why,
            target,
        )
        return target

    def clean_stale(self) -> None:
        """Remove temporary directories a killed process left for this entry (lock held)."""
        for stale in self.root.glob(f".tmp-{self.path.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def fetch(
    entry: Entry,
    *,
    build: Callable[[], T],
    train: Callable[[T], dict[str, Any]],
    save: Callable[[T, Path], None],
    load: Callable[[Path], T],
    what: str,
) -> tuple[T, dict[str, Any]]:
    """The cached object of ``entry``, or a newly built and trained one, cached on the way.

    Args:
        entry: the cache entry.
        build: makes the untrained object (seeds its own initialisation).
        train: trains it in place and returns its metrics.
        save: writes its weights into a directory.
        load: reads them back from the entry's directory (raising on a corrupt entry).
        what: its name in log lines.

    Returns:
        The object and its training metrics. A corrupt entry (unreadable weights or metrics)
        is set aside and rebuilt.
    """
    with entry.lock():
        entry.clean_stale()
        if entry.exists():
            try:
                obj, metrics = load(entry.path), entry.metrics()
                log.info("using cached %s %s", what, entry.path)
                return obj, metrics
            except (CheckpointError, OSError, ValueError, KeyError, RuntimeError) as err:
                entry.set_aside(err)
        log.info("no cached %s %s: training it", what, entry.path.name)
        obj = build()
        metrics = train(obj)
        entry.save(lambda tmp: save(obj, tmp), metrics)
        return obj, entry.metrics()


def save_state_dict(net: nn.Module, directory: Path) -> None:
    """The default weight writer: the state dict on CPU as ``weights.pt``."""
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, directory / WEIGHTS_NAME)


def load_state_dict(net: nn.Module, directory: Path, what: str) -> nn.Module:
    """The default weight reader: ``weights.pt`` into ``net``, checked key by key and finite."""
    load_state_dict_checked(net, directory / WEIGHTS_NAME)
    check_finite(net, what)
    return net
