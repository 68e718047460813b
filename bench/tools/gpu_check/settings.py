"""The settings step 3 of ``make gpu-check`` compares with fp32, and the sync its timing needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# torch.compile traces a module's forward once per grad mode, autocast state and module copy;
# the subjects compile the classifier's forward more often than dynamo's default limit of 8,
# past which it would silently run the module eagerly.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Setting:
    """One way of running a network: bf16 autocast, channels-last, ``torch.compile``."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


SETTINGS = (
    Setting("fp32"),
    Setting("bf16", bf16=True),
    Setting("channels_last", channels_last=True),
    Setting("compile", compile=True),
    Setting("bf16+channels_last+compile", bf16=True, channels_last=True, compile=True),
)
PASSES = ("forward", "gradient")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
