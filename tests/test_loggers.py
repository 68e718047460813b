"""The dashboard: logger=wandb offline writes the run's metrics, tables and image grid."""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torchvision.utils import make_grid

from bench.engine.attack_view import HEARTBEAT
from bench.reporting.loggers import WandbLogger, diagnostic_rows, escalation_rows, metrics
from bench.run import evaluate
from common import progress
from common.errors import ConfigError
from defenses.noise import GaussianNoise
from tests.conftest import fast_overrides
from tests.test_leaderboard import make_record


def test_wandb_offline_logs_metrics_tables_and_images(
    compose_cfg, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [
        *fast_overrides(cache_dir, tmp_path),
        "n_samples=32",
        "logger=wandb",
        "logger.mode=offline",  # CI exports WANDB_MODE=disabled, which the YAML would take
        "diagnostics.enabled=false",
    ]
    record = evaluate(
        compose_cfg(overrides),
        output_dir=tmp_path / "run",
        choices={"defense": "none", "classifier": "small_cnn"},
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "offline mode writes one local run and needs no network"
    logged = _read_offline_run(next(runs[0].glob("*.wandb")))
    expected = metrics(record)
    for key in ("acc/clean", "acc/robust", "acc/robust/pgd", "acc/robust/apgd_ce", "cost/wall_s"):
        assert logged["history"][key] == pytest.approx(expected[key])
    assert logged["summary"]["status"] == "completed"
    assert "suite" in logged["config"] and "defense" in logged["config"]
    files = runs[0] / "files" / "media"
    assert list((files / "images").glob("images_*.png")), "the clean/adversarial/purified grid"
    assert logged["summary"]["escalation"] == record.escalation["reason"]
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in (files / "table").iterdir()}
    assert {"attack", "robust", "grad"} <= set(tables["attacks"]["columns"])
    names = [row[0] for row in tables["attacks"]["data"]]
    assert names[:2] == ["pgd", "apgd_ce"] and all(n.startswith("escalate@") for n in names[2:])
    assert {"defense", "robust"} <= set(tables["leaderboard"]["columns"])
    assert {"level", "accuracy"} <= set(tables["escalation"]["columns"])


def _read_offline_run(path: Path) -> dict[str, dict]:
    """Decode an offline ``.wandb`` file: a LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb2

    data, block, header = path.read_bytes(), 32768, 7
    chunks, buf, pos = [], b"", 7  # after the file header (":W&B", magic, version)
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        payload = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 1:  # full
            chunks.append(payload)
        elif kind == 2:  # first
            buf = payload
        elif kind == 3:  # middle
            buf += payload
        elif kind == 4:  # last
            chunks.append(buf + payload)
    out: dict[str, dict] = {"history": {}, "summary": {}, "config": {}}
    for chunk in chunks:
        record = pb2.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        items = {
            "history": lambda r: r.history.item,
            "summary": lambda r: r.summary.update,
            "run": lambda r: r.run.config.update,
        }.get(kind)
        if items is None:
            continue
        target = out["config" if kind == "run" else kind]
        for item in items(record):
            key = item.key or "/".join(item.nested_key)
            target[key] = json.loads(item.value_json)
    return out


def test_bad_logger_mode_fails_before_work(compose_cfg, cache_dir: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([*fast_overrides(cache_dir, tmp_path), "logger=wandb", "logger.mode=live"])
    with pytest.raises(ConfigError, match="logger.mode='live'"):
        evaluate(cfg, output_dir=tmp_path / "run", choices={"defense": "none"})
    assert not (tmp_path / "run" / "record.json").exists()


def test_the_image_grid_arrives_with_the_pixel_values_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wandb casts float arrays to uint8 as they are: the logger hands it uint8 pixels."""
    from PIL import Image

    monkeypatch.setenv("WANDB_SILENT", "true")
    gen = torch.Generator().manual_seed(0)
    examples = {
        "clean": torch.rand(4, 1, 8, 8, generator=gen),
        "pgd": torch.rand(4, 1, 8, 8, generator=gen),
    }
    WandbLogger(dir=str(tmp_path), grid_images=4).log_run(make_record(), examples, None)
    (png,) = (tmp_path / "wandb").glob("offline-run-*/files/media/images/images_*.png")
    decoded = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).int()
    expected = make_grid(torch.cat(list(examples.values())), nrow=4)
    expected = expected.mul(255).round().permute(1, 2, 0).int()
    assert decoded.shape == expected.shape and decoded.max() > 200  # not a black grid
    assert (decoded - expected).abs().max() <= 1


def test_wandb_mode_and_dir_come_from_the_environment(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "dash"))
    logger = instantiate(compose_cfg(["logger=wandb"]).logger)
    assert logger.mode == "offline" and logger.dir == tmp_path / "dash"
    override = instantiate(compose_cfg(["logger=wandb", "logger.mode=disabled"]).logger)
    assert override.mode == "disabled"  # the command line wins over the environment


def test_escalation_and_diagnostics_tables() -> None:
    record = make_record()
    record.escalation = {
        "headline": "single",
        "levels": [
            {"level": 0, "budget": {"steps": 10}, "attacked": 100, "rules": {"single": 0.3}},
            {
                "level": 1,
                "budget": {"steps": 20},
                "attacked": 32,
                "rules": {"single": 0.29},
                "probe": {"projected": 1.5},
            },
        ],
    }
    record.diagnostics = {"checks": {"unbounded": {"passed": True, "value": 0.0, "detail": "ok"}}}
    levels = escalation_rows(record)
    assert list(levels["accuracy"]) == [0.3, 0.29] and levels["projected_images"].iloc[1] == 1.5
    checks = diagnostic_rows(record)
    assert checks.loc[0, "check"] == "unbounded" and bool(checks.loc[0, "passed"])


class SlowNoise(GaussianNoise):
    """Gaussian noise that takes a few milliseconds per call, like a small purifier."""

    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        time.sleep(0.006)  # AutoAttack's stage lasts a few heartbeat intervals
        return super().purify(x, generator=generator)


def test_a_run_logged_to_a_file_shows_progress_at_a_steady_interval(
    compose_cfg, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """No terminal: a log line at least every interval in every phase (0.5 s here, 25 s default)."""
    monkeypatch.setattr(HEARTBEAT, "seconds", 0.5)
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.5)
    cfg = compose_cfg([*fast_overrides(cache_dir, tmp_path), "profile=quick", "n_samples=64"])
    with open_dict(cfg):
        cfg.defense = OmegaConf.create({"_target_": f"{__name__}.SlowNoise", "sigma": 0.1})
    caplog.set_level(logging.INFO)
    evaluate(cfg, output_dir=tmp_path / "run", choices={"defense": "slownoise"})
    times = [r.created for r in caplog.records if r.name.startswith(("bench", "common"))]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) > 10 and max(gaps) < 3.0, f"longest silence {max(gaps):.1f} s"
    text = caplog.text
    # Heartbeats from inside AutoAttack's own loop (the view beats), and per-batch lines.
    assert "attack 'apgd_ce': " in text and "images through the view" in text
    assert "still robust" in text and "about" in text and "s left" in text
