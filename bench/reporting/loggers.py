"""Dashboards: where a finished run's record is logged besides ``record.json``.

The record stays the source of truth; a logger only mirrors it. ``logger=wandb`` (offline by
default) logs the config, the metrics under slash paths (``acc/clean``, ``acc/robust``,
``acc/robust/<attack>``, ``acc/<rule>/robust``, ``cost/...``), the per-attack, escalation and
diagnostics tables, an image grid (clean, adversarial and purified images of each attack) and
the current leaderboard.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from bench.reporting.details import diagnostic_rows, escalation_rows
from bench.reporting.records import RunRecord
from common.checks import choice, positive_int

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
# wandb's older names for the modes, as WANDB_MODE may carry them.
MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def metrics(record: RunRecord) -> dict[str, float]:
    """The record's numbers under slash paths (accuracies as fractions)."""
    out: dict[str, float] = {}
    if record.clean_acc is not None:
        out["acc/clean"] = record.clean_acc.value
    if record.robust_acc is not None:
        out["acc/robust"] = record.robust_acc.value
        out["acc/robust_low"] = record.robust_acc.low
        out["acc/robust_high"] = record.robust_acc.high
    for name, result in record.attacks.items():
        out[f"acc/robust/{name}"] = result.robust_acc.value
        out[f"cost/{name}/wall_s"] = result.wall_s
        out[f"cost/{name}/purifier_calls_per_image"] = result.purifier_calls_per_image
    for rule, accs in record.rules.items():
        for which, acc in accs.items():
            out[f"acc/{rule}/{which}"] = acc.value
    for key in ("wall_s", "purifier_calls_per_image", "peak_memory_mb"):
        if isinstance(record.cost.get(key), int | float):
            out[f"cost/{key}"] = float(record.cost[key])
    out["diagnostics/ok"] = float(record.verdict == "ok")
    return out


def attack_rows(record: RunRecord) -> pd.DataFrame:
    """One row per attack: accuracy, view, budget actually spent."""
    rows = []
    for name, r in record.attacks.items():
        rows.append(
            {
                "attack": name,
                "kind": r.kind,
                "grad": r.view.get("grad"),
                "eot": r.view.get("eot_samples"),
                "robust": r.robust_acc.value,
                "robust_low": r.robust_acc.low,
                "robust_high": r.robust_acc.high,
                "n_attacked": r.n_attacked,
                "wall_s": r.wall_s,
                "purifier_calls_per_image": r.purifier_calls_per_image,
                "max_perturbation": r.max_perturbation,
            }
        )
    return pd.DataFrame(rows)


def image_grid(examples: dict[str, Tensor], n: int) -> Tensor | None:
    """Rows of ``n`` images: clean, then each attack's adversarial and purified images.

    Returns ``uint8`` pixels, height x width x channels: wandb casts a float array to ``uint8``
    as it is, so images in [0, 1] would arrive black (brightest pixel 1/255).
    """
    from torchvision.utils import make_grid

    rows = [examples[k][:n] for k in examples if examples[k] is not None and len(examples[k])]
    if not rows:
        return None
    width = min(len(r) for r in rows)
    grid = make_grid(torch.cat([r[:width] for r in rows]).float().clamp(0, 1), nrow=width)
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


class NoLogger:
    """``logger=none``: nothing beyond ``record.json``."""

    def log_run(self, record: RunRecord, examples: dict[str, Tensor], leaderboard: Any) -> None:
        """Do nothing."""

    @property
    def wants_examples(self) -> bool:
        """Whether the runner should keep images for a grid."""
        return False


class WandbLogger:
    """Log a finished run to Weights & Biases (https://wandb.ai), offline unless asked.

    Args:
        project: the W&B project.
        entity: the team or user (``None``: the account's default).
        mode: ``offline`` (default; written under ``dir``, upload later with ``wandb sync``),
            ``online`` (needs an account) or ``disabled``; ``conf/logger/wandb.yaml`` takes it
            from ``WANDB_MODE`` when that is set.
        dir: parent of the ``wandb/`` folder (``WANDB_DIR`` when set, in the same YAML).
        tags: run tags.
        grid_images: images per row of the image grid.
    """

    def __init__(
        self,
        project: str = "purebench",
        entity: str | None = None,
        mode: str = "offline",
        dir: str = "results",
        tags: list[str] | None = None,
        grid_images: int = 8,
    ) -> None:
        mode = MODE_ALIASES.get(mode, mode)
        choice("logger.mode", mode, MODES)
        positive_int("logger.grid_images", grid_images)
        import wandb  # noqa: F401  (fail at plan time, not after the evaluation, if missing)

        self.project, self.entity, self.mode = project, entity, mode
        self.dir, self.tags, self.grid_images = Path(dir), list(tags or []), grid_images
        self.run_dir: Path | None = None

    @property
    def wants_examples(self) -> bool:
        """Whether the runner should keep images for a grid."""
        return self.mode != "disabled"

    def log_run(
        self, record: RunRecord, examples: dict[str, Tensor], leaderboard: pd.DataFrame | None
    ) -> None:
        """Log config, metrics, the attack table, the image grid and the leaderboard."""
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=str(self.dir),
            config=record.config,
            name=f"{record.defense}__{record.classifier}__{record.dataset}",
            group=record.dataset,
            job_type="eval",
            tags=[*self.tags, record.defense, record.classifier, record.status],
        )
        try:
            run.log(metrics(record))
            run.summary.update(
                {
                    "status": record.status,
                    "verdict": str(record.verdict),
                    "escalation": (record.escalation or {}).get("reason"),
                    "defense_info": asdict_safe(record.defense_info),
                }
            )
            tables = {
                "attacks": attack_rows(record),
                "escalation": escalation_rows(record),
                "diagnostics": diagnostic_rows(record),
            }
            for key, table in tables.items():
                if not table.empty:
                    run.log({key: wandb.Table(dataframe=table)})
            grid = image_grid(examples, self.grid_images)
            if grid is not None:
                caption = " / ".join(k for k in examples if examples[k] is not None)
                run.log({"images": wandb.Image(grid.numpy(), caption=f"rows: {caption}")})
            if leaderboard is not None and not leaderboard.empty:
                run.log({"leaderboard": wandb.Table(dataframe=leaderboard.astype(str))})
            self.run_dir = Path(run.dir).parent
        finally:
            run.finish()
        log.info("logged to wandb (%s): %s", self.mode, self.run_dir)


def asdict_safe(value: Any) -> Any:
    """Plain data for the summary (dataclasses flattened)."""
    try:
        return asdict(value)
    except TypeError:
        return value
