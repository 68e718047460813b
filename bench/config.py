"""Where the harness's Hydra configs live: the checkout's conf/, else the installed bench/conf/."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# Files that only a PureBench checkout has beside the package: a stray conf/ next to an installed
# bench/ (site-packages/conf/ from some other distribution) must not be mistaken for ours.
_CHECKOUT_MARKERS = ("pyproject.toml", "conf/eval.yaml")


def find_conf_dir() -> str:
    """The absolute path of the config directory Hydra should read.

    In a checkout (an editable install, or the source tree on ``sys.path``) that is the
    repository-level ``conf/``, so that edits to it take effect without reinstalling. A wheel
    ships the same files as the data package ``bench.conf`` (pyproject.toml maps ``conf/`` onto
    it), which is used whenever no checkout surrounds the package.

    Returns:
        A plain ``str`` path (``@hydra.main(config_path=...)`` and ``initialize_config_dir`` take
        an absolute filesystem path; a relative one would be resolved against the caller's
        package).
    """
    root = Path(__file__).resolve().parent.parent
    if all((root / marker).is_file() for marker in _CHECKOUT_MARKERS):
        return str(root / "conf")
    # Installed as files on disk (pip never installs purebench zipped), so the Traversable is a
    # real directory whose str() is its path.
    return str(files("bench").joinpath("conf"))


# An absolute path: Hydra resolves a relative config_path against the calling module's package,
# which cannot reach the repository-level conf/ when run as `python -m bench`.
CONF_DIR = find_conf_dir()
