"""Every conf/experiment/ file pins one row of a paper's table (docs/experiments.md).

Composition and the budgets every experiment shares are checked in tests/test_configs.py; here:
the file's `paper:` entry names its table and carries numbers, its name says its dataset and
threat, its suite builds at that threat, and docs/experiments.md lists it with the same numbers.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bench.engine.plan import attacks_of, check_keys, check_scalars
from defenses.base import Defense
from tests.conftest import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DATASETS = {p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")}
DOC = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"

# The only experiments without a paper number, each with its reason; every other file carries one.
NO_PAPER_NUMBER = {
    "ballarin2025_carso_cifar10": "CARSO's table values are not in the sources (abstract only)",
    "hoang2026_pursamere_cifar10": "only PurSAMERE's abstract is public: it reports no numbers",
    "nie2022_diffpure_cifar10_adaptive": "not a paper's protocol: the attacks that later cut "
    "DiffPure's number, on a classifier no re-evaluation reported",
}
# The budgets of the papers' rows: Linf 8/255, L2 1.0 for a name ending in _l2 (AMRM-Pure
# Tables 1-3, AToP's Table 6), StAdv's flow bound 0.05 for one ending in _stadv (AToP's Table 6).
LINF_EPS = 8 / 255
L2_EPS = 1.0
STADV_EPS = 0.05


@functools.cache
def composed(name: str) -> DictConfig:
    """``experiment=name`` as the command line composes it (once per file: four tests read it)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[f"experiment={name}"], return_hydra_config=True)


def doc_rows() -> dict[str, list[str]]:
    """docs/experiments.md's table rows by experiment: the cells after the name."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_exceptions_are_experiments() -> None:
    assert set(NO_PAPER_NUMBER) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_carries_its_papers_numbers(name: str) -> None:
    paper = composed(name).paper
    if name in NO_PAPER_NUMBER:
        assert paper is None, f"{name} has a paper entry: drop it from NO_PAPER_NUMBER"
        return
    assert paper is not None, f"{name}: no paper entry (or say why in NO_PAPER_NUMBER)"
    paper = OmegaConf.to_container(paper)
    assert set(paper) == {"clean", "robust", "attack", "source"}
    assert "Table" in paper["source"], f"{name}: the source names no table"
    assert paper["attack"].strip()
    for key in ("clean", "robust"):
        value = paper[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert 0 <= value <= 100, (key, value)
    assert paper["robust"] <= paper["clean"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_the_dataset_and_threat_its_name_says(name: str) -> None:
    cfg = composed(name)
    named = [part for part in name.split("_") if part in DATASETS]
    assert len(named) == 1, f"{name} names no dataset of conf/dataset/ (or several)"
    assert cfg.hydra.runtime.choices.dataset == named[0]
    if name.endswith("_l2"):
        assert cfg.threat.norm == "L2" and cfg.threat.eps == pytest.approx(L2_EPS)
    elif name.endswith("_stadv"):
        assert cfg.threat.norm == "stadv" and cfg.threat.eps == pytest.approx(STADV_EPS)
    else:
        assert cfg.threat.norm == "Linf" and cfg.threat.eps == pytest.approx(LINF_EPS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_its_attacks(name: str) -> None:
    # What a run checks before any work, so that a GPU run does not fail on a key or an attack
    # budget (a fixed step that cannot reach the threat's eps is refused here).
    cfg = copy.deepcopy(composed(name))
    check_keys(cfg)
    check_scalars(cfg)
    if "score" in cfg.defense:  # the pretrained score model is not here: the cheap untrained one
        OmegaConf.update(cfg, "defense.score.pretrained", None)
    defense = instantiate(cfg.defense)
    assert isinstance(defense, Defense)
    assert attacks_of(cfg, defense, [])
    source = instantiate(cfg.classifier)  # a checkpoint classifier loads nothing until checked
    assert callable(source.load)


def test_docs_list_every_experiment_with_its_numbers() -> None:
    rows = doc_rows()
    for name in EXPERIMENTS:
        assert name in rows, f"docs/experiments.md does not list {name}"
        _source, _attack, clean, robust, _here = rows[name]
        paper = composed(name).paper
        if paper is None:
            assert clean == robust == "—", name
        else:
            assert (float(clean), float(robust)) == (paper.clean, paper.robust), name
    # A row for a file not in conf/experiment/ waits for a component, and says so.
    for name, cells in rows.items():
        if name not in EXPERIMENTS:
            assert cells[-1].startswith("pending"), f"docs/experiments.md lists {name}"
