"""Every YAML under conf/ composes and instantiates, and every one is covered here."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from attacks.base import NORMS, norms_of
from bench.engine.plan import attack_partial
from bench.engine.threat import check_threat
from bench.models.training import Recipe
from defenses.base import Defense, DefenseInfo
from tests.conftest import CONF_DIR

ROOT_CONFIGS = {"eval.yaml", "train.yaml", "train_purifier.yaml", "fidelity.yaml", "perf.yaml"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_yaml_is_covered_by_a_test() -> None:
    covered_groups = {
        "dataset",
        "classifier",
        "defense",
        "threat",
        "dataset_threat",
        "suite",
        "attack",
        "recipe",
        "paths",
        "experiment",
        "purifier",
        "profile",
        "logger",
        "hydra",  # hydra/launcher/slurm.yaml: tests/test_scale.py
    }
    for path in CONF_DIR.rglob("*.yaml"):
        rel = path.relative_to(CONF_DIR)
        if len(rel.parts) == 1:
            assert rel.name in ROOT_CONFIGS, f"untested root config {rel}"
        else:
            assert rel.parts[0] in covered_groups, f"untested config group {rel.parts[0]}"


@pytest.mark.parametrize("name", sorted(ROOT_CONFIGS))
def test_root_configs_compose_with_defaults(compose_cfg, name: str) -> None:
    cfg = compose_cfg([], config_name=Path(name).stem)
    assert cfg.dataset._target_ == "bench.data.fashion_mnist"
    if "threat" in cfg:
        assert cfg.threat.norm == "Linf" and cfg.threat.eps == 0.1  # Fashion-MNIST's default
    for part in ("classifier", "purifier"):
        if part in cfg:
            OmegaConf.to_container(cfg[part], resolve=True)


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_configs(compose_cfg, fabricated_data_root: Path, name: str) -> None:
    cfg = compose_cfg([f"dataset={name}", f"paths.data_dir={fabricated_data_root}"])
    dataset = instantiate(cfg.dataset)
    x, y = dataset.test()
    assert dataset.name == name
    assert tuple(x.shape[1:]) == dataset.shape and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    # Every dataset has a standard budget for both norms.
    for threat in ("linf", "l2"):
        eps = compose_cfg([f"dataset={name}", f"threat={threat}"]).threat.eps
        assert 0 < eps <= (1 if threat == "linf" else 10)


@pytest.mark.parametrize("name", options("dataset_threat"))
def test_dataset_threat_configs_apply_to_their_pair(compose_cfg, name: str) -> None:
    dataset, norm = name.rsplit("_", 1)
    expected = OmegaConf.load(CONF_DIR / "dataset_threat" / f"{name}.yaml").eps
    cfg = compose_cfg([f"dataset={dataset}", f"threat={norm}"])
    assert cfg.threat.eps == expected
    assert cfg.threat.norm == {"linf": "Linf", "l2": "L2"}[norm]
    # A named threat carries its own eps whatever the dataset.
    assert compose_cfg([f"dataset={dataset}", "threat=linf_8"]).threat.eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("name", options("threat"))
def test_threat_configs(compose_cfg, name: str) -> None:
    cfg = compose_cfg([f"threat={name}"])
    assert cfg.threat.norm in NORMS and cfg.threat.eps > 0


@pytest.mark.parametrize("name", options("classifier"))
def test_classifier_configs_instantiate(compose_cfg, tmp_path: Path, name: str) -> None:
    cfg = compose_cfg(
        [f"classifier={name}", "+classifier.path=unused"]
        if name == "checkpoint"
        else [f"classifier={name}"]
    )
    source = instantiate(cfg.classifier)
    assert callable(source.load) and isinstance(source.describe(), dict)


@pytest.mark.parametrize("name", options("recipe"))
def test_recipe_configs(compose_cfg, name: str) -> None:
    cfg = compose_cfg([f"recipe@classifier.recipe={name}"])
    recipe = instantiate(cfg.classifier.recipe)
    assert isinstance(recipe, Recipe) and recipe.epochs >= 1
    if recipe.adversary is not None:
        attack = recipe.adversary(torch.nn.Flatten())
        assert attack.eps == cfg.threat.eps


@pytest.mark.parametrize("name", options("defense"))
def test_defense_configs(compose_cfg, name: str) -> None:
    # Instantiation only: purifying (after training the defense's parts) is the contract test's
    # job (tests/test_defense_contract.py).
    defense = instantiate(compose_cfg([f"defense={name}"]).defense)
    assert isinstance(defense, Defense) and isinstance(type(defense).info, DefenseInfo)


@pytest.mark.parametrize("name", options("profile"))
def test_profiles_set_budgets_that_experiments_and_the_command_line_still_override(
    compose_cfg, name: str
) -> None:
    profile = OmegaConf.load(CONF_DIR / "profile" / f"{name}.yaml")
    cfg = compose_cfg([f"profile={name}"])
    assert cfg.n_samples == profile.n_samples and cfg.eot_default == profile.eot_default
    assert cfg.decision.draws == profile.decision.draws
    assert compose_cfg([f"profile={name}", "n_samples=7"]).n_samples == 7


def test_experiments_override_the_run_defaults(compose_cfg) -> None:
    # An experiment's scalars win over conf/eval.yaml's (the defaults list puts _self_ first).
    cfg = compose_cfg(["experiment=nie2022_diffpure_cifar10"])
    assert cfg.batch_size == 64 and cfg.dataset._target_ == "bench.data.cifar10"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs_instantiate(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # The default, not whatever this shell exports (CI exports WANDB_MODE=disabled).
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = compose_cfg([f"logger={name}", f"paths.results_dir={tmp_path}"])
    logger = instantiate(cfg.logger)
    assert callable(logger.log_run)
    if name == "wandb":
        assert logger.mode == "offline", "the dashboard must not need an account by default"


@pytest.mark.parametrize("name", options("suite"))
def test_suite_configs(compose_cfg, name: str, tiny_model, batch) -> None:
    cfg = compose_cfg([f"suite={name}", "dataset=digits"])
    targets = [get_class(a._target_) for a in cfg.suite.attacks.values()]
    if any(cfg.threat.norm not in norms_of(t) for t in targets):  # flow attacks refuse Linf
        cfg = compose_cfg([f"suite={name}", "dataset=digits", "threat=stadv"])
    assert cfg.suite.attacks or cfg.suite.get("clean_only"), f"suite {name} has no attacks"
    for attack_cfg in cfg.suite.attacks.values():
        assert attack_cfg.eps == cfg.threat.eps and attack_cfg.norm == cfg.threat.norm
        attack_partial(attack_cfg, "attack")(model=tiny_model)


@pytest.mark.parametrize("threat", ["linf", "l2"])
@pytest.mark.parametrize("name", options("attack"))
def test_attack_configs_respect_the_threat(compose_cfg, name, threat, tiny_model, batch) -> None:
    cfg = compose_cfg(
        ["suite=pgd", f"attack@suite.attacks.pgd={name}", "dataset=digits", f"threat={threat}"]
    )
    node = cfg.suite.attacks.pgd
    # Fast settings: the contract, not the strength, is tested here.
    fast = {}
    if "steps" in node:
        fast["steps"] = 5
    if node.get("n_iter") is not None:
        fast["n_iter"] = 5
    make = functools.partial(attack_partial(node, name), **fast)
    if threat == "l2" and name == "fgsm_rs":
        with pytest.raises(ValueError, match="norm='L2'"):
            make(model=tiny_model)
        return
    if cfg.threat.norm not in norms_of(make):  # a flow attack (tests/test_stadv.py)
        with pytest.raises(ValueError, match=f"norm='{cfg.threat.norm}'"):
            make(model=tiny_model)
        return
    if node.get("version") in ("standard", "plus", "rand"):
        pytest.skip("full AutoAttack presets: test_full_autoattack_presets_respect_the_threat")
    x, y = batch
    attack = make(model=tiny_model)
    x_adv = attack(x, y)
    check_threat(x, x_adv, node.norm, node.eps, name)
    with torch.no_grad():
        assert (tiny_model(x_adv).argmax(1) == y).float().mean() <= (
            tiny_model(x).argmax(1) == y
        ).float().mean()


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs_compose(compose_cfg, name: str) -> None:
    cfg = compose_cfg([f"experiment={name}"])
    # The papers' 512 images, every attack at the threat's budget (the dataset and threat each
    # file's name says, and its paper entry: tests/test_experiments.py).
    assert cfg.n_samples == 512
    OmegaConf.to_container(cfg.suite, resolve=True)
    for node in cfg.suite.attacks.values():
        assert node.eps == cfg.threat.eps and node.norm == cfg.threat.norm
    resolved = OmegaConf.to_container(cfg.defense, resolve=True)
    if "score" in resolved:
        assert resolved["score"]["pretrained"], "paper settings use a pretrained score model"
    else:
        # Learned purifiers (CARSO, AToP, AMRM-Pure) train their parts on first use (on a GPU
        # at this scale) or load them with checkpoint=...; the config must at least build.
        assert isinstance(instantiate(cfg.defense), Defense)


@pytest.mark.parametrize("name", options("purifier"))
def test_purifier_configs_compose(compose_cfg, name: str) -> None:
    cfg = compose_cfg([f"purifier={name}"], config_name="train_purifier")
    part = instantiate(cfg.purifier)
    assert callable(part.prepare) and isinstance(part.describe(), dict)


def test_paths_default_from_environment(compose_cfg, monkeypatch) -> None:
    monkeypatch.setenv("PUREBENCH_DATA_DIR", "/somewhere/data")
    assert compose_cfg([]).paths.data_dir == "/somewhere/data"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["autoattack_standard", "autoattack_rand"])
def test_full_autoattack_presets_respect_the_threat(compose_cfg, name, tiny_model, batch) -> None:
    cfg = compose_cfg(["suite=pgd", f"attack@suite.attacks.pgd={name}", "dataset=digits"])
    node = cfg.suite.attacks.pgd
    x, y = batch
    attack = instantiate(node)(model=tiny_model)
    x_adv = attack(x, y)
    check_threat(x, x_adv, node.norm, node.eps, name)
    with torch.no_grad():
        assert (tiny_model(x_adv).argmax(1) == y).float().mean() < 1.0
