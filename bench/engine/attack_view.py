"""The model attacks see: the classifier after the defense, as one ``nn.Module``.

Attacks never see a defense. They see an :class:`AttackView` whose forward pass is the real
defended classifier and whose backward pass follows the configured gradient mode:

* ``exact``: autograd through the whole purifier (optionally with gradient checkpointing);
* ``bpda``: forward through ``purify``, backward through ``defense.approx`` (Athalye et al.);
* ``surrogate``: forward through ``purify``, backward through ``defense.surrogate``, a cheaper
  configuration of the same purifier (Lee & Kim 2023);
* ``transfer``: the bare classifier; adversarial examples crafted on it are judged on the
  defense (Croce et al. 2022's transfer baseline).

EOT sits on top of any mode: ``eot_samples`` purifications per forward, averaged on the logits
(``forward``) or handed to the harness's own attacks one by one (``sample_logits``) so that they
average the loss. Randomness is either fresh per call (the default white-box attacker, who does
not know the test-time seed) or ``known``: a fixed set of seeds the attacker receives and the
evaluation reuses (the deterministic white-box setting of Liu et al., ICLR 2025).

The view also counts passes and checks what every component returns: purified images must
keep the input's shape and dtype, be finite and lie in [0, 1]; logits must be finite and of
shape ``(N, classes)``. A violation names the component at fault (the defense, or the
classifier when finite images gave bad logits), the rule and the stage, and ends the run.

Gradient failures never end a run: they are what a masked or broken defense does to its
attacker, and an evaluation must finish and say so. When a component cuts the autograd graph,
the view reconnects the logits to the input with a gradient of exactly zero, so that every
library's ``torch.autograd.grad`` or ``.backward()`` succeeds; non-finite entries of an input
gradient are set to zero. :class:`PassCounter` counts the images whose gradient was missing
(graph cut), zero or non-finite, and the diagnostics read the counts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from common import seeds
from common.checks import flag, optional_positive_int
from common.errors import ConfigError, ContractViolation, NonFiniteError
from common.progress import Heartbeat
from defenses.base import Defense, has_own_predict

log = logging.getLogger(__name__)
# One per process: every view beats it, so a phase logs one line per interval, not one per view.
HEARTBEAT = Heartbeat(log)

GRAD_MODES = ("exact", "bpda", "surrogate", "transfer")
EOT_REDUCTIONS = ("logits", "loss")
RANDOMNESS = ("fresh", "known")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ViewOptions:
    """How attacks differentiate and average the defended classifier.

    Attributes:
        grad: ``exact``, ``bpda``, ``surrogate`` or ``transfer``.
        eot_samples: purifications per forward (EOT); ``None`` lets the runner choose (1 for a
            deterministic defense, ``eot_default`` for a stochastic one).
        eot_reduce: ``logits`` (average logits inside the view) or ``loss`` (the harness's
            attacks average per-sample losses over ``sample_logits``; library attacks, which
            only see ``forward``, still get averaged logits).
        randomness: ``fresh`` seeds on every call, or ``known``: the attacker receives the
            evaluation's seeds.
        checkpoint: recompute the purifier in the backward pass instead of storing its graph.
        chunk: EOT samples purified per call (``None``: chosen per device by
            :func:`auto_chunk`).
        allow_masked: permit ``exact`` on a defense that declares itself non-differentiable
            (only to demonstrate gradient masking).
        precision: ``fp32``, or ``bf16``: the purifier and the classifier run under bfloat16
            autocast (a CUDA fast path; the logits come back in fp32). It changes the model the
            attack sees: ``make perf`` reports the accuracy impact.
        channels_last: hand the purifier NHWC (channels-last) images, the layout CUDA's
            convolution kernels prefer.
        compile: run the classifier through ``torch.compile`` (the purifier stays eager: its
            generators break graphs). The first calls compile.
    """

    grad: str = "exact"
    eot_samples: int | None = None
    eot_reduce: str = "logits"
    randomness: str = "fresh"
    checkpoint: bool = False
    chunk: int | None = None
    allow_masked: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field and the allowed values."""
        for name, value, allowed in (
            ("grad", self.grad, GRAD_MODES),
            ("eot_reduce", self.eot_reduce, EOT_REDUCTIONS),
            ("randomness", self.randomness, RANDOMNESS),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"view {name}={value!r} is not allowed; allowed: {allowed}")
        for name, value in (("eot_samples", self.eot_samples), ("chunk", self.chunk)):
            optional_positive_int(f"view {name}", value)
        for name in ("checkpoint", "allow_masked", "channels_last", "compile"):
            flag(f"view {name}", getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the run record."""
        return asdict(self)


def view_rank(options: ViewOptions) -> tuple[bool, bool, int]:
    """Sort key of views by how well they let an attacker see the defense, best first.

    Exact gradients first, then fresh randomness (the white-box attacker of the threat model),
    then the most EOT samples.
    """
    return (
        options.grad != "exact",
        options.randomness != "fresh",
        -(options.eot_samples or 1),
    )


@dataclass
class PassCounter:
    """Images pushed through the view, counted per EOT sample, and the gradients that failed.

    Attributes:
        forward: classifier forward passes (images).
        backward: backward passes reaching the input (images).
        purify: calls of the purifier (images), forward only; multiply by the defense's
            ``purifier_calls`` for network evaluations.
        gradients: input gradients handed back (one per image and backward, whatever the EOT
            samples: the unit of the three failure counts).
        grad_missing: of those, images whose logits had no autograd path to the input (the
            defense or the classifier cut the graph); the attack got a zero gradient.
        grad_zero: images whose gradient reached the input and was exactly zero everywhere.
        grad_nonfinite: images whose gradient held NaN or inf; those entries were set to zero.
    """

    forward: int = 0
    backward: int = 0
    purify: int = 0
    gradients: int = 0
    grad_missing: int = 0
    grad_zero: int = 0
    grad_nonfinite: int = 0

    def reset(self) -> None:
        """Start counting from zero."""
        for f in fields(self):
            setattr(self, f.name, 0)

    def snapshot(self) -> dict[str, int]:
        """The counts as a dict."""
        return asdict(self)


@dataclass
class _InputWatch:
    """What the latest forward through the view found about one input tensor.

    Attributes:
        cut: the logits had no autograd path to the input.
    """

    cut: bool = False


class _Reconnect(torch.autograd.Function):
    """The logits, unchanged, made to depend on the input with a gradient of exactly zero.

    A defense that cuts the graph (``detach``, ``no_grad``) would make autograd refuse the
    attacker's ``backward`` (``element 0 of tensors does not require grad``) and end the run;
    with this link every library sees a zero gradient instead, which the view counts. A custom
    function rather than ``logits + 0 * x.sum()``: that term is not exactly zero in its gradient
    when the incoming gradient holds inf (``0 * inf`` is NaN).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, x: Tensor) -> Tensor:
        """The logits, as a new tensor that depends on ``x``."""
        ctx.input_like = (x.shape, x.dtype, x.device)
        return logits.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor]:
        """The logits' gradient passed on; zeros of the input's shape, dtype and device."""
        shape, dtype, device = ctx.input_like
        grad_logits = grad if ctx.needs_input_grad[0] else None
        return grad_logits, torch.zeros(shape, dtype=dtype, device=device)


