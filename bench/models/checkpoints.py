"""Checked checkpoint loading.

``weights_only`` reads, wrapper and prefix handling, and one error that lists every mismatch
instead of PyTorch's first-failure message.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from common.errors import CheckpointError

logger = logging.getLogger(__name__)

# Keys under which training scripts commonly nest the state_dict; unwrapped automatically only
# when exactly one of them is present, so that an ambiguous file is never guessed at.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# How many keys each section of a mismatch report lists before summarising the rest as a count.
_MAX_LISTED = 10


def listing(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """Join ``items`` with commas, listing at most ``limit`` and counting the rest."""
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return shown


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _read_checkpoint(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``; every failure becomes a CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file")
    try:
        # weights_only=True: unpickling arbitrary objects can execute code, so a checkpoint may
        # hold only tensors and plain containers. Passing it explicitly also means the
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD environment variable cannot override it.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise unpickling_error(path, e) from e
    except Exception as e:  # zip/EOF/runtime errors: the file is not a torch checkpoint at all
        raise CheckpointError(
            f"checkpoint file {path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}"
        ) from e


def unpickling_error(path: Path | str, error: pickle.UnpicklingError) -> CheckpointError:
    """Turn torch's weights-only refusal (or another unpickling failure) into a CheckpointError."""
    message = str(error)
    detail_match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    detail = detail_match.group(1).strip() if detail_match else message.splitlines()[0]
    # The weights-only unpickler reports both "this pickle asks for a Python object" and "these
    # bytes are not a pickle at all" (an unknown opcode); only the first is a refused object.
    if "weights only load failed" not in message.lower() or "Unsupported operand" in detail:
        return CheckpointError(
            f"checkpoint file {path} is not a readable PyTorch checkpoint: {detail}"
        )
    offending = re.search(r"GLOBAL (\S+)", detail)
    what = f" (first offending object: {offending.group(1)})" if offending else f" ({detail})"
    return CheckpointError(
        f"checkpoint file {path} contains pickled Python objects{what} and is refused: loading "
        "it would unpickle arbitrary objects, which can run code. Re-save only the weights, e.g. "
        "torch.save(model.state_dict(), path)"
    )


