"""RobustBench's model zoo (https://robustbench.github.io) as a classifier source.

robustbench 1.1.1 cannot be imported beside PyPI's pyautoattack (it imports the GitHub name
``autoattack``), so this module installs a small shim first; it loads checkpoints from
RobustBench's own directory layout and downloads only when asked.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import pickle
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.models.checkpoints import listing, sha256_files, unpickling_error
from bench.models.classifiers import prepare_for_evaluation
from common.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from bench.data import ImageDataset

logger = logging.getLogger(__name__)

# RobustBench dataset but not a harness one.
_ROBUSTBENCH_DATASETS = ("cifar10", "cifar100")
# The spellings torch.serialization treats as "set" for its TORCH_FORCE_* variables.
_TORCH_TRUE_VALUES = ("1", "y", "yes", "true")


def _refuse_unsafe_torch_load() -> None:
    """Refuse to run RobustBench's loader when torch would unpickle arbitrary objects.

    robustbench calls ``torch.load`` without ``weights_only``; torch >= 2.6 then defaults to
    ``weights_only=True`` unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which flips the default
    for every such call.
    """
    value = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if value is not None and value.lower() in _TORCH_TRUE_VALUES:
        raise ConfigError(
            f"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD={value!r} is set: RobustBench's loader would then "
            "unpickle checkpoints as arbitrary objects, which can run code. Unset it (allowed: "
            "unset, or a false value such as 0) to load RobustBench models"
        )


def _install_autoattack_shim() -> None:
    """Make ``import autoattack`` work with only PyPI's ``pyautoattack`` installed.

    robustbench 1.1.1 imports ``robustbench.eval`` from its ``__init__``, and that module does
    ``from autoattack import AutoAttack`` and ``from autoattack.state import EvaluationState``
    (the GitHub package's name), so ``import robustbench`` fails beside pyautoattack. This
    registers two small modules in ``sys.modules`` that re-export pyautoattack's classes. It does
    nothing when an ``autoattack`` module is already importable (the GitHub package, or the shim).
    The harness only uses ``robustbench.utils.load_model``; ``robustbench.eval.benchmark`` would
    still fail, because it passes GitHub-only keywords (``bs=``, ``log_path=``).

    Raises:
        ConfigError: If neither autoattack nor pyautoattack is installed.
    """
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    try:
        import pyautoattack
        from pyautoattack.state import EvaluationState
    except ImportError as e:
        raise ConfigError(
            "robustbench needs AutoAttack, but neither `autoattack` nor `pyautoattack` can be "
            f"imported ({e}); reinstall the harness: pip install -e .[robustbench]"
        ) from e
    package = types.ModuleType(
        "autoattack", "PureBench shim: pyautoattack under the GitHub module name `autoattack`."
    )
    package.__path__ = []  # a package, so that `autoattack.state` resolves as its submodule
    package.AutoAttack = pyautoattack.AutoAttack  # type: ignore[attr-defined]
    state = types.ModuleType("autoattack.state", "PureBench shim for pyautoattack.state.")
    state.EvaluationState = EvaluationState  # type: ignore[attr-defined]
    package.state = state  # type: ignore[attr-defined]
    sys.modules["autoattack"] = package
    sys.modules["autoattack.state"] = state
    logger.info("registered an `autoattack` shim over pyautoattack so that robustbench imports")


def _import_robustbench() -> types.SimpleNamespace:
    """Import the parts of robustbench the harness uses, after installing the autoattack shim.

    Returns:
        A namespace with ``load_model``, ``model_dicts``, ``BenchmarkDataset`` and
        ``ThreatModel``.

    Raises:
        ConfigError: If robustbench is not installed or cannot be imported.
    """
    _install_autoattack_shim()
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import load_model
    except ModuleNotFoundError as e:
        if e.name == "robustbench":
            raise ConfigError(
                "classifier=robustbench needs the optional robustbench extra: "
                "pip install -e .[robustbench]"
            ) from e
        raise ConfigError(
            f"robustbench is installed but cannot be imported: {e} (robustbench 1.1.1 also "
            "needs pkg_resources, i.e. setuptools<81; pip install -e .[robustbench] pins it)"
        ) from e
    except ImportError as e:
        raise ConfigError(f"robustbench is installed but cannot be imported: {e}") from e
    return types.SimpleNamespace(
        load_model=load_model,
        model_dicts=model_dicts,
        BenchmarkDataset=BenchmarkDataset,
        ThreatModel=ThreatModel,
    )


def _timm_knows(model_name: str) -> bool:
    """Whether timm (a robustbench dependency) registers ``model_name``."""
    import timm  # deferred like robustbench itself: only RobustBench sources need it

    return bool(timm.is_model(model_name))


class RobustBenchClassifier:
    """A model from RobustBench's model zoo (https://robustbench.github.io), for online users.

    Checkpoints are read from where RobustBench's ``load_model`` looks for them,
    ``model_dir / dataset / threat_model / f"{name}.pt"``; they are downloaded from RobustBench's
    Google Drive only with ``download=True``. RobustBench models take [0, 1] inputs themselves,
    so no normalisation is added.

    Args:
        name: Model name in the zoo, e.g. ``"Standard"`` or ``"Ding2020MMA"``.
        dataset: RobustBench dataset, ``"cifar10"`` or ``"cifar100"``; must equal the evaluated
            dataset's name.
        threat_model: ``"Linf"``, ``"L2"`` or ``"corruptions"``.
        model_dir: RobustBench's model directory (``${paths.cache_dir}/robustbench`` by default).
        download: Fetch a missing checkpoint (needs internet).

    Raises:
        ConfigError: If ``dataset`` is not a RobustBench dataset that the harness also has.
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        threat_model: str,
        model_dir: str,
        download: bool = False,
    ) -> None:
        if dataset not in _ROBUSTBENCH_DATASETS:
            raise ConfigError(
                f"dataset={dataset!r} is invalid for a RobustBench classifier: allowed are "
                f"{', '.join(_ROBUSTBENCH_DATASETS)} (RobustBench's imagenet is not a harness "
                "dataset)"
            )
        self.name = name
        self.dataset = dataset
        self.threat_model = threat_model
        self.model_dir = str(model_dir)
        self.download = bool(download)
        self._sha256: str | None = None

    @property
    def checkpoint_path(self) -> Path:
        """Where RobustBench's ``load_model`` reads (or downloads) this model's checkpoint."""
        # RobustBench keeps 3D corruption models in the `corruptions` folder.
        threat = self.threat_model.replace("_3d", "")
        return Path(self.model_dir) / self.dataset / threat / f"{self.name}.pt"

    def check(self, dataset: ImageDataset) -> None:
        """The dataset matches; nothing else can be checked without importing robustbench."""
        if dataset.name != self.dataset:
            raise ConfigError(
                f"classifier.dataset={self.dataset!r} does not match the evaluated dataset "
                f"{dataset.name!r}: a RobustBench model must be evaluated on the dataset it was "
                f"trained on (RobustBench datasets in the harness: "
                f"{', '.join(_ROBUSTBENCH_DATASETS)})"
            )

    def fingerprint(self) -> dict[str, Any] | None:
        """The checkpoint's digest when the file is there (a download happens later)."""
        path = self.checkpoint_path
        return {"sha256": sha256_files([path])} if path.is_file() else None

    def load(self, dataset: ImageDataset, device: torch.device) -> nn.Module:
        """Load the zoo model from ``model_dir`` (downloading it only if allowed) and prepare it.

        Args:
            dataset: The evaluated dataset; its name must be this source's ``dataset``.
            device: Where the model must live.

        Returns:
            The RobustBench model on ``device``, in eval mode, with frozen parameters.

        Raises:
            ConfigError: If the datasets differ, the name or threat model is not in the zoo,
                robustbench is not installed, or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set.
            CheckpointError: If the checkpoint is missing and ``download`` is False, or
                RobustBench fails to load it (a pickled-object checkpoint is refused).
        """
        self.check(dataset)
        _refuse_unsafe_torch_load()
        rb = _import_robustbench()
        threat, entries = self._zoo_entries(rb)
        # robustbench.utils.load_model serves models that timm knows from the Hugging Face Hub
        # and ignores model_dir for them; say so instead of reporting a missing file.
        timm_name = f"{self.name.lower().replace('-', '_')}_{self.dataset}_{threat.value.lower()}"
        if not self.download and _timm_knows(timm_name):
            raise CheckpointError(
                f"RobustBench serves {self.name} through timm ({timm_name}) from the Hugging Face "
                f"Hub, not from {self.checkpoint_path}; set classifier.download=true (needs "
                "internet) to fetch it"
            )
        # The same paths as robustbench.utils.load_model; ensembles keep one file per member.
        path = self.checkpoint_path
        gdrive_id = entries[self.name]["gdrive_id"]
        files = (
            [Path(f"{path}_m{i}.pt") for i in range(len(gdrive_id))]
            if isinstance(gdrive_id, list)
            else [path]
        )
        missing = [f for f in files if not f.is_file()]
        if missing and not self.download:
            raise CheckpointError(
                f"RobustBench checkpoint {missing[0]} does not exist"
                + (f" (nor {len(missing) - 1} more ensemble members)" if len(missing) > 1 else "")
                + f": RobustBench's loader looks for {self.name} there. Set "
                "classifier.download=true (needs internet) to fetch it from RobustBench's Google "
                "Drive, or put the file there"
            )
        if missing:
            logger.info("downloading RobustBench model %s to %s", self.name, path.parent)
        try:
            model = rb.load_model(
                model_name=self.name,
                model_dir=self.model_dir,
                dataset=self.dataset,
                threat_model=self.threat_model,
            )
        except pickle.UnpicklingError as e:
            raise unpickling_error(path, e) from e
        except Exception as e:  # robustbench raises bare RuntimeError/KeyError/ValueError
            raise CheckpointError(
                f"RobustBench could not load {self.name} from {path}: {type(e).__name__}: {e}"
            ) from e
        self._sha256 = sha256_files(files)
        logger.info("loaded RobustBench model %s from %s", self.name, path)
        return prepare_for_evaluation(model, device, f"RobustBench classifier {self.name}")

    def _zoo_entries(self, rb: types.SimpleNamespace) -> tuple[Any, Mapping[str, Any]]:
        """This source's threat model and the zoo's entries for it; refuses unknown names."""
        threats = [t.value for t in rb.ThreatModel]
        if self.threat_model not in threats:
            raise ConfigError(
                f"threat_model={self.threat_model!r} is invalid: allowed are {', '.join(threats)}"
            )
        # RobustBench keeps 3D corruption models in the `corruptions` folder and zoo entry.
        threat = rb.ThreatModel(self.threat_model.replace("_3d", ""))
        zoo = rb.model_dicts[rb.BenchmarkDataset(self.dataset)]
        if threat not in zoo:
            raise ConfigError(
                f"threat_model={self.threat_model!r}: RobustBench has no {self.dataset} models "
                f"for it; allowed are {', '.join(t.value for t in zoo)}"
            )
        entries = zoo[threat]
        if self.name not in entries:
            names = sorted(entries)
            close = difflib.get_close_matches(self.name, names, n=3)
            raise ConfigError(
                f"name={self.name!r} is not in RobustBench's {self.dataset}/{threat.value} zoo"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" It has {len(names)} models, e.g. {listing(names, limit=6)}"
            )
        return threat, entries

    def describe(self) -> dict[str, Any]:
        """Return the source's facts; ``sha256`` of the checkpoint is filled in by `load`."""
        return {
            "kind": "robustbench",
            "name": self.name,
            "dataset": self.dataset,
            "threat_model": self.threat_model,
            "model_dir": self.model_dir,
            "path": str(self.checkpoint_path),
            "sha256": self._sha256,
            "download": self.download,
        }