def auto_chunk(device: torch.device, eot_samples: int) -> int:
    """EOT samples per purifier call for a device: one at a time on CPU, all at once on GPU.

    GPUs need large batches to fill their cores. CPUs do not, and lose on larger calls:
    ``make perf`` (results/perf.json, ``chunk``) times one forward+backward of EOT-8 on 64
    Fashion-MNIST images through SmallCNN behind Gaussian noise at chunk 1, 2, 4 and 8 on this
    project's 2-core CPU; one call of K*B images was the slowest and chunk 1 within noise of the
    best (issue 7 measured 15.4 s against 10.2 s for EOT-20).
    """
    return eot_samples if device.type == "cuda" else 1


class AttackView(nn.Module):
    """``classifier(defense.purify(x))`` as a plain module mapping images in [0, 1] to logits.

    torchattacks, pyautoattack and the harness's own attacks run on this view unchanged. The
    harness's attacks also use two optional methods found here by duck typing:
    :meth:`sample_logits` (per-EOT-sample logits, for loss averaging) and :meth:`defense_loss`
    (the defense-aware loss term).

    Args:
        classifier: maps images in [0, 1] to logits.
        defense: the purifier applied first.
        options: gradient mode, EOT and randomness (:class:`ViewOptions`); ``eot_samples`` must
            be resolved (not ``None``).
        seed: seeds the stream of per-purification seeds (``fresh``) or the fixed seed set
            (``known``), and the defense's attack-loss randomness.
        name: the defense's name in error messages.
        classifier_name: the classifier's name in error messages.
    """

    def __init__(
        self,
        classifier: nn.Module,
        defense: Defense,
        options: ViewOptions | None = None,
        *,
        seed: int = 0,
        name: str | None = None,
        classifier_name: str | None = None,
    ) -> None:
        super().__init__()
        options = options or ViewOptions(eot_samples=1)
        if options.eot_samples is None:
            options = replace(options, eot_samples=1)
        options.validate()
        info = type(defense).info
        if options.grad == "exact" and not info.differentiable and not options.allow_masked:
            raise ConfigError(
                f"grad=exact on {type(defense).__name__}, which declares itself "
                "non-differentiable: use grad=bpda or grad=surrogate (or allow_masked=true to "
                "demonstrate gradient masking)"
            )
        self.classifier = classifier
        self.defense = defense
        self.options = options
        self.name = name or type(defense).__name__
        self.classifier_name = classifier_name or type(classifier).__name__
        self.stage = "evaluation"
        self.counter = PassCounter()
        # One gradient hook per input tensor, however often it is forwarded: APGD's EOT loop
        # forwards the same tensor `eot_iter` times, and a hook per forward would count (and
        # clean) each later backward several times.
        self._watches: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._graph_cut = False
        self.reseed(seed)
        self._own_predict = has_own_predict(defense)
        # In a tuple, not registered: the compiled wrapper shares the classifier's parameters.
        self._compiled = (torch.compile(classifier),) if options.compile else None

    # -- randomness ------------------------------------------------------------------------

    def _draw_seeds(self, n: int) -> list[int]:
        return torch.randint(0, seeds.SEED_HIGH, (n,), generator=self._seeds).tolist()

    def reseed(self, seed: int) -> None:
        """Restart the seed stream (and, for ``known`` randomness, the fixed seed set)."""
        self.seed = seed
        self._seeds = torch.Generator().manual_seed(seed)
        # A stream of its own: the attack-loss term never shifts the purifications' seeds.
        self._loss_seeds = torch.Generator().manual_seed(seeds.defense_loss(seed))
        self._known = self._draw_seeds(self.eot_samples)

    @property
    def known_seeds(self) -> list[int]:
        """The seed set a ``known``-randomness attacker receives (one per EOT sample)."""
        return list(self._known)

    @property
    def stochastic(self) -> bool:
        """Whether two forwards of the same input can differ (fresh noise of a random defense).

        Attacks read it (``PGDEOT(early_stop="auto")`` does not freeze points on one EOT
        estimate of a stochastic view).
        """
        return (
            type(self.defense).info.stochastic
            and self.options.randomness == "fresh"
            and self.options.grad != "transfer"
        )

    @property
    def eot_samples(self) -> int:
        """Purifications averaged per forward."""
        return int(self.options.eot_samples or 1)

    def _call_seeds(self) -> list[int]:
        if self.options.randomness == "known":
            return self.known_seeds
        return self._draw_seeds(self.eot_samples)

    # -- the forward pass ------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the defended classifier on ``x``, averaged over the EOT samples."""
        return self.sample_logits(x).mean(0)

    def sample_logits(self, x: Tensor) -> Tensor:
        """Logits per EOT sample, shape ``(eot_samples, N, num_classes)``."""
        if x.requires_grad and torch.is_grad_enabled():
            watch = self._watch(x)
            # Set by `_logits_of` when some EOT sample's logits lost their path to the input.
            self._graph_cut = False
            out = self._sample_logits(x)
            watch.cut = self._graph_cut
            return out
        if not torch.is_inference_mode_enabled():
            # No gradient can flow back: inference mode skips autograd's bookkeeping (version
            # counters, view tracking). The logits come back as a normal tensor, which callers
            # may modify in place outside inference mode.
            with torch.inference_mode():
                out = self._sample_logits(x)
            return out.clone()
        return self._sample_logits(x)

    def _watch(self, x: Tensor) -> _InputWatch:
        """The watch of input ``x``, its gradient hook registered on first sight."""
        watch = self._watches.get(x)
        if watch is None:
            watch = self._watches[x] = _InputWatch()
            x.register_hook(partial(self._check_grad, watch))
        return watch

    def _sample_logits(self, x: Tensor) -> Tensor:
        seeds = self._call_seeds()
        chunk = self.options.chunk or auto_chunk(x.device, len(seeds))
        out = []
        for i in range(0, len(seeds), chunk):
            part = seeds[i : i + chunk]
            # One purifier call on len(part) stacked copies: a single generator, seeded by the
            # first seed of the chunk, draws different noise for every copy.
            xs = x.repeat(len(part), *([1] * (x.dim() - 1))) if len(part) > 1 else x
            logits = self._logits(xs, part[0])
            out.append(logits.view(len(part), len(x), -1))
        return torch.cat(out)

    def logits_for_seed(self, x: Tensor, seed: int) -> Tensor:
        """Logits of one purification with the given seed (known-randomness judging)."""
        return self._logits(x, seed)

    def defense_loss(self, x: Tensor) -> Tensor | None:
        """The defense-aware loss term (per image) the defense offers, or ``None``."""
        seed = int(torch.randint(0, seeds.SEED_HIGH, (), generator=self._loss_seeds))
        term = self.defense.attack_loss(x, generator=self._generator(seed, x.device))
        if term is not None:
            self._check(term, "its attack_loss")
        return term

    def _generator(self, seed: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def _purify(self, x: Tensor, seed: int) -> Tensor:
        def run(inp: Tensor) -> Tensor:
            # A fresh generator from the seed on every call, so that checkpointing's
            # recomputation in the backward pass draws exactly the noise of the forward pass.
            return self.defense.purify(inp, generator=self._generator(seed, inp.device))

        if self.options.checkpoint and x.requires_grad and torch.is_grad_enabled():
            purified = checkpoint(run, x, use_reentrant=False)
        else:
            purified = run(x)
        self._check_purified(purified, x)
        return purified

    def _classify(self, x: Tensor) -> Tensor:
        logits = (self._compiled[0] if self._compiled else self.classifier)(x)
        self._check_logits(logits, len(x))
        return logits

    def _logits(self, x: Tensor, seed: int) -> Tensor:
        self.counter.forward += len(x)
        c = self.counter
        HEARTBEAT.beat(
            self.stage,
            "%d images through the view, %d purifications, %d input gradients (grad=%s, EOT %d)",
            c.forward,
            c.purify,
            c.gradients,
            self.options.grad,
            self.eot_samples,
        )
        if self.options.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.options.precision == "fp32":
            return self._logits_of(x, seed)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            logits = self._logits_of(x, seed)
        return logits.float()

    def _logits_of(self, x: Tensor, seed: int) -> Tensor:
        mode = self.options.grad
        needs_grad = x.requires_grad and torch.is_grad_enabled()
        if mode == "transfer":
            logits = carrier = self._classify(x)
        elif self._own_predict:
            self.counter.purify += len(x)
            logits = carrier = self._predict_logits(x, seed, mode if needs_grad else "exact")
        else:
            self.counter.purify += len(x)
            carrier = self._purified(x, seed, mode, needs_grad)
            logits = self._classify(carrier)
        # The test is on what the defense returned, not only on the logits: a classifier with
        # trainable parameters keeps its logits in the graph even when the input was cut off.
        if needs_grad and not (carrier.requires_grad and logits.requires_grad):
            self._graph_cut = True
            logits = _Reconnect.apply(logits, x)
        return logits

    def _purified(self, x: Tensor, seed: int, mode: str, needs_grad: bool) -> Tensor:
        """The purified images, differentiable as the gradient mode says."""
        if mode == "exact" or not needs_grad:
            return self._purify(x, seed)
        with torch.no_grad():
            real = self._purify(x, seed)
        if mode == "bpda":
            stand_in = self.defense.approx(x)
        else:
            stand_in = self.defense.surrogate(x, generator=self._generator(seed, x.device))
        self._check(stand_in, f"its {mode} stand-in")
        # Forward value of the real purifier, gradient of the stand-in.
        return stand_in + (real - stand_in).detach()

    def _predict_logits(self, x: Tensor, seed: int, mode: str) -> Tensor:
        """Defenses with their own decision (CARSO): BPDA and surrogate act on the logits."""
        generator = self._generator(seed, x.device)
        if mode == "exact":
            logits = self.defense.predict(self.classifier, x, generator=generator)
        else:
            with torch.no_grad():
                real = self.defense.predict(self.classifier, x, generator=generator)
            if mode == "bpda":
                stand_in = self._classify(self.defense.approx(x))
            else:
                stand_in = self._classify(
                    self.defense.surrogate(x, generator=self._generator(seed, x.device))
                )
            logits = stand_in + (real - stand_in).detach()
        self._check(logits, "the defense's logits")
        return logits

    # -- checks ----------------------------------------------------------------------------

    def _check(self, t: Tensor, what: str) -> None:
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise NonFiniteError(
                f"defense {self.name!r} gave NaN or inf in {what} ({bad} values) during "
                f"{self.stage} (grad={self.options.grad})"
            )

    def _check_purified(self, purified: Tensor, x: Tensor) -> None:
        """The defense's contract: same shape, the input's float dtype, finite, in [0, 1].

        Under autocast (``precision=bf16``) the dtype may be the autocast one.
        """
        where = f"during {self.stage} (grad={self.options.grad})"
        if purified.shape != x.shape:
            raise ContractViolation(
                f"defense {self.name!r} returned purified images of shape "
                f"{tuple(purified.shape)} for inputs of shape {tuple(x.shape)} {where}: purify "
                "must return images of its input's shape"
            )
        autocast = torch.is_autocast_enabled(x.device.type)
        if not purified.is_floating_point() or (purified.dtype != x.dtype and not autocast):
            raise ContractViolation(
                f"defense {self.name!r} returned purified images of dtype {purified.dtype} for "
                f"inputs of dtype {x.dtype} {where}: purify must keep its input's dtype"
            )
        self._check(purified, "purified images")
        low, high = (v.item() for v in torch.aminmax(purified.detach()))
        if low < 0 or high > 1:
            raise ContractViolation(
                f"defense {self.name!r} returned purified pixels in [{low:.6g}, {high:.6g}] "
                f"{where}: purify must return images in [0, 1]"
            )

    def _check_logits(self, logits: Tensor, n: int) -> None:
        """The classifier's contract on finite images: finite logits of shape ``(N, classes)``."""
        where = f"during {self.stage} (grad={self.options.grad})"
        if logits.dim() != 2 or len(logits) != n:
            raise ContractViolation(
                f"classifier {self.classifier_name!r} returned logits of shape "
                f"{tuple(logits.shape)} for {n} images {where}: expected (N, classes)"
            )
        if not torch.isfinite(logits).all():
            bad = (~torch.isfinite(logits)).sum().item()
            raise NonFiniteError(
                f"classifier {self.classifier_name!r} gave NaN or inf in {bad} logits of "
                f"finite images {where}: the classifier is broken, not defense {self.name!r}"
            )

    def _check_grad(self, watch: _InputWatch, grad: Tensor) -> Tensor | None:
        """Count the input gradient of one backward and its failures; zero non-finite entries.

        Returns the cleaned gradient, or ``None`` (unchanged) when it was finite.
        """
        n = len(grad)
        # One backward through the view runs through every EOT sample.
        self.counter.backward += n * self.eot_samples
        self.counter.gradients += n
        flat = grad.flatten(1)
        finite = torch.isfinite(flat).all(1)
        zero = (flat == 0).all(1) & finite
        # One device sync for both counts.
        n_finite, n_zero = torch.stack([finite.sum(), zero.sum()]).tolist()
        nonfinite = n - n_finite
        self.counter.grad_nonfinite += nonfinite
        if watch.cut:
            self.counter.grad_missing += n
        else:
            self.counter.grad_zero += n_zero
        if not nonfinite:
            return None
        # A NaN would turn the attack's step, then its images, into NaN: a zero entry is a step
        # not taken.
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def extra_repr(self) -> str:
        """Gradient mode, EOT and randomness, for ``print(view)``."""
        o = self.options
        return f"defense={self.name}, grad={o.grad}, eot={o.eot_samples}, randomness={o.randomness}"
