"""Progress of a training loop: a bar on a terminal, log lines elsewhere, and the loss curve.

Every training loop in the project (classifiers, the score model, the purifiers' parts) has the
same bookkeeping: a progress bar, a loss curve averaged over windows of ``log_every`` steps, the
time taken. :class:`TrainingProgress` holds it once. It draws no random numbers, so a loop that
uses it trains exactly the weights it trained without it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# On a non-terminal (a cluster log, a file) a line is logged at most this often: 25 s, so that
# with the call that carries it a line still comes at least every 30 s.
LOG_SECONDS = 25.0


class TrainingProgress:
    """The steps of one training loop, with its loss curve.

    Iterate over it for the step indices; call :meth:`update` once per step with the step's
    scalars. Every ``log_every`` steps (and at the last) the window's mean of each scalar is
    appended to :attr:`curve` as ``{"step": s, name: mean, ...}``; ``last`` values (a schedule's
    current weight, say) are appended as they are.

    Args:
        desc: what is trained, for the bar and the log lines.
        steps: number of steps.
        log_every: steps per point of the loss curve.
        logger: where the periodic lines go on a non-terminal (this module's by default).

    Example:
        >>> progress = TrainingProgress("train MAE", steps=100, log_every=10)
        >>> for step in progress:
        ...     progress.update(step, loss=0.1)
        >>> len(progress.curve)
        10
    """

    def __init__(
        self, desc: str, steps: int, log_every: int = 50, logger: logging.Logger | None = None
    ) -> None:
        self.desc, self.steps, self.log_every = desc, steps, max(int(log_every), 1)
        self.curve: list[dict[str, float]] = []
        self._window: dict[str, list[float]] = {}
        self._log = logger or log
        self._bar: Any = None
        self._start = time.perf_counter()
        self._last_line = self._start
        self.elapsed = 0.0

    def __iter__(self) -> Iterator[int]:
        self._start = self._last_line = time.perf_counter()
        tty = sys.stderr.isatty()
        self._bar = tqdm(range(self.steps), desc=self.desc, leave=False, disable=not tty)
        self._log.info("%s: %d steps", self.desc, self.steps)
        yield from self._bar
        self.elapsed = time.perf_counter() - self._start

    def update(self, step: int, *, last: dict[str, float] | None = None, **values: float) -> None:
        """Add one step's scalars; close a window of the curve every ``log_every`` steps."""
        for name, value in values.items():
            self._window.setdefault(name, []).append(float(value))
        if (step + 1) % self.log_every and step + 1 != self.steps:
            return
        point = {"step": step + 1}
        point.update({k: sum(v) / len(v) for k, v in self._window.items() if v})
        point.update(last or {})
        self.curve.append(point)
        self._window = {}
        shown = {k: f"{v:.4g}" for k, v in point.items() if k != "step"}
        if self._bar is not None:
            self._bar.set_postfix(shown)
        now = time.perf_counter()
        if now - self._last_line >= LOG_SECONDS or step + 1 == self.steps:
            self._last_line = now
            self._log.info(
                "%s: step %d/%d, %s (%.0f s)",
                self.desc,
                step + 1,
                self.steps,
                ", ".join(f"{k} {v}" for k, v in shown.items()),
                now - self._start,
            )


class Heartbeat:
    """A log line at most every ``seconds`` from code that runs inside another library's loop.

    The attacks (torchattacks', AutoAttack's, the harness's own) loop by themselves; every one of
    them calls the attack view, so the view beats and a person or a cluster log sees the run
    move during each phase (clean judging, attacks, escalation, diagnostics), not only at its
    end. The first line of a stage comes ``seconds`` after the stage began.

    Args:
        logger: where the lines go.
        seconds: the least time between two lines.
    """

    def __init__(self, logger: logging.Logger | None = None, seconds: float = LOG_SECONDS) -> None:
        self._log, self.seconds = logger or log, seconds
        self.stage: str | None = None
        self._stage_start = self._last = time.perf_counter()

    def beat(self, stage: str, detail: str, *args: Any) -> None:
        """Note progress in ``stage``; log ``detail % args`` if the last line is old enough.

        Formatted like a ``logging`` call, only when a line is due: the beat runs on every
        purifier call.
        """
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self._stage_start, self._last = stage, now, now
            return
        if now - self._last < self.seconds:
            return
        self._last = now
        self._log.info(
            f"%s: {detail} (%.0f s in this stage)", stage, *args, now - self._stage_start
        )
