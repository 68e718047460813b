"""Provenance: which code and which packages produced a result.

``source_digest`` hashes the harness's own source files and configs, so two runs share a
fingerprint only when they ran the same code, whether or not the tree is committed and whether
or not it is a git checkout at all (an installed wheel).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# What decides a result: the packages of the project and their configs.
SOURCE_DIRS = ("bench", "defenses", "attacks", "common", "conf")
SOURCE_SUFFIXES = (".py", ".yaml")
# Machine-local settings (git-ignored paths): never part of what decides a result.
LOCAL_DIR = Path("conf") / "local"

_PACKAGES = (
    "purebench",
    "torch",
    "torchvision",
    "torchattacks",
    "pyautoattack",
    "hydra-core",
    "omegaconf",
    "numpy",
    "pandas",
)


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide a result."""
    versions = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """The commit the harness runs from and whether its tree has uncommitted changes."""
    repo = repo or REPO
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": dirty}


@functools.cache
def source_digest(root: Path = REPO) -> str:
    """SHA-256 over the project's source files and configs (paths and contents), in order.

    Computed once per process: the code a process runs does not change under it.
    """
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root)
            if (
                path.suffix not in SOURCE_SUFFIXES
                or not path.is_file()
                or rel.is_relative_to(LOCAL_DIR)
            ):
                continue
            if "__pycache__" not in rel.parts:
                digest.update(str(rel).encode())
                digest.update(b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """The commit, whether the tree differs from it, and the digest of the code that runs."""
    return {**git_state(), "source": source_digest()}
