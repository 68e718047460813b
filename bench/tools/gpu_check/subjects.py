"""The networks step 3 of ``make gpu-check`` measures, each buildable under every setting.

The classifier, the inpainter network, and the harness's own
:class:`~bench.engine.attack_view.AttackView` of ``classifier(AToP.purify(x))`` under its
``precision`` / ``channels_last`` / ``compile`` options.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.tools.gpu_check.networks import Networks
from bench.tools.gpu_check.settings import PASSES, Setting
from bench.tools.gpu_check.sizes import IMAGE, RT, SEED, Sizes
from defenses.atop import AToP


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