def _unwrap_state_dict(obj: object, path: Path, key: str | None) -> Mapping[str, Tensor]:
    """Return the state_dict inside a loaded checkpoint object, unwrapping a wrapper dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint file {path} holds a {type(obj).__name__}, not a state_dict "
            "(a dict of parameter name -> tensor)"
        )
    top_keys = [str(k) for k in obj]
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                f"checkpoint file {path} has no entry {key!r} (asked for with key={key!r}); its "
                f"top-level keys are: {listing(top_keys)}"
            )
        obj = obj[key]
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint file {path}: entry {key!r} holds a {type(obj).__name__}, not a "
                "state_dict"
            )
    elif not all(isinstance(v, Tensor) for v in obj.values()):
        found = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(found) != 1:
            why = "none" if not found else f"several ({', '.join(found)})"
            raise CheckpointError(
                f"checkpoint file {path} is a dict with non-tensor values and {why} of the "
                f"wrapper keys {', '.join(_WRAPPER_KEYS)}; set key= to the entry that holds the "
                f"state_dict. Top-level keys: {listing(top_keys)}"
            )
        logger.info("checkpoint %s: using the state_dict under the wrapper key %r", path, found[0])
        obj = obj[found[0]]
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint file {path}: the state_dict has {len(not_tensors)} non-tensor "
            f"entries: {listing(not_tensors)}"
        )
    return obj


def _strip_key_prefix(
    state_dict: Mapping[str, Tensor], prefix: str, path: Path
) -> OrderedDict[str, Tensor]:
    """Remove ``prefix`` from the keys that start with it (DataParallel's ``module.``)."""
    stripped: OrderedDict[str, Tensor] = OrderedDict()
    count = 0
    for name, value in state_dict.items():
        new_name = name
        if prefix and name.startswith(prefix):
            new_name = name[len(prefix) :]
            count += 1
        if new_name in stripped:
            raise CheckpointError(
                f"checkpoint file {path} has both {name!r} and {new_name!r}, which collide once "
                f"the prefix {prefix!r} is stripped"
            )
        stripped[new_name] = value
    if count:
        logger.info("checkpoint %s: stripped the prefix %r from %d keys", path, prefix, count)
    # torch keeps per-module version numbers in `_metadata`; BatchNorm and others use them to
    # upgrade old checkpoints, so carry them over under the renamed module paths.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        module_prefix = prefix[:-1] if prefix.endswith(".") else prefix
        renamed = OrderedDict()
        for module_name, value in metadata.items():
            if prefix and module_name == module_prefix:
                module_name = ""
            elif prefix and module_name.startswith(prefix):
                module_name = module_name[len(prefix) :]
            renamed[module_name] = value
        stripped._metadata = renamed  # type: ignore[attr-defined]
    return stripped


def _mismatch_report(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
    """List missing keys, unexpected keys and shape mismatches; empty when they fit."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(expected[k])}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    lines: list[str] = []
    if missing:
        lines.append(
            f"missing keys ({len(missing)}; in the model, not in the checkpoint): "
            f"{listing(missing)}"
        )
    if unexpected:
        lines.append(
            f"unexpected keys ({len(unexpected)}; in the checkpoint, not in the model): "
            f"{listing(unexpected)}"
        )
        # The commonest cause is a wrapper prefix other than `module.`; name it when stripping it
        # would make the unexpected keys fit.
        heads = {k.split(".", 1)[0] for k in unexpected}
        if len(heads) == 1 and all("." in k for k in unexpected):
            prefix = heads.pop() + "."
            if any(k[len(prefix) :] in expected for k in unexpected):
                lines.append(
                    f"hint: every unexpected key starts with {prefix!r}; "
                    f"try strip_prefix={prefix!r}"
                )
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {listing(mismatched)}")
    return lines


def load_state_dict_checked(
    model: nn.Module,
    path: str | Path,
    *,
    key: str | None = None,
    strip_prefix: str = "module.",
) -> nn.Module:
    """Load a state_dict checkpoint into ``model``, refusing anything that does not fit exactly.

    The file is read with ``torch.load(..., weights_only=True)``: it may hold only tensors and
    plain containers, never arbitrary pickled objects. A wrapper dict is unwrapped (the entry
    ``key``, or, when ``key`` is None, the single one of ``state_dict`` / ``model_state_dict`` /
    ``model`` present), ``strip_prefix`` is removed from the keys that carry it, and the result is
    compared with ``model.state_dict()`` before ``load_state_dict(strict=True)``.

    Args:
        model: The freshly built architecture to load into (modified in place).
        path: The checkpoint file.
        key: Entry of a wrapper dict that holds the state_dict (e.g. ``"state_dict"``).
        strip_prefix: Key prefix to remove where present; ``""`` disables stripping.

    Returns:
        ``model``, with the checkpoint's weights.

    Raises:
        CheckpointError: If the file is missing, unreadable, contains pickled objects, holds no
            recognisable state_dict, or does not match the model. A mismatch raises one error that
            lists the missing keys, the unexpected keys and the shape mismatches
            (``name: checkpoint (a, b) vs model (c, d)``), each truncated with a count.
    """
    path = Path(path)
    state_dict = _unwrap_state_dict(_read_checkpoint(path), path, key)
    state_dict = _strip_key_prefix(state_dict, strip_prefix, path)
    problems = _mismatch_report(state_dict, model.state_dict())
    if problems:
        raise CheckpointError(
            f"checkpoint file {path} does not fit {type(model).__name__}:\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded %d tensors from %s into %s", len(state_dict), path, type(model).__name__)
    return model


def sha256_files(paths: Sequence[Path]) -> str:
    """SHA-256 of one file, or of the concatenated digests of several (ensembles), in order."""
    digests = []
    for path in paths:
        with path.open("rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf.

    Such weights make every logit NaN, which would otherwise surface mid-attack and be blamed
    on the defense in front of the classifier.

    Raises:
        CheckpointError: naming ``what`` (the classifier or part) and the first bad tensors.
    """
    bad = [
        name
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        raise CheckpointError(
            f"{what} has NaN or inf in {len(bad)} weight tensor(s): {listing(bad)}; its "
            "checkpoint is corrupt (retrain it, or load another file)"
        )
