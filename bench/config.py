"""Where the harness's Hydra configs live."""

from __future__ import annotations

from pathlib import Path

# An absolute path: Hydra resolves a relative config_path against the calling module's package,
# which cannot reach the repository-level conf/ when run as `python -m bench`.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
