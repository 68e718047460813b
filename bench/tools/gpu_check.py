"""``make gpu-check``: what one GPU gives the harness, measured in one command (issue 18).

Four steps, in this order, each timed; ``gpu.md`` and ``gpu.json`` are rewritten after every
step, so a run stopped half-way still leaves the steps it finished:

1. **GPU tests**: ``pytest -m gpu`` in a subprocess; the counts come from its JUnit XML file.
2. **Networks**: a CIFAR-sized task without downloads (scikit-learn's 8x8 digits, upsampled to
   3x32x32 with a random colour pair per image), and trained on it for a few hundred steps a
   CIFAR ResNet-18 classifier and an AToP inpainter (:class:`defenses.atop.Inpainter`, L1
   reconstruction through RT2). Small, so that the later steps fit the time budget.
3. **Options**: bf16 autocast, channels-last and ``torch.compile``, and all three together,
   against fp32 on three subjects: the classifier, the inpainter network, and the harness's own
   :class:`~bench.engine.attack_view.AttackView` of ``classifier(AToP.purify(x))`` under its
   ``precision`` / ``channels_last`` / ``compile`` options. Per subject and setting, on one
   batch: how far the outputs move from fp32's (the predictions' agreement, the largest
   absolute difference of the outputs, the cosine similarity of the input gradients), and how
   long a forward pass and a gradient pass (forward and backward to the input: an attack step)
   take: the median of synchronised repetitions after warm-up, the settings interleaved
   (:func:`bench.tools.perf.timing.interleave`), the speedup being the median of the paired
   per-repetition ratios fp32 / setting. The fp32 row compares fp32 with a second fp32 run:
   the noise floor of the comparison.
4. **Paper row**: one ``profile=paper`` evaluation through :func:`bench.api.evaluate` of AToP
   (the trained inpainter, RT2) in front of the trained classifier on the task's test images,
   Linf 8/255, timed as a whole and per attack.

``python -m bench.tools.gpu_check`` needs CUDA: without it, it says so in one line and exits
with status 2 before it loads any data. ``--device cpu --tiny`` runs every step on the CPU at
tiny sizes (tests/test_gpu_check.py); those numbers are a CPU's, not a GPU's. The status is 1
when a step, a GPU test or a setting failed (``gpu.md`` lists what), else 0.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.devices import set_threads
from bench.models.architectures import ResNet18
from bench.models.classifiers import prepare_for_evaluation
from bench.provenance import REPO, git_state, package_versions
from bench.reporting.records import write_json_atomic
from bench.tools.perf.timing import interleave
from common.errors import ConfigError
from defenses.atop import AToP, Inpainter, RandomTransform, inpaint

log = logging.getLogger(__name__)

GPU_MD, GPU_JSON = "gpu.md", "gpu.json"
EXIT_FAILED, EXIT_NO_CUDA = 1, 2
SEED = 0
EPS = 8 / 255  # CIFAR-10's Linf budget (conf/dataset_threat/cifar10_linf.yaml)
IMAGE = (3, 32, 32)
CLASSES = 10
# AToP's RT2 at the harness's defaults: at 32x32 a 4x4 grid makes 8x8 blocks, 4 of 16 missing.
RT = RandomTransform(kind="rt2", sigma=0.25, grid=4, missing=0.25)
# torch.compile traces a module's forward once per grad mode, autocast state and module copy;
# the subjects compile the classifier's forward more often than dynamo's default limit of 8,
# past which it would silently run the module eagerly.
RECOMPILE_LIMIT = 64

Data = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Sizes:
    """How large every step is: :data:`FULL` on a GPU, :data:`TINY` for the CPU test.

    Attributes:
        batch: images per measured call (3x32x32).
        train_steps: Adam steps of each network (learning rate 1e-3).
        train_batch: images per training step.
        classifier_width: first-stage channels of the ResNet-18 (64 in the paper).
        purifier_width: first-level channels of the inpainter (conf/defense/atop.yaml's 32).
        warmup: calls of every pass before it is timed (compilation happens in the first).
        repeats: timed repetitions (the median is reported).
        inner: calls per timed repetition (a repetition synchronises once, at its end).
        paper_n: images of the paper-profile row.
        paper_overrides: further overrides of the paper row (the tiny run's smaller budgets).
    """

    batch: int
    train_steps: int
    train_batch: int
    classifier_width: int
    purifier_width: int
    warmup: int
    repeats: int
    inner: int
    paper_n: int
    paper_overrides: tuple[str, ...] = ()


FULL = Sizes(
    batch=256,
    train_steps=300,
    train_batch=128,
    classifier_width=32,
    purifier_width=32,
    warmup=3,
    repeats=7,
    inner=10,
    paper_n=16,
)
# Seconds on a CPU. The paper profile's own budgets (AutoAttack at full strength, PGD-200 with
# EOT-20, Square's 5,000 queries) would take hours there, so the tiny row keeps profile=paper
# and shrinks the budgets; gpu.md lists these overrides beside the row.
TINY = Sizes(
    batch=16,
    # 80 steps: about 90% clean and 60% after AToP on the batch, so the row's attacks run.
    train_steps=80,
    train_batch=32,
    classifier_width=8,
    purifier_width=8,
    warmup=1,
    repeats=3,
    inner=1,
    paper_n=4,
    paper_overrides=(
        "suite=smoke",
        "eot_default=2",
        "decision.draws=2",
        "diagnostics.enabled=false",
        "escalation.enabled=false",
    ),
)


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


@dataclass
class Subject:
    """A network measured under every setting.

    Attributes:
        name: its name in the table.
        what: what it is, for the report.
        inputs: the batch it is called on; the first input is the one differentiated.
        build: the network under a setting, as ``call(*inputs) -> outputs`` (fp32 outputs).
        loss: the scalar of the gradient pass, from the outputs.
        predict: class predictions from the outputs (compared with fp32's).
        passes: the passes timed (``forward``: no grad; ``gradient``: to the first input).
        not_run: why a setting is not run on this subject, or ``None``.
    """

    name: str
    what: str
    inputs: tuple[Tensor, ...]
    build: Callable[[Setting], Callable[..., Tensor]]
    loss: Callable[[Tensor], Tensor]
    predict: Callable[[Tensor], Tensor]
    passes: tuple[str, ...] = PASSES
    not_run: Callable[[Setting], str | None] | None = None


@dataclass
class Networks:
    """The task and the networks trained on it (step 2), with their facts for the report."""

    test: Data
    classifier: nn.Module
    inpainter: nn.Module
    facts: dict[str, Any] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()[:800]


# -- 1. the GPU tests ------------------------------------------------------------------------


def junit_counts(path: Path) -> dict[str, int]:
    """Passed, failed (failures and errors) and skipped tests of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))

    def total(key: str) -> int:
        return sum(int(s.get(key, 0)) for s in suites)

    failed, skipped = total("failures") + total("errors"), total("skipped")
    return {"passed": total("tests") - failed - skipped, "failed": failed, "skipped": skipped}


def gpu_tests(paths: Sequence[str]) -> dict[str, Any]:
    """``pytest -m gpu`` on ``paths`` (relative to the checkout), in a subprocess.

    Status 0 passes. Anything else fails, 5 (nothing collected) included: no test is marked.
    """
    args = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *paths]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *args, f"--junitxml={junit}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t0
        counts = junit_counts(junit) if junit.exists() else {}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    out: dict[str, Any] = {
        "command": "python " + " ".join(args),
        "rc": proc.returncode,
        "ok": proc.returncode == 0,
        "wall_s": wall,
        "summary": lines[-1].strip("= ") if lines else "",
        **counts,
    }
    if not out["ok"]:
        out["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
    return out


# -- 2. the task and the networks ------------------------------------------------------------


def coloured(x: Tensor, y: Tensor, seed: int) -> Data:
    """8x8 grey digits as 3x32x32 colour images: bilinear upsampling, a colour pair each."""
    g = torch.Generator().manual_seed(seed)
    big = F.interpolate(x, size=IMAGE[1:], mode="bilinear", align_corners=False)
    fg = 0.5 + 0.5 * torch.rand(len(x), 3, 1, 1, generator=g)
    bg = 0.4 * torch.rand(len(x), 3, 1, 1, generator=g)
    return (bg + (fg - bg) * big).clamp(0, 1), y


def cifar_sized_digits() -> tuple[Data, Data]:
    """Train and test splits of the task: scikit-learn's digits at CIFAR-10's shape."""
    from bench.data import digits

    data = digits()
    return coloured(*data.train(), seed=SEED), coloured(*data.test(), seed=SEED + 1)


def train(
    net: nn.Module,
    loss_of: Callable[[Tensor, Tensor], Tensor],
    data: Data,
    sizes: Sizes,
    device: torch.device,
) -> dict[str, Any]:
    """``sizes.train_steps`` Adam steps on random batches of ``data``; time and last loss."""
    x, y = (t.to(device) for t in data)
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    synchronize(device)
    t0 = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(sizes.train_steps):
        idx = torch.randint(0, len(x), (sizes.train_batch,), generator=g).to(device)
        loss = loss_of(x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(device)
    return {
        "parameters": sum(p.numel() for p in net.parameters()),
        "steps": sizes.train_steps,
        "train_s": time.perf_counter() - t0,
        "final_loss": float(loss.detach()),
    }


def train_networks(sizes: Sizes, device: torch.device) -> Networks:
    """Build the task, train the classifier and the inpainter, measure what they reach."""
    t0 = time.perf_counter()
    train_set, test = cifar_sized_digits()
    load_s = time.perf_counter() - t0
    torch.manual_seed(SEED)
    classifier = ResNet18(IMAGE[0], CLASSES, IMAGE[1], width=sizes.classifier_width).to(device)
    inpainter = Inpainter(IMAGE[0], width=sizes.purifier_width, depth=2).to(device)
    noise = torch.Generator(device=device).manual_seed(SEED)

    def ce(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(classifier(x), y)

    def l1(x: Tensor, _y: Tensor) -> Tensor:
        return (inpaint(inpainter, RT, x, generator=noise) - x).abs().mean()

    c_facts = train(classifier, ce, train_set, sizes, device)
    p_facts = train(inpainter, l1, train_set, sizes, device)
    classifier = prepare_for_evaluation(classifier, device, "gpu-check classifier")
    inpainter = prepare_for_evaluation(inpainter, device, "gpu-check inpainter")
    x, y = (t[: sizes.batch].to(device) for t in test)
    with torch.no_grad():
        clean = (classifier(x).argmax(1) == y).float().mean().item()
        purified = AToP(inpainter, RT).purify(x, generator=torch.Generator().manual_seed(SEED))
        after = (classifier(purified).argmax(1) == y).float().mean().item()
    shape = "x".join(map(str, IMAGE))
    facts = {
        "data": f"scikit-learn's digits at {shape}: {len(train_set[0])} training and "
        f"{len(test[0])} test images",
        "data_s": load_s,
        "classifier": {"arch": f"ResNet-18, width {sizes.classifier_width}", **c_facts},
        "purifier": {"arch": f"AToP inpainter, width {sizes.purifier_width}, depth 2", **p_facts},
        "transform": asdict(RT),
        "clean_acc_batch": clean,
        "purified_acc_batch": after,
    }
    return Networks(test, classifier, inpainter, facts)


# -- 3. bf16, channels-last and torch.compile ------------------------------------------------


def module_call(net: nn.Module, setting: Setting, backend: str) -> Callable[..., Tensor]:
    """``net`` under ``setting``: channels-last weights and inputs, compiled, bf16 autocast.

    The outputs come back in fp32, as the harness's view returns its logits.
    """
    if setting.channels_last:
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    model = torch.compile(net, backend=backend) if setting.compile else net

    def call(*inputs: Tensor) -> Tensor:
        if setting.channels_last:
            inputs = tuple(t.contiguous(memory_format=torch.channels_last) for t in inputs)
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16, enabled=setting.bf16):
            out = model(*inputs)
        return out.float()

    return call


def view_call(
    classifier: nn.Module, inpainter: nn.Module, setting: Setting
) -> Callable[[Tensor], Tensor]:
    """The harness's view of AToP and the classifier with ``setting`` as its view options.

    Every call restarts the view's seed stream: the same noise and masks in every call, so
    the outputs of two settings are comparable.
    """
    from bench.engine.attack_view import AttackView, ViewOptions

    options = ViewOptions(
        eot_samples=1,
        precision="bf16" if setting.bf16 else "fp32",
        channels_last=setting.channels_last,
        compile=setting.compile,
    )
    view = AttackView(classifier, AToP(inpainter, RT), options, seed=SEED)

    def call(images: Tensor) -> Tensor:
        view.reseed(SEED)
        return view(images)

    return call


def subjects(nets: Networks, sizes: Sizes, backend: str | None) -> list[Subject]:
    """The classifier, the inpainter network and the view; ``backend`` None: no compiling."""
    classifier, inpainter = nets.classifier, nets.inpainter
    device = next(classifier.parameters()).device
    x, y = (t[: sizes.batch].to(device) for t in nets.test)
    g = torch.Generator().manual_seed(SEED + 2)
    masks = RT.masks(len(x), *IMAGE[1:], generator=g, device=device)[0]
    masked = RT.noise(x, generator=g) * (1 - masks)
    cotangent = torch.randn(x.shape, generator=g).to(device)

    def ce(out: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="sum")

    def argmax(out: Tensor) -> Tensor:
        return out.argmax(1)

    def classified(out: Tensor) -> Tensor:
        with torch.no_grad():
            return classifier(out).argmax(1)

    def no_compile(setting: Setting) -> str | None:
        return "--no-compile" if setting.compile and backend is None else None

    def view_not_run(setting: Setting) -> str | None:
        if setting.compile and backend not in (None, "inductor"):
            return f"the view compiles with inductor; this run has --compile-backend {backend}"
        return no_compile(setting)

    def module(net: nn.Module) -> Callable[[Setting], Callable[..., Tensor]]:
        return lambda setting: module_call(net, setting, backend or "inductor")

    n = len(x)
    return [
        Subject(
            "classifier",
            f"ResNet-18 (width {sizes.classifier_width}), {n} images",
            (x,),
            module(classifier),
            ce,
            argmax,
            not_run=no_compile,
        ),
        Subject(
            "purifier",
            f"AToP inpainter on {n} RT2-transformed images; agreement: the fp32 "
            "classifier's predictions on its outputs",
            (masked, masks),
            module(inpainter),
            lambda out: (out * cotangent).sum(),
            classified,
            not_run=no_compile,
        ),
        Subject(
            "pipeline",
            f"AttackView(classifier, AToP), EOT-1, {n} images: the view's "
            "options (compile: the classifier only); the gradient pass only",
            (x,),
            lambda s: view_call(classifier, inpainter, s),
            ce,
            argmax,
            passes=("gradient",),
            not_run=view_not_run,
        ),
    ]


def passes(subject: Subject, call: Callable[..., Tensor]) -> dict[str, Callable[[], Any]]:
    """The subject's passes: ``forward`` returns the outputs, ``gradient`` (outputs, grad)."""

    def forward() -> Tensor:
        with torch.no_grad():
            return call(*subject.inputs)

    def gradient() -> tuple[Tensor, Tensor]:
        first = subject.inputs[0].detach().requires_grad_(True)
        out = call(first, *subject.inputs[1:])
        (grad,) = torch.autograd.grad(subject.loss(out), first)
        return out.detach(), grad

    thunks = {"forward": forward, "gradient": gradient}
    return {name: thunks[name] for name in subject.passes}


def warm(
    thunks: Mapping[str, Callable[[], Any]], sizes: Sizes, device: torch.device
) -> tuple[dict[str, float], dict[str, Any]]:
    """Warm every pass up: its first call's seconds (compilation included), then its results."""
    first: dict[str, float] = {}
    for name, thunk in thunks.items():
        synchronize(device)
        t0 = time.perf_counter()
        thunk()
        synchronize(device)
        first[name] = time.perf_counter() - t0
        for _ in range(sizes.warmup - 1):
            thunk()
    return first, {name: thunk() for name, thunk in thunks.items()}


def _outputs(results: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
    """The forward pass's outputs (else the gradient pass's) and the input gradient."""
    grad = results["gradient"][1] if "gradient" in results else None
    out = results["forward"] if "forward" in results else results["gradient"][0]
    return out, grad


def agreement(
    subject: Subject, ref: Mapping[str, Any], other: Mapping[str, Any]
) -> dict[str, float]:
    """How far ``other``'s outputs and input gradients are from ``ref``'s."""
    (out_ref, grad_ref), (out, grad) = _outputs(ref), _outputs(other)
    with torch.no_grad():
        diff = (out - out_ref).abs()
        same = subject.predict(out) == subject.predict(out_ref)
        found = {
            "agreement": same.float().mean().item(),
            "disagreeing": int((~same).sum()),
            "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "ref_max_abs": out_ref.abs().max().item(),
        }
        if grad is not None and grad_ref is not None:
            cos = F.cosine_similarity(grad.flatten(1), grad_ref.flatten(1), dim=1)
            found |= {"grad_cosine_mean": cos.mean().item(), "grad_cosine_min": cos.min().item()}
    return found


def _repeat(thunk: Callable[[], Any], inner: int, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            thunk()
        synchronize(device)

    return run


def time_passes(
    subject: Subject,
    ready: Mapping[str, Mapping[str, Callable[[], Any]]],
    sizes: Sizes,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Per setting and pass: milliseconds per call and speedup over fp32, settings interleaved."""
    timed: dict[str, dict[str, Any]] = {name: {} for name in ready}
    for pass_name in subject.passes:
        variants = {s: _repeat(t[pass_name], sizes.inner, device) for s, t in ready.items()}
        synchronize(device)
        times = interleave(variants, sizes.repeats, clock="wall")
        for name in variants:
            runs_ms = [1000 * t / sizes.inner for t in times.wall[name]]
            timed[name][pass_name] = {
                "ms_per_call": statistics.median(runs_ms),
                "runs_ms": [round(t, 4) for t in runs_ms],
                "speedup": times.ratio("fp32", name, "wall") if "fp32" in variants else None,
            }
    return timed


def measure_subject(subject: Subject, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Every setting on ``subject``: agreement with fp32, first-call and per-call times.

    A setting that fails to build or run (a compiler the machine lacks) is a result: its row
    holds the error, and the other settings still run.
    """
    rows: dict[str, dict[str, Any]] = {}
    ready: dict[str, dict[str, Callable[[], Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for setting in SETTINGS:
        reason = subject.not_run(setting) if subject.not_run else None
        if reason is not None:
            rows[setting.name] = {"not_run": reason}
            continue
        try:
            thunks = passes(subject, subject.build(setting))
            first, results[setting.name] = warm(thunks, sizes, device)
        except Exception as err:  # the row says why; the other settings still run
            log.warning("gpu-check: %s under %s failed: %s", subject.name, setting.name, err)
            rows[setting.name] = {"error": _error(err)}
            continue
        ready[setting.name] = thunks
        rows[setting.name] = {"first_call_s": first}
    if "fp32" in results:
        again = {name: thunk() for name, thunk in ready["fp32"].items()}
        for name, res in results.items():
            other = again if name == "fp32" else res
            rows[name]["vs_fp32"] = agreement(subject, results["fp32"], other)
    for name, timed in time_passes(subject, ready, sizes, device).items():
        rows[name].update(timed)
    return {"what": subject.what, "passes": list(subject.passes), "settings": rows}


# -- 4. the paper-profile row ----------------------------------------------------------------


def paper_row(
    nets: Networks, sizes: Sizes, device: torch.device, out_dir: Path, threads: int
) -> dict[str, Any]:
    """``bench.evaluate`` of AToP in front of the classifier at ``profile=paper``, timed."""
    from bench.api import evaluate

    overrides = list(sizes.paper_overrides)
    t0 = time.perf_counter()
    record = evaluate(
        AToP(nets.inpainter, RT),
        nets.classifier,
        data=nets.test,
        eps=EPS,
        profile="paper",
        name="atop_gpu_check",
        n_samples=sizes.paper_n,
        device=str(device),
        results_dir=out_dir,
        threads=threads,
        overrides=overrides,
    )
    wall = time.perf_counter() - t0
    return {
        "what": f"AToP (RT2, the trained inpainter) + the trained ResNet-18, Linf 8/255, "
        f"profile=paper, {sizes.paper_n} images",
        "overrides": overrides,
        "status": record.status,
        "error": record.error,
        "evaluate_s": wall,
        "record_wall_s": record.wall_s,
        "suite": record.choices.get("suite"),
        "clean_acc": None if record.clean_acc is None else record.clean_acc.value,
        "robust_acc": None if record.robust_acc is None else record.robust_acc.value,
        "verdict": record.verdict,
        "attacks": {
            name: {
                "wall_s": a.wall_s,
                "n_attacked": a.n_attacked,
                "purifier_calls_per_image": a.purifier_calls_per_image,
            }
            for name, a in record.attacks.items()
        },
        "cost": record.cost,
    }


# -- the report ------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def machine_line(m: Mapping[str, Any], backend: str | None) -> str:
    """The device, the versions and the float32 settings in one sentence."""
    if m["device"].startswith("cuda"):
        where = (
            f"{m['name']} (compute capability {m['capability']}, {m['memory_gib']:.0f} GiB), "
            f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}"
        )
    else:
        where = f"CPU ({m['cpus']} cores, torch threads: {m['torch_threads']}), torch {m['torch']}"
    compiled = f"torch.compile backend {backend}" if backend else "torch.compile not run"
    return (
        f"{where}; fp32 convolutions with cudnn.allow_tf32={m['cudnn_allow_tf32']}, matmul "
        f"precision {m['matmul_precision']}, cudnn.benchmark={m['cudnn_benchmark']}; {compiled}."
    )


def tests_section(t: Mapping[str, Any] | None) -> list[str]:
    """Section 1: the GPU tests' counts."""
    lines = ["## 1. GPU tests (`pytest -m gpu`)", ""]
    if not t:
        return [*lines, "Not run yet.", ""]
    if "not_run" in t or "error" in t:
        return [*lines, f"Not run: {t.get('not_run') or t.get('error')}.", ""]
    counts = ", ".join(f"{t.get(k, '?')} {k}" for k in ("passed", "failed", "skipped"))
    lines.append(f"`{t['command']}`: {counts} (status {t['rc']}, {t['wall_s']:.1f} s).")
    if not t["ok"]:
        lines += ["", "```", t.get("output_tail", "").strip()[-2000:], "```"]
    return [*lines, ""]


def networks_section(n: Mapping[str, Any] | None) -> list[str]:
    """Section 2: the task and what the trained networks reach."""
    lines = ["## 2. Networks", ""]
    if not n or "error" in n:
        return [*lines, f"Not trained: {(n or {}).get('error', 'not run yet')}.", ""]
    for key in ("classifier", "purifier"):
        f = n[key]
        lines.append(
            f"- {key}: {f['arch']}, {f['parameters'] / 1e6:.2f} M parameters, {f['steps']} "
            f"steps in {f['train_s']:.1f} s (last loss {f['final_loss']:.3f})"
        )
    lines += [
        f"- data: {n['data']} ({n['data_s']:.1f} s to build)",
        f"- on the measured batch: clean accuracy {_pct(n['clean_acc_batch'])}, after AToP's "
        f"purification {_pct(n['purified_acc_batch'])}",
        "",
    ]
    return lines


HEADER = (
    "| network | setting | agreement | max abs diff (fp32 max) | grad cosine mean (min) "
    "| forward ms | forward speedup | gradient ms | gradient speedup | first call s |"
)


def _timing(row: Mapping[str, Any], pass_name: str) -> tuple[str, str]:
    t = row.get(pass_name)
    if t is None:
        return "", ""
    speed = "n/a" if t["speedup"] is None else f"{t['speedup']:.2f}x"
    return f"{t['ms_per_call']:.3f}", speed


def option_row(network: str, setting: str, row: Mapping[str, Any]) -> str:
    """One table row: a network under a setting."""
    if "not_run" in row or "error" in row:
        what = f"not run: {row['not_run']}" if "not_run" in row else f"**failed**: {row['error']}"
        return f"| {network} | {setting} | {_cell(what)} |" + " |" * 7
    a = row.get("vs_fp32", {})
    agree = f"{100 * a['agreement']:.2f}% ({a['disagreeing']} differ)" if a else "n/a"
    diff = f"{a['max_abs_diff']:.3g} ({a['ref_max_abs']:.3g})" if a else "n/a"
    cos = "n/a"
    if "grad_cosine_mean" in a:
        cos = f"{a['grad_cosine_mean']:.4f} ({a['grad_cosine_min']:.4f})"
    fwd, grad = _timing(row, "forward"), _timing(row, "gradient")
    first = " / ".join(f"{v:.2f}" for v in row["first_call_s"].values())
    cells = (network, setting, agree, diff, cos, *fwd, *grad, first)
    return "| " + " | ".join(cells) + " |"


def options_section(result: Mapping[str, Any]) -> list[str]:
    """Section 3: the table of every network under every setting."""
    s = result["sizes"]
    lines = [
        "## 3. bf16, channels-last and torch.compile against fp32",
        "",
        f"One batch of {s['batch']} images of 3x32x32. Each pass: {s['warmup']} warm-up call(s) "
        "(the first, compilation included, is *first call*, forward / gradient), then the "
        f"median of {s['repeats']} synchronised repetitions of {s['inner']} call(s), the settings "
        "interleaved; speedup: the median of the per-repetition ratios fp32 / setting (above 1 "
        "is faster). *agreement*: predictions equal to fp32's; *max abs diff*: of the outputs "
        "(logits; images in [0, 1] for the purifier), next to fp32's largest absolute output; "
        "*grad cosine*: of the input gradients, per image. The fp32 row is fp32 against a "
        "second fp32 run. The gradient pass is forward and backward to the input (an attack "
        "step).",
        "",
        HEADER,
        "|" + " --- |" * 10,
    ]
    for key, value in result.items():
        if not key.startswith("options/"):
            continue
        network = key.split("/", 1)[1]
        if "error" in value:
            lines.append(f"| {network} | | **failed**: {_cell(value['error'])} |" + " |" * 7)
        for setting, row in value.get("settings", {}).items():
            lines.append(option_row(network, setting, row))
    notes = [
        f"- {k.split('/', 1)[1]}: {v['what']}"
        for k, v in result.items()
        if k.startswith("options/") and "what" in v
    ]
    return [*lines, "", *notes, ""]


def paper_section(p: Mapping[str, Any] | None) -> list[str]:
    """Section 4: the paper-profile row's time and accuracies."""
    lines = ["## 4. One paper-profile row", ""]
    if not p or "what" not in p:
        return [*lines, f"Not run: {(p or {}).get('error', 'not run yet')}.", ""]
    extra = f" with overrides `{' '.join(p['overrides'])}`" if p["overrides"] else ""
    lines.append(
        f"{p['what']}{extra} (suite {p['suite']}): {p['status']} in {p['evaluate_s']:.1f} s "
        f"(`bench.evaluate` as a whole; the record's wall time {p['record_wall_s']:.1f} s); "
        f"clean {_pct(p['clean_acc'])}, robust {_pct(p['robust_acc'])}, verdict "
        f"{_cell(p['verdict'])}."
    )
    if p["attacks"]:
        per = ", ".join(
            f"{k} {a['wall_s']:.1f} s ({a['n_attacked']} images, "
            f"{a['purifier_calls_per_image']:.0f} purifier calls per image)"
            for k, a in p["attacks"].items()
        )
        lines += ["", f"Per attack: {per}."]
    return [*lines, ""]


def markdown(result: Mapping[str, Any]) -> str:
    """``gpu.md``: the whole check, readable."""
    m, git = result["machine"], result.get("git", {})
    sha = str(git.get("sha") or "unknown")[:10] + (
        " (uncommitted changes)" if git.get("dirty") else ""
    )
    head = [
        "# GPU check (`make gpu-check`)",
        "",
        machine_line(m, result["compile_backend"]),
        "",
        f"Started {result['started']}, git {sha}; wall time {result.get('wall_s', 0):.1f} s.",
        "",
    ]
    if result["tiny"] or not m["device"].startswith("cuda"):
        head += [
            f"**A test run ({'tiny sizes' if result['tiny'] else 'full sizes'} on "
            f"{m['device']})**: every step ran, but these are not GPU measurements.",
            "",
        ]
    body = [
        *tests_section(result.get("tests")),
        *networks_section(result.get("networks")),
        *options_section(result),
        *paper_section(result.get("paper_row")),
    ]
    problems = result.get("failures")
    tail = ["## Failures", ""]
    if problems is None:
        tail.append("The check has not finished.")
    else:
        tail += [f"- {_cell(p)}" for p in problems] or ["None."]
    return "\n".join(head + body + tail) + "\n"


def write_results(result: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``gpu.md`` and ``gpu.json`` into ``out`` (each through a temporary file)."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / GPU_MD, out / GPU_JSON
    write_json_atomic(js, dict(result))
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{GPU_MD}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
    os.replace(tmp, md)
    return md, js


# -- the run -----------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    """The device, the library versions and the float32 settings the numbers were taken with."""
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if cuda else "CPU",
        "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)) if cuda else None,
        "memory_gib": props.total_memory / 2**30 if props is not None else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


class Run:
    """One check's results, rewritten to ``out`` after every step."""

    def __init__(self, out: Path, result: dict[str, Any]) -> None:
        self.out, self.result = out, result
        self.t0 = time.perf_counter()

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` as step ``name``: its result (or error) and time, then the files written.

        Returns ``fn()``'s value, or ``None`` when it raised.
        """
        log.info("gpu-check: %s ...", name)
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # reported; the steps that do not need this one still run
            log.error("gpu-check: %s failed:\n%s", name, traceback.format_exc())
            value, entry = None, {"error": _error(err)}
        else:
            entry = value if isinstance(value, dict) else dict(getattr(value, "facts", {}))
        self.result[name] = {**entry, "step_s": time.perf_counter() - t0}
        self.write()
        log.info("gpu-check: %s done in %.1f s", name, self.result[name]["step_s"])
        return value

    def write(self) -> None:
        """The files as they stand."""
        self.result["wall_s"] = time.perf_counter() - self.t0
        write_results(self.result, self.out)


def run_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every step; the results as plain data (``gpu.json``)."""
    sizes = TINY if args.tiny else FULL
    threads = set_threads(args.threads)
    backend = None if args.no_compile else args.compile_backend
    run = Run(
        Path(args.out),
        {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "tiny": bool(args.tiny),
            "sizes": asdict(sizes),
            "compile_backend": backend,
            "machine": machine(device),
            "versions": package_versions(),
            "git": git_state(),
        },
    )
    if args.no_tests:
        run.result["tests"] = {"not_run": "--no-tests"}
    else:
        run.step("tests", lambda: gpu_tests(args.tests))
    nets = run.step("networks", lambda: train_networks(sizes, device))
    if nets is not None:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for subject in subjects(nets, sizes, backend):
                run.step(f"options/{subject.name}", _measure(subject, sizes, device))
        run.step("paper_row", lambda: paper_row(nets, sizes, device, Path(args.out), threads))
    run.result["failures"] = failures(run.result)
    run.result["ok"] = not run.result["failures"]
    run.write()
    return run.result


def _measure(subject: Subject, sizes: Sizes, device: torch.device) -> Callable[[], Any]:
    return lambda: measure_subject(subject, sizes, device)


def failures(result: Mapping[str, Any]) -> list[str]:
    """What went wrong: a failed step, GPU test or setting, a paper row that did not complete."""
    found = []
    for key, value in result.items():
        if not isinstance(value, dict):
            continue
        if "error" in value and value["error"] is not None:
            found.append(f"{key}: {value['error']}")
        if key == "tests" and value.get("ok") is False:
            found.append(f"tests: {value['summary'] or 'pytest exited with ' + str(value['rc'])}")
        for name, row in value.get("settings", {}).items():
            if "error" in row:
                found.append(f"{key} {name}: {row['error']}")
        if key == "paper_row" and value.get("status", "completed") != "completed":
            found.append(f"paper_row: {value['status']}")
    return found


def device_problem(name: str) -> str | None:
    """Why ``name`` cannot run this check (one line), or ``None``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device; use cuda, cuda:N or cpu"
    if device.type not in ("cuda", "cpu"):
        return f"--device {name!r}: this check runs on cuda (or on cpu with --tiny, as a test)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return (
            f"CUDA is not available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}): this check needs a GPU; `--device cpu --tiny` runs its "
            "steps on the CPU at test sizes"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``python -m bench.tools.gpu_check``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.tools.gpu_check",
        description="GPU tests, bf16 / channels-last / torch.compile against fp32, and one "
        "paper-profile row, on one GPU; writes gpu.md and gpu.json.",
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a test of the steps)")
    p.add_argument("--tiny", action="store_true", help="test sizes (seconds on a CPU)")
    p.add_argument(
        "--out",
        default=os.environ.get("PUREBENCH_RESULTS_DIR", "results"),
        help="where gpu.md, gpu.json and the paper row's record (runs/, git-ignored) go",
    )
    p.add_argument("--tests", nargs="+", default=["tests"], help="paths for pytest -m gpu")
    p.add_argument("--no-tests", action="store_true", help="skip step 1 (pytest -m gpu)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    p.add_argument("--threads", default="auto", help="torch CPU threads: auto or an integer")
    args = p.parse_args(argv)
    args.threads = int(args.threads) if str(args.threads).isdigit() else args.threads
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Check the device, run every step, print ``gpu.md``; the exit status."""
    args = parse_args(argv)
    problem = device_problem(args.device)
    if problem is not None:
        sys.stderr.write(f"gpu-check: {problem}\n")
        return EXIT_NO_CUDA
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    try:
        result = run_check(args, torch.device(args.device))
    except ConfigError as err:
        sys.stderr.write(f"gpu-check: {err}\n")
        return EXIT_FAILED
    sys.stdout.write(markdown(result))
    return 0 if result["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
