"""The fingerprint of a run: what determines its result, and nothing that does not.

Records of one configuration share a fingerprint; only records with equal fingerprints may be
merged (shards), and a resume checkpoint is keyed by it. It hashes

* the resolved config without the keys that do not change a result (where files live, which
  device and how many threads, the logger, the shard) and without any value that names a
  machine path (interpolated from ``paths.*`` or an environment variable, or a file whose
  contents are hashed instead);
* the code that runs (:func:`bench.provenance.source_digest`: every source file and config);
* the digests of the weights loaded from files (a checkpoint replaced at the same path is
  another model), from the classifier source and the defense's parts.

So two shards of one configuration run with different ``PUREBENCH_CACHE_DIR`` share it, and a
run resumed after its checkpoint changed does not mix two models.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.provenance import source_digest

# Keys of the run config that do not change a result.
NON_RESULT_KEYS = ("paths", "device", "threads", "shard", "logger", "hydra")
# Keys whose string values name files; the files' digests stand in for them.
FILE_KEYS = ("path", "checkpoint", "pretrained")
# A raw value interpolating one of these names a machine path.
MACHINE_INTERPOLATIONS = ("${paths.", "${oc.env:")


def _portable(raw: Any, resolved: Any) -> Any:
    """``resolved`` without the values whose ``raw`` form names a machine path."""
    if isinstance(resolved, dict) and isinstance(raw, dict):
        out = {}
        for key, value in resolved.items():
            raw_value = raw.get(key)
            if isinstance(raw_value, str) and any(m in raw_value for m in MACHINE_INTERPOLATIONS):
                continue
            if key in FILE_KEYS and (value is None or isinstance(value, str)):
                continue
            out[key] = _portable(raw_value, value)
        return out
    if isinstance(resolved, list) and isinstance(raw, list) and len(raw) == len(resolved):
        return [_portable(r, v) for r, v in zip(raw, resolved, strict=True)]
    return resolved


def portable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as it decides the result: no machine paths, no run logistics."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    kept = {}
    for key in cfg:
        if key in NON_RESULT_KEYS:
            continue
        node = cfg[key]  # resolved one key at a time: the hydra node may not resolve here
        kept[key] = (
            OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        )
    return _portable({k: raw.get(k) for k in kept}, kept)


def fingerprint(cfg: DictConfig, weights: list[dict[str, Any] | None]) -> str:
    """Hash of the portable config, the code version and the digests of loaded weights."""
    blob = json.dumps(
        {"config": portable_config(cfg), "code": source_digest(), "weights": weights},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
