"""Architectures, checked checkpoint loading and classifier sources (CPU, no network)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from bench.models import robustbench
from bench.models.architectures import Normalize, ResNet18, SmallCNN, WideResNet
from bench.models.checkpoints import load_state_dict_checked
from bench.models.classifiers import CheckpointClassifier, ClassifierSource
from bench.models.robustbench import RobustBenchClassifier
from common.errors import CheckpointError, ConfigError

CLASSIFIER_CONF = Path(__file__).resolve().parent.parent / "conf" / "classifier"
CPU = torch.device("cpu")
# The smallest single-file cifar10/Linf model in RobustBench's zoo (WRN-28-4, 5.8 M parameters)
# that robustbench loads with strict loading.
ROBUSTBENCH_MODEL = "Ding2020MMA"


@dataclass
class StandInDataset:
    """The three fields of bench.data.ImageDataset that classifier sources read."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]


CIFAR10 = StandInDataset("cifar10", 10, (3, 32, 32))

# Records every call of `_record`; a checkpoint whose unpickling would call it must leave it empty.
UNPICKLED_SIDE_EFFECTS: list[str] = []


def _record(message: str) -> str:
    UNPICKLED_SIDE_EFFECTS.append(message)
    return message


class PickledPayload:
    """An arbitrary object: unpickling it calls `_record` (stand-in for running arbitrary code)."""

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return _record, ("unpickled",)


