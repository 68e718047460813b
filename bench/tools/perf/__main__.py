"""Entry point of ``python -m bench.tools.perf`` (``make perf``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bench.config import CONF_DIR
from bench.reporting.records import write_json_atomic
from bench.tools.perf.report import PERF_JSON, markdown, write_results
from bench.tools.perf.runner import run_perf

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="perf")
def main(cfg: DictConfig) -> None:
    """Measure, write ``perf.md`` and ``perf.json``, print the table."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    runtime = HydraConfig.get().runtime.choices
    choices = {k: str(runtime.get(k)) for k in ("dataset", "classifier", "threat")}
    result = run_perf(cfg, run_dir, choices)
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    md, js = write_results(result, Path(cfg.paths.results_dir))
    write_json_atomic(run_dir / PERF_JSON, result)
    log.info("wrote %s and %s (%.0f s)", md, js, result["wall_s"])
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
