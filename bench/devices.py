"""Choosing the device a run uses, and reading how much memory work on it takes.

Two readings, for two questions:

* :func:`reset_peak_memory` / :func:`peak_memory_mb`: the high-water mark of a whole phase of a
  run (CUDA allocator peak, or this process's resident set on CPU), what a machine must hold;
* :func:`allocation_peak_mb`: the most tensor memory one call holds at once beyond what was
  allocated before it (the gradient-memory probe of ``bench.tools.fidelity``). A resident set
  cannot answer this: even after a reset of its high-water mark it follows what glibc's malloc
  keeps mapped, not what the call allocates, so readings of the same gradient in fresh
  processes differed several-fold.

And how many CPU threads torch uses (:func:`resolve_threads`, :func:`set_threads`): ``threads:
auto`` is derived from the CPUs this process may use, as measured in docs/costs.md#threads.
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=auto or cpu")
    return device


# The `threads` value that derives the count from the CPUs (null means the same).
THREADS_AUTO = "auto"
# On 2 cores torch's default of 2 intra-op threads ran the README's digits command 2-2.4x slower
# than 1 thread while other jobs ran (a thread spin-waits for its partner on a busy core); the
# small convolutions of the CPU-sized networks gain little from many threads, so a large machine
# keeps its cores for parallel jobs instead (docs/costs.md#threads).
AUTO_THREADS_CAP = 4
# cgroup v2's CPU quota of this process's group: "max 100000", or "150000 100000" for --cpus=1.5.
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path(CGROUP_CPU_MAX).read_text().split()
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    # A container limited to --cpus=1.5 has 1 CPU's worth of time to spread over its threads.
    return max(1, min(cpus, int(quota) // int(period)))


def auto_threads(cpus: int) -> int:
    """The ``threads: auto`` count for ``cpus`` usable CPUs (the rule of docs/costs.md#threads).

    Half the CPUs, at least 1 and at most :data:`AUTO_THREADS_CAP`: a spare core keeps the data
    pipeline, the logger and other jobs off the cores the intra-op threads wait on.
    """
    return max(1, min(cpus // 2, AUTO_THREADS_CAP))


def resolve_threads(value: Any) -> int:
    """The torch CPU thread count of a ``threads`` setting: a positive integer, or auto / null.

    Raises:
        ConfigError: anything else (``threads=0``, ``threads=foo``), naming the value.
    """
    if value is None or value == THREADS_AUTO:
        return auto_threads(usable_cpus())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"threads={value!r} is not allowed; use auto, null or an integer >= 1")
    return value


def set_threads(value: Any) -> int:
    """Resolve ``value`` (:func:`resolve_threads`), set torch's intra-op threads; return it."""
    threads = resolve_threads(value)
    torch.set_num_threads(threads)
    return threads


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux >= 4.0); False where impossible.

    A worker process that runs several jobs of a sweep (joblib's, or Hydra's basic launcher in
    one process) would otherwise report the largest job's peak for every later job.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def proc_status_mb(key: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"{key} not in /proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark on ``device`` (a sweep's worker process runs many jobs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory_mb(device: torch.device) -> float:
    """The high-water mark (MiB) since :func:`reset_peak_memory`.

    CUDA: the allocator's peak of allocated bytes. CPU: the resident set's high-water mark
    (``VmHWM``); where ``/proc`` is missing, ``ru_maxrss`` over the process's lifetime.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return proc_status_mb("VmHWM")
    except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS), the process's lifetime
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocation_peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Run ``fn()``; the most MiB of tensors it held at once beyond those allocated before it.

    CUDA: the caching allocator's peak of allocated bytes above the bytes allocated at the
    start. CPU: torch's CPU allocator reports every allocation and free to the profiler when
    memory profiling is on; the running sum of those events, in order, is the memory the call
    allocated and still held at each moment, and its maximum is the peak. Both count tensor
    bytes only, so the reading depends on the computation, not on the malloc underneath or on
    the process's history: the same call reads the same in any process.

    Garbage is collected first. Tensors in reference cycles (a checkpointed step's closures)
    are freed when Python's cycle collector runs, which depends on how many objects were
    allocated since its last run; after a collection that moment is the same on every call, so
    the same call reads the same.

    Raises:
        ConfigError: ``device`` is neither CPU nor CUDA (no allocator to read).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        reset_peak_memory(device)
        fn()
        torch.cuda.synchronize(device)
        return peak_memory_mb(device) - base / 2**20
    if device.type != "cpu":
        raise ConfigError(f"device={device} has no allocator peak to read; use cpu or cuda")
    return _cpu_allocation_peak(fn) / 2**20


def _cpu_allocation_peak(fn: Callable[[], Any]) -> int:
    """Bytes: the peak of the running sum of the CPU allocator's events during ``fn()``."""
    # Kineto prints a start and a stop banner on stderr for every profiled region; level 6 is
    # above its most severe message, so a user's own KINETO_LOG_LEVEL still wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())  # the running sum needs time order across threads
    return _running_peak(e.nbytes() for e in events)


def _running_peak(deltas: Iterable[int]) -> int:
    """The maximum of the running sum of ``deltas`` (0 if it never rises above the start)."""
    live = peak = 0
    for delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak
