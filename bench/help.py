"""The help page of ``python -m bench --help`` and ``purebench run --help``.

Built from ``conf/`` each time it is shown, so an option added as ``conf/<group>/<name>.yaml`` is
listed with the first sentence of its leading comment, without editing this module.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

WIDTH = 100

# The groups a person picks on the command line, in the order a run is composed, with what each
# one is. The options of each are read from conf/<group>/ at run time.
GROUPS: dict[str, str] = {
    "defense": "the purification defense in front of the classifier",
    "classifier": "the protected classifier (trained and cached on first use)",
    "dataset": "the images (a fixed subset of the test split)",
    "threat": "the threat model: norm and eps",
    "suite": "the attacks run against the defense",
    "profile": "a set of budgets (quick for CPUs, paper for GPUs)",
    "logger": "where metrics go besides record.json",
    "experiment": "a published setting, pinned whole",
}

# The keys set most often. A top-level key is described by its comment in eval.yaml, which stays
# true as the config changes; these are for keys that have none there.
KEYS: dict[str, str] = {
    "n_samples": "images of the fixed evaluation subset",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "threads": "torch CPU threads",
    "seed": "attack randomness",
    "batch_size": "images per batch of the attacks and the judge",
    "paths.results_dir": "where runs, sweeps and the leaderboard go ($PUREBENCH_RESULTS_DIR)",
}

INTRO = """\
PureBench: evaluate an adversarial purification defense.

usage: python -m bench [--debug] [overrides...]
       purebench run [--debug] [overrides...]
       python -m bench --multirun [overrides with comma-separated values...]

A run composes a defense, a classifier, a dataset, a threat model and an attack suite from the
config groups below, judges the clean images (every decision rule), attacks the ones judged
correct, escalates the budget of the strongest white-box attack until the accuracy converges,
runs diagnostics that say when the number is not to be trusted, and writes record.json into its
run directory (<paths.results_dir>/runs/...) and the leaderboard into <paths.results_dir>.
"""

EXAMPLES = """\
Examples:
  python -m bench dataset=digits defense=none suite=pgd n_samples=64 device=cpu
      a seconds-long run on scikit-learn's digits (no files needed)
  python -m bench --multirun profile=quick defense=none,diffpure,pursamere threads=1
      a sweep like `make bench`: one job per defense, then the leaderboard is rebuilt
  python -m bench defense._target_=my_module.MyDefense name=mydefense
      your own defense class in place of the option's (on the leaderboard as `mydefense`)
  python -m bench experiment=nie2022_diffpure_cifar10 profile=paper
      a published setting at the papers' budgets (GPU)
"""

MORE = """\
More:
  --cfg job       print the composed config (add --resolve to resolve interpolations)
  --hydra-help    Hydra's own flags and groups (hydra/launcher, sweeps, output dirs)
  --debug         show the full traceback of an error (also: HYDRA_FULL_ERROR=1)
  Any key of the config can be set as key=value, added with +key=value or removed with ~key.
"""


def description(path: Path) -> str:
    """The first sentence of the leading comment block of a YAML file, or ``""``.

    Hydra directives (``# @package _global_``) are skipped; the block ends at the first line
    that is not a comment.
    """
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if text.startswith("@"):
            continue
        lines.append(text)
    return _first_sentence(" ".join(lines))


def key_comments(path: Path) -> dict[str, str]:
    """The comment after each top-level ``key: value`` of a YAML file, cut to its first sentence.

    Comment-only lines right below a key continue its comment.
    """
    found: dict[str, list[str]] = {}
    last: str | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        key = re.match(r"^(\w+):[^#]*#\s*(.*)$", line)
        more = re.match(r"^\s+#\s*(.*)$", line)
        if key:
            last = key.group(1)
            found[last] = [key.group(2)]
        elif more and last is not None:
            found[last].append(more.group(1))
        else:
            last = None
    return {k: _first_sentence(" ".join(v)) for k, v in found.items()}


def _first_sentence(text: str) -> str:
    """``text`` up to the end of its first sentence."""
    # A sentence ends at a period before a capital letter, so "et al. (2022)" does not end one.
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text.strip(), maxsplit=1)[0]


def options(conf_dir: str | Path, group: str) -> list[str]:
    """The options of ``group``: the names of the YAML files in ``conf_dir/group``, sorted."""
    folder = Path(conf_dir) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def defaults(conf_dir: str | Path, config_name: str = "eval") -> dict[str, str | None]:
    """The option each group of ``config_name``'s defaults list picks (``None``: none)."""
    chosen: dict[str, str | None] = {}
    loaded = OmegaConf.to_container(OmegaConf.load(Path(conf_dir) / f"{config_name}.yaml"))
    # Unresolved: an entry such as ${dataset}_${threat} only resolves inside Hydra.
    for entry in loaded.get("defaults", []) if isinstance(loaded, dict) else []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                # "optional local" and "override hydra/x" name the group last.
                chosen[str(key).split()[-1]] = None if value is None else str(value)
    return chosen


def _yaml_value(value: object) -> str:
    """``value`` as it would be written on the command line (``null``, ``true``, ``512``)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _group_section(conf_dir: Path, group: str, about: str, default: str | None) -> list[str]:
    """A group's heading and one line per option, each with its description."""
    names = options(conf_dir, group)
    suffix = f" (default: {default})" if default else " (default: unset)"
    lines = [f"  {group}: {about}{suffix}"]
    column = max((len(n) for n in names), default=0) + 6
    for name in names:
        about_option = description(conf_dir / group / f"{name}.yaml")
        text = textwrap.shorten(about_option, WIDTH - column, placeholder=" ...")
        lines.append(f"    {name:<{column - 4}}{text}".rstrip())
    return lines


def _keys_section(conf: Path) -> list[str]:
    """One line per key of :data:`KEYS`: ``key=default`` and what it is."""
    values = OmegaConf.load(conf / "eval.yaml")
    comments = key_comments(conf / "eval.yaml")
    shown = {}
    for key in KEYS:
        # paths.* default to an environment variable; show what it falls back to.
        default = "results" if key == "paths.results_dir" else OmegaConf.select(values, key)
        shown[key] = f"{key}={_yaml_value(default)}"
    column = max(len(s) for s in shown.values()) + 4
    return [
        f"  {shown[key]:<{column - 2}}"
        + textwrap.shorten(comments.get(key) or about, WIDTH - column, placeholder=" ...")
        for key, about in KEYS.items()
    ]


def help_text(conf_dir: str | Path) -> str:
    """The help page, with every option of the main groups read from ``conf_dir``."""
    conf = Path(conf_dir)
    chosen = defaults(conf)
    parts = [INTRO, "Config groups (group=option; the options are the files in conf/<group>/):"]
    for group, about in GROUPS.items():
        parts.extend(_group_section(conf, group, about, chosen.get(group)))
    others = sorted(
        p.name
        for p in conf.iterdir()
        if p.is_dir() and p.name not in GROUPS and p.name != "hydra" and options(conf, p.name)
    )
    if others:
        parts.append(f"  also: {', '.join(others)} (set by the options above; see conf/)")
    parts.append("")
    parts.append("Top-level keys (key=value):")
    parts.extend(_keys_section(conf))
    parts.extend(["", EXAMPLES, MORE])
    return "\n".join(parts)
