"""Step 2 of ``make gpu-check``: a CIFAR-sized task without downloads, and two small networks.

scikit-learn's 8x8 digits, upsampled to 3x32x32 with a random colour pair per image; on it, a
CIFAR ResNet-18 classifier and an AToP inpainter (L1 reconstruction through RT2), trained for
``Sizes.train_steps`` Adam steps each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.architectures import ResNet18
from bench.models.classifiers import prepare_for_evaluation
from bench.tools.gpu_check.settings import synchronize
from bench.tools.gpu_check.sizes import IMAGE, RT, SEED, Data, Sizes
from defenses.atop import AToP, Inpainter, inpaint

CLASSES = 10


@dataclass
class Networks:
    """The task and the networks trained on it (step 2), with their facts for the report."""

    test: Data
    classifier: nn.Module
    inpainter: nn.Module
    facts: dict[str, Any] = field(default_factory=dict)


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
