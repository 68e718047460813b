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
    """Import PureBench's packages with the current directory off ``sys.path``, then restore it.

    ``python -m`` puts the working directory first, so a user's own ``attacks.py`` there would
    shadow the installed package. Moving it to the end is not enough for an editable install,
    whose finder runs after every ``sys.path`` entry, so the packages are imported while it is
    absent; their submodules then resolve through the packages themselves. Restored in its
    place, the directory still serves a module of the user's named by an override such as
    ``defense._target_=my_defense.MyDefense``, ahead of any same-named installed module.

    Raises:
        SystemExit: in one line naming the file, when a plain module hides one of the packages
            even so (e.g. an ``attacks.py`` in a folder on ``PYTHONPATH``).
    """
    cwd = os.path.realpath(os.getcwd())
    original = list(sys.path)
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
        # Back in its place: the packages are imported (their submodules resolve through them),
        # and a user's module there must still beat a same-named one in site-packages (some
        # distributions install a top-level `tests`).
        sys.path[:] = original


# Before anything else of bench is imported: bench.run imports attacks and defenses.
import_packages_before_cwd()

from bench.run import main  # noqa: E402 (must follow the sys.path repair above)

if __name__ == "__main__":
    main()
