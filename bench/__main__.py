"""``python -m bench [overrides...]``: one evaluation (or a sweep with ``-m``)."""

from __future__ import annotations

import importlib.util
import os
import sys

# The top-level packages PureBench installs beside bench (which is already imported by now).
_PACKAGES = ("attacks", "defenses", "common")


def _is_cwd(entry: str, cwd: str) -> bool:
    """Whether a ``sys.path`` entry names the current directory ('' or its path)."""
    return entry == "" or os.path.realpath(entry) == cwd


def import_packages_before_cwd() -> None:
    """Import PureBench's packages with the current directory off ``sys.path``, then append it.

    ``python -m`` puts the working directory first, so a user's own ``attacks.py`` there would
    shadow the installed package. Moving it to the end is not enough for an editable install,
    whose finder runs after every ``sys.path`` entry, so the packages are imported while it is
    absent; their submodules then resolve through the packages themselves. At the end of
    ``sys.path`` the directory still serves what only it has: a module of the user's named by an
    override such as ``defense._target_=my_defense.MyDefense``.

    Raises:
        SystemExit: in one line naming the file, when a plain module hides one of the packages
            even so (e.g. an ``attacks.py`` in a folder on ``PYTHONPATH``).
    """
    cwd = os.path.realpath(os.getcwd())
    here = [entry for entry in sys.path if _is_cwd(entry, cwd)]
    sys.path[:] = [entry for entry in sys.path if not _is_cwd(entry, cwd)]
    try:
        for name in _PACKAGES:
            module = sys.modules.get(name)
            spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
            if spec is None:
                continue  # not installed: the import in bench.run fails with its own error
            if spec.submodule_search_locations is None:
                raise SystemExit(
                    f"error: {spec.origin} shadows PureBench's `{name}` package; rename or move "
                    f"it, or run from another directory (and drop its folder from PYTHONPATH)"
                )
            importlib.import_module(name)
    finally:
        sys.path.extend(here)


# Before anything else of bench is imported: bench.run imports attacks and defenses.
import_packages_before_cwd()

from bench.run import main  # noqa: E402 (must follow the sys.path repair above)

if __name__ == "__main__":
    main()