def _save(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": functools.partial(ResNet18, width=8),
    "wide_resnet": functools.partial(WideResNet, depth=10, widen_factor=1),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("image_size", [8, 28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_architecture_forward_and_input_gradient(
    arch: str, image_size: int, in_channels: int
) -> None:
    model = ARCHITECTURES[arch](in_channels=in_channels, num_classes=7, image_size=image_size)
    model.eval()
    x = torch.rand(2, in_channels, image_size, image_size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    assert x.grad is not None
    assert x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_small_cnn_parameter_count_at_28x28() -> None:
    model = SmallCNN(in_channels=1, num_classes=10, image_size=28)
    # conv 1->32 (320) + conv 32->64 (18,496) + linear 3136->128 (401,536) + linear 128->10 (1,290)
    assert sum(p.numel() for p in model.parameters()) == 421_642


@pytest.mark.parametrize("depth", [4, 8, 27, 29])
def test_wide_resnet_rejects_depth_not_6n_plus_4(depth: int) -> None:
    with pytest.raises(ConfigError, match=f"depth={depth}"):
        WideResNet(in_channels=3, num_classes=10, image_size=32, depth=depth, widen_factor=1)


@pytest.mark.parametrize(
    ("factory", "bad"),
    [
        (functools.partial(SmallCNN, 1, 10, 3), "image_size=3"),
        (functools.partial(SmallCNN, 0, 10, 28), "in_channels=0"),
        (functools.partial(ResNet18, 3, 10, 32, width=0), "width=0"),
        (functools.partial(WideResNet, 3, 10, 32, depth=10, dropout=1.0), "dropout=1.0"),
    ],
)
def test_architectures_reject_bad_arguments(factory: Callable[[], nn.Module], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        factory()


def test_normalize_standardises_per_channel() -> None:
    norm = Normalize(mean=[0.5, 0.0], std=[0.25, 2.0])
    x = torch.ones(1, 2, 2, 2)
    out = norm(x)
    assert torch.allclose(out[:, 0], torch.full((1, 2, 2), 2.0))
    assert torch.allclose(out[:, 1], torch.full((1, 2, 2), 0.5))
    assert list(norm.state_dict()) == []  # the statistics come from the config, not checkpoints


# --------------------------------------------------------------------------------------------------
# load_state_dict_checked
# --------------------------------------------------------------------------------------------------


def _small_cnn() -> nn.Module:
    return SmallCNN(in_channels=1, num_classes=10, image_size=8)


@pytest.fixture
def trained() -> nn.Module:
    return _seeded(_small_cnn, seed=0)


def test_round_trip_gives_identical_outputs(trained: nn.Module, tmp_path: Path) -> None:
    path = _save(trained.state_dict(), tmp_path / "ckpt.pt")
    fresh = _seeded(_small_cnn, seed=1)
    x = torch.rand(4, 1, 8, 8)
    assert not torch.equal(_outputs(fresh, x), _outputs(trained, x))
    assert load_state_dict_checked(fresh, path) is fresh
    assert torch.equal(_outputs(fresh, x), _outputs(trained, x))


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize(
    ("wrap", "key"),
    [
        (lambda sd: _prefixed(sd, "module."), None),
        (lambda sd: {"state_dict": sd, "epoch": 3}, None),
        (lambda sd: {"model": _prefixed(sd, "module."), "optimizer": {"lr": 0.1}}, None),
        (lambda sd: {"ema": sd, "net": {}, "epoch": 3}, "ema"),
    ],
    ids=["module-prefix", "state_dict-wrapper", "model-wrapper-and-prefix", "explicit-key"],
)
def test_wrappers_and_prefix_are_handled(
    trained: nn.Module,
    tmp_path: Path,
    wrap: Callable[[dict[str, torch.Tensor]], object],
    key: str | None,
) -> None:
    path = _save(wrap(dict(trained.state_dict())), tmp_path / "ckpt.pt")
    fresh = load_state_dict_checked(_seeded(_small_cnn, seed=1), path, key=key)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(_outputs(fresh, x), _outputs(trained, x))


def test_ambiguous_wrapper_is_refused(trained: nn.Module, tmp_path: Path) -> None:
    sd = trained.state_dict()
    path = _save({"state_dict": sd, "model": sd, "epoch": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="set key="):
        load_state_dict_checked(_small_cnn(), path)


def test_missing_wrapper_key_is_refused(trained: nn.Module, tmp_path: Path) -> None:
    path = _save({"state_dict": trained.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="no entry 'ema'"):
        load_state_dict_checked(_small_cnn(), path, key="ema")


def test_missing_key_is_named(trained: nn.Module, tmp_path: Path) -> None:
    sd = dict(trained.state_dict())
    del sd["classifier.3.bias"]
    path = _save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1;.*classifier\.3\.bias"):
        load_state_dict_checked(_small_cnn(), path)


def test_unexpected_key_is_named(trained: nn.Module, tmp_path: Path) -> None:
    sd = dict(trained.state_dict())
    sd["extra.weight"] = torch.zeros(3)
    path = _save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1;.*extra\.weight"):
        load_state_dict_checked(_small_cnn(), path)


def test_shape_mismatch_is_named_with_both_shapes(trained: nn.Module, tmp_path: Path) -> None:
    sd = dict(trained.state_dict())
    sd["classifier.3.weight"] = torch.zeros(5, 128)
    path = _save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(
        CheckpointError, match=r"classifier\.3\.weight: checkpoint \(5, 128\) vs model \(10, 128\)"
    ):
        load_state_dict_checked(_small_cnn(), path)


def test_all_problems_in_one_error_with_truncation(trained: nn.Module, tmp_path: Path) -> None:
    sd = dict(trained.state_dict())
    del sd["features.0.bias"]
    sd["classifier.3.bias"] = torch.zeros(4)
    sd.update({f"extra{i}.weight": torch.zeros(1) for i in range(25)})
    path = _save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(_small_cnn(), path)
    message = str(info.value)
    assert str(path) in message
    assert "features.0.bias" in message
    assert "unexpected keys (25;" in message
    assert "... and 15 more" in message
    assert "classifier.3.bias: checkpoint (4) vs model (10)" in message


def test_other_prefix_gets_a_hint_and_loads_when_stripped(
    trained: nn.Module, tmp_path: Path
) -> None:
    path = _save(_prefixed(dict(trained.state_dict()), "net."), tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="try strip_prefix='net.'"):
        load_state_dict_checked(_small_cnn(), path)
    fresh = load_state_dict_checked(_seeded(_small_cnn, seed=1), path, strip_prefix="net.")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(_outputs(fresh, x), _outputs(trained, x))


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_state_dict_checked(_small_cnn(), path)
    assert str(path) in str(info.value)


def test_pickled_objects_are_refused_without_unpickling(tmp_path: Path) -> None:
    path = _save({"w": PickledPayload()}, tmp_path / "evil.pt")
    UNPICKLED_SIDE_EFFECTS.clear()
    with pytest.raises(CheckpointError, match="contains pickled Python objects") as info:
        load_state_dict_checked(_small_cnn(), path)
    assert str(path) in str(info.value)
    assert "_record" in str(info.value)  # names the offending object
    assert UNPICKLED_SIDE_EFFECTS == []


@pytest.mark.parametrize(
    ("content", "match"),
    [(torch.zeros(3), "holds a Tensor, not a state_dict"), (b"garbage", "not a readable")],
    ids=["tensor", "garbage"],
)
def test_files_without_state_dict_are_refused(
    tmp_path: Path, content: torch.Tensor | bytes, match: str
) -> None:
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load_state_dict_checked(_small_cnn(), path)


# --------------------------------------------------------------------------------------------------
# CheckpointClassifier
# --------------------------------------------------------------------------------------------------


def _resnet8() -> nn.Module:
    return ResNet18(in_channels=3, num_classes=10, image_size=32, width=8)


def _assert_ready_for_evaluation(model: nn.Module) -> None:
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_checkpoint_classifier_loads_ready_model(tmp_path: Path) -> None:
    ref = _seeded(_resnet8, seed=0)
    path = _save(_prefixed(dict(ref.state_dict()), "module."), tmp_path / "r18.pt")
    source = CheckpointClassifier(arch=functools.partial(ResNet18, width=8), path=str(path))
    assert isinstance(source, ClassifierSource)
    model = source.load(CIFAR10, CPU)
    _assert_ready_for_evaluation(model)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(_outputs(model, x), _outputs(ref, x))
    facts = source.describe()
    json.dumps(facts)
    assert facts["kind"] == "checkpoint"
    assert facts["arch"] == "bench.models.architectures.ResNet18"
    assert facts["arch_kwargs"] == {"width": 8}
    assert facts["path"] == str(path)
    assert facts["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_classifier_applies_normalisation(tmp_path: Path) -> None:
    ref = _seeded(_resnet8, seed=0)
    path = _save(ref.state_dict(), tmp_path / "r18.pt")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    source = CheckpointClassifier(
        arch=functools.partial(ResNet18, width=8), path=str(path), mean=mean, std=std
    )
    model = source.load(CIFAR10, CPU)
    _assert_ready_for_evaluation(model)
    x = torch.rand(3, 3, 32, 32)
    standardised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(_outputs(model, x), _outputs(ref, standardised))
    assert not torch.allclose(_outputs(model, x), _outputs(ref, x))


def test_checkpoint_classifier_rejects_half_normalisation() -> None:
    with pytest.raises(ConfigError, match="give both"):
        CheckpointClassifier(arch=SmallCNN, path="x.pt", mean=[0.5])


def test_checkpoint_classifier_rejects_mean_for_wrong_channel_count(tmp_path: Path) -> None:
    path = _save(_seeded(_resnet8, seed=0).state_dict(), tmp_path / "r18.pt")
    source = CheckpointClassifier(
        arch=functools.partial(ResNet18, width=8), path=str(path), mean=[0.5], std=[0.5]
    )
    with pytest.raises(ConfigError, match="3 channels"):
        source.load(CIFAR10, CPU)


def test_checkpoint_yaml_instantiates_and_loads(tmp_path: Path) -> None:
    ref = _seeded(_resnet8, seed=0)
    path = _save(ref.state_dict(), tmp_path / "r18.pt")
    cfg = OmegaConf.load(CLASSIFIER_CONF / "checkpoint.yaml")
    cfg.path = str(path)
    cfg.arch.width = 8
    cfg.mean = [0.0, 0.0, 0.0]
    cfg.std = [1.0, 1.0, 1.0]
    source = instantiate(cfg)
    assert isinstance(source, CheckpointClassifier)
    model = source.load(CIFAR10, CPU)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(_outputs(model, x), _outputs(ref, x))
    json.dumps(source.describe())  # ListConfig mean/std were converted to plain lists


# --------------------------------------------------------------------------------------------------
# RobustBenchClassifier
# --------------------------------------------------------------------------------------------------


def test_robustbench_yaml_instantiates_without_importing_robustbench(tmp_path: Path) -> None:
    cfg = OmegaConf.create(
        {
            "paths": {"cache_dir": str(tmp_path)},
            "classifier": OmegaConf.load(CLASSIFIER_CONF / "robustbench.yaml"),
        }
    )
    source = instantiate(cfg.classifier)
    assert isinstance(source, RobustBenchClassifier)
    facts = source.describe()
    json.dumps(facts)
    assert facts["kind"] == "robustbench"
    assert facts["model_dir"] == f"{tmp_path}/robustbench"
    assert facts["path"] == f"{tmp_path}/robustbench/cifar10/Linf/Standard.pt"


def test_importing_the_module_imports_neither_robustbench_nor_autoattack() -> None:
    code = (
        "import sys, bench.models.classifiers; "
        "assert 'robustbench' not in sys.modules and 'autoattack' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_robustbench_rejects_non_harness_dataset() -> None:
    with pytest.raises(ConfigError, match="dataset='imagenet'"):
        RobustBenchClassifier("Standard", "imagenet", "Linf", "models")


@pytest.mark.parametrize("evaluated", ["cifar100", "digits"])
def test_robustbench_rejects_dataset_mismatch(evaluated: str, tmp_path: Path) -> None:
    source = RobustBenchClassifier("Standard", "cifar10", "Linf", str(tmp_path))
    with pytest.raises(ConfigError, match=f"'cifar10' does not match .*'{evaluated}'"):
        source.load(StandInDataset(evaluated, 10, (3, 32, 32)), CPU)


def test_robustbench_refuses_forced_unsafe_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    source = RobustBenchClassifier("Standard", "cifar10", "Linf", str(tmp_path))
    with pytest.raises(ConfigError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1'"):
        source.load(CIFAR10, CPU)


@pytest.fixture(scope="module")
def zoo() -> SimpleNamespace:
    """RobustBench's model zoo, imported through the harness (which shims `autoattack`)."""
    # Skip only when the optional extra is absent; a broken install must fail, not skip, so the
    # import itself goes through the harness rather than pytest.importorskip.
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("the robustbench extra is not installed")
    return robustbench._import_robustbench()


def _zoo_checkpoint(zoo: SimpleNamespace, tmp_path: Path) -> tuple[nn.Module, Path]:
    """Save a zoo architecture's (random) weights where RobustBench's loader looks for them."""
    entry = zoo.model_dicts[zoo.BenchmarkDataset.cifar_10][zoo.ThreatModel.Linf][ROBUSTBENCH_MODEL]
    ref = _seeded(entry["model"], seed=0)
    path = _save(ref.state_dict(), tmp_path / "cifar10" / "Linf" / f"{ROBUSTBENCH_MODEL}.pt")
    return ref, path


def test_robustbench_loads_model_from_model_dir(zoo: SimpleNamespace, tmp_path: Path) -> None:
    ref, path = _zoo_checkpoint(zoo, tmp_path)
    source = RobustBenchClassifier(ROBUSTBENCH_MODEL, "cifar10", "Linf", str(tmp_path))
    model = source.load(CIFAR10, CPU)
    _assert_ready_for_evaluation(model)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(_outputs(model, x), _outputs(ref, x))
    facts = source.describe()
    assert facts["path"] == str(path)
    assert facts["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_autoattack_shim_reexports_pyautoattack(zoo: SimpleNamespace) -> None:
    import pyautoattack
    import pyautoattack.state

    shim = sys.modules["autoattack"]
    if shim.__spec__ is not None:
        pytest.skip("the GitHub autoattack package is installed; no shim was needed")
    assert shim.AutoAttack is pyautoattack.AutoAttack
    assert sys.modules["autoattack.state"].EvaluationState is pyautoattack.state.EvaluationState


def test_robustbench_missing_checkpoint_names_path(zoo: SimpleNamespace, tmp_path: Path) -> None:
    source = RobustBenchClassifier(ROBUSTBENCH_MODEL, "cifar10", "Linf", str(tmp_path))
    with pytest.raises(CheckpointError, match="classifier.download=true") as info:
        source.load(CIFAR10, CPU)
    assert str(tmp_path / "cifar10" / "Linf" / f"{ROBUSTBENCH_MODEL}.pt") in str(info.value)
    assert not (tmp_path / "cifar10").exists()  # nothing was created or downloaded


@pytest.mark.parametrize(
    ("name", "threat", "match"),
    [
        ("NoSuchModel2099", "Linf", "name='NoSuchModel2099' is not in"),
        ("Standrd", "Linf", "did you mean Standard"),
        ("Standard", "Linf2", "threat_model='Linf2' is invalid"),
    ],
)
def test_robustbench_unknown_name_or_threat(
    zoo: SimpleNamespace, tmp_path: Path, name: str, threat: str, match: str
) -> None:
    source = RobustBenchClassifier(name, "cifar10", threat, str(tmp_path))
    with pytest.raises(ConfigError, match=match):
        source.load(CIFAR10, CPU)


def test_robustbench_refuses_pickled_checkpoint(
    zoo: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    path = _save({"w": PickledPayload()}, tmp_path / "cifar10" / "Linf" / f"{ROBUSTBENCH_MODEL}.pt")
    UNPICKLED_SIDE_EFFECTS.clear()
    source = RobustBenchClassifier(ROBUSTBENCH_MODEL, "cifar10", "Linf", str(tmp_path))
    with pytest.raises(CheckpointError, match="contains pickled Python objects") as info:
        source.load(CIFAR10, CPU)
    assert str(path) in str(info.value)
    assert UNPICKLED_SIDE_EFFECTS == []


def test_robustbench_wraps_loader_errors(zoo: SimpleNamespace, tmp_path: Path) -> None:
    path = _save(_small_cnn().state_dict(), tmp_path / "cifar10" / "Linf" / "Ding2020MMA.pt")
    source = RobustBenchClassifier(ROBUSTBENCH_MODEL, "cifar10", "Linf", str(tmp_path))
    with pytest.raises(CheckpointError, match="RobustBench could not load") as info:
        source.load(CIFAR10, CPU)
    assert str(path) in str(info.value)


def test_wide_resnet_loads_robustbench_wrn_weights(zoo: SimpleNamespace, tmp_path: Path) -> None:
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet as ZooWideResNet

    ref = _seeded(functools.partial(ZooWideResNet, depth=10, widen_factor=2), seed=0)
    path = _save(ref.state_dict(), tmp_path / "wrn.pt")
    ours = WideResNet(in_channels=3, num_classes=10, image_size=32, depth=10, widen_factor=2)
    load_state_dict_checked(ours, path).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(_outputs(ours, x), _outputs(ref, x))


def test_resnet18_loads_robustbench_resnet18_weights(zoo: SimpleNamespace, tmp_path: Path) -> None:
    from robustbench.model_zoo.architectures.resnet import ResNet18 as ZooResNet18

    ref = _seeded(ZooResNet18, seed=0)
    path = _save(ref.state_dict(), tmp_path / "r18.pt")
    ours = load_state_dict_checked(ResNet18(in_channels=3, num_classes=10, image_size=32), path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(_outputs(ours.eval(), x), _outputs(ref, x))
