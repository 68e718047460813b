"""CARSO: Counter-Adversarial Recall of Synthetic Observations (Ballarin, Ansuini & Bortolussi).

TMLR 2025, https://arxiv.org/abs/2306.06081, code ``emaballarin/CARSO``. An adversarially
trained classifier is kept frozen; a conditional VAE learns to redraw the *clean* image from the
classifier's internal activations on a (possibly adversarial) input. At inference the input
reaches the purifier only through those activations: K latents are drawn from the prior, each is
decoded together with the compressed activations, every decoded image is classified, and the K
logit vectors are aggregated (by default with the authors' ``lexsemble``).

This file holds the aggregations (:func:`lexsemble`, :func:`aggregate`), the network
(:class:`CVAE`, built by :func:`arch` from a probe pass over the protected classifier), its
training (:func:`train`) and the defenses (:class:`CARSO`, and :class:`CARSOZero`, the
deterministic ``z = 0`` variant).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import seeds
from common.checks import choice, integer, positive_int, real
from common.errors import ConfigError
from common.progress import TrainingProgress
from defenses.base import Defense, DefenseInfo, PartContext

log = logging.getLogger(__name__)

PAPER = "https://arxiv.org/abs/2306.06081"
AGGREGATIONS = ("lexsemble", "mean_logits", "vote")
ATTACK_TERMS = ("ensemble_ce", "representation", "none")
ADV_ATTACKS = ("fgsm", "pgd")
# Upper bound on log a_j = logsumexp_k l_kj in lexsemble. exp(80) ~ 5.5e34, so a_j, the log-odds
# (|o_j| <= a_max + log C) and a cross-entropy on them stay finite in float32 (max ~3.4e38).
# It binds only for logits above ~78, which no sane classifier produces; there its gradient is 0.
LEXSEMBLE_LOG_MAX = 80.0


# -- aggregation ----------------------------------------------------------------------------------


def lexsemble(logits: Tensor) -> Tensor:
    """The authors' robust normalised doubly-exponential logit product, as log-odds.

    For logits ``l`` of shape ``(K, N, C)`` (K samples): ``a_j = sum_k exp(l_kj)``,
    ``p = softmax(a)`` and the output is ``o_j = log(p_j / (1 - p_j))``, shape ``(N, C)``.

    Computed without ``p``: ``log p_j - log(1 - p_j) = a_j - logsumexp_{i != j} a_i`` exactly,
    so a saturated ``p`` (one-hot in floating point, where the naive formula gives +-inf) still
    gives finite log-odds with a non-zero gradient. ``log a_j`` is a logsumexp over the samples
    (no overflow in the sum), clamped at :data:`LEXSEMBLE_LOG_MAX` so that ``a_j`` itself stays
    finite; the arithmetic runs in float64 and the result has the logits' dtype.

    Raises:
        ValueError: ``logits`` is not ``(K, N, C)`` with ``K >= 1`` and ``C >= 2``.
    """
    _check_logits(logits)
    log_a = torch.logsumexp(logits.double(), 0).clamp(max=LEXSEMBLE_LOG_MAX)
    a = log_a.exp()
    c = a.shape[-1]
    # Row j of `others` holds a with a_j masked out: logsumexp over i != j for every j at once.
    eye = torch.eye(c, dtype=torch.bool, device=a.device)
    others = a.unsqueeze(-2).expand(*a.shape[:-1], c, c).masked_fill(eye, -math.inf)
    return (a - torch.logsumexp(others, -1)).to(logits.dtype)


def aggregate(logits: Tensor, how: str = "lexsemble") -> Tensor:
    """Aggregate per-sample logits ``(K, N, C)`` into one score vector per image ``(N, C)``.

    * ``lexsemble``: :func:`lexsemble` (the authors' default).
    * ``mean_logits``: the mean of the logits over the samples.
    * ``vote``: the votes (argmax counts) plus the mean softmax probability, which lies in
      [0, 1] and sums to 1: the ranking is the majority vote with ties broken by the mean
      probability. The votes have no gradient; the tie-break term's is that of a soft vote.

    Raises:
        ConfigError: an unknown aggregation.
        ValueError: a bad logits shape.
    """
    choice("aggregation", how, AGGREGATIONS)
    _check_logits(logits)
    if how == "lexsemble":
        return lexsemble(logits)
    if how == "mean_logits":
        return logits.mean(0)
    votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0).to(logits.dtype)
    return votes + logits.softmax(-1).mean(0)


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 3 or logits.shape[0] < 1 or logits.shape[-1] < 2:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)}: expected (K, N, C) with K >= 1 samples "
            "and C >= 2 classes"
        )


# -- the classifier's internal representation ----------------------------------------------------


def select_modules(
    classifier: nn.Module, layer_types: Sequence[str], layers: Sequence[str]
) -> list[tuple[str, nn.Module]]:
    """The classifier's modules whose activations CARSO reads, in registration order.

    A module is selected when its class name is in ``layer_types`` (e.g. ``"ReLU"``,
    ``"Conv2d"``) or its qualified name (as in ``named_modules``) is in ``layers``. Nothing
    here knows any architecture.

    Raises:
        ConfigError: nothing matches, or a name in ``layers`` is not a module of the classifier.
    """
    named = [(n, m) for n, m in classifier.named_modules() if n]
    missing = sorted(set(layers) - {n for n, _ in named})
    if missing:
        raise ConfigError(f"layers={list(missing)!r} are not modules of the classifier")
    chosen = [(n, m) for n, m in named if type(m).__name__ in layer_types or n in layers]
    if not chosen:
        present = sorted({type(m).__name__ for _, m in named})
        raise ConfigError(
            f"no module of the classifier matches layer_types={list(layer_types)!r} or "
            f"layers={list(layers)!r}; its module types are {present}"
        )
    return chosen


@contextmanager
def recording(modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Collect the output of every call of ``modules`` while the context is open.

    Forward hooks, removed on exit (so that classifying the decoded images records nothing).
    A module called twice records twice, in call order.
    """
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"CARSO reads tensor activations; {type(module).__name__} returned "
                f"{type(out).__name__}"
            )
        seen.append(out)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _block2d(c_in: int, c_out: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def _block1d(f_in: int, f_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(f_in, f_out), nn.BatchNorm1d(f_out), nn.LeakyReLU(0.2))


def _compressor(
    shape: tuple[int, ...], depth: int, stride: int, min_channels: int
) -> tuple[nn.Module, int]:
    """One layer's compressor and its flattened output size.

    Feature maps ``(C, H, W)``: ``depth`` 3x3 conv blocks (BN, LeakyReLU 0.2) halving the
    channels (never below ``min_channels``); ``stride=1`` uses valid convolutions (the
    authors' CIFAR setting), ``stride=2`` padded ones. Any other activation is flattened and
    gets one linear block to ``max(F / 2**depth, min_channels)`` features.
    """
    if len(shape) == 3:
        c, h, w = shape
        blocks: list[nn.Module] = []
        for _ in range(depth):
            # A valid 3x3 convolution needs 3 pixels; smaller maps are padded instead.
            padding = 1 if stride > 1 or min(h, w) < 3 else 0
            c_out = max(c // 2, min_channels)
            blocks.append(_block2d(c, c_out, stride, padding))
            h = (h + 2 * padding - 3) // stride + 1
            w = (w + 2 * padding - 3) // stride + 1
            c = c_out
        return nn.Sequential(*blocks, nn.Flatten()), c * h * w
    features = math.prod(shape)
    out = max(features // 2**depth, min_channels)
    return nn.Sequential(nn.Flatten(), _block1d(features, out)), out


class CVAE(nn.Module):
    """CARSO's purifier: a conditional VAE conditioned on a classifier's internal activations.

    * **Compressors** (one per recorded activation, :func:`_compressor`), flattened,
      concatenated and mapped by a linear block to the conditioning code ``c`` (``code_dim``).
    * **Input encoder** (training only): stride-2 conv blocks over the image (channels
      ``encoder_channels``), concatenated with ``c``, a linear block to ``hidden``, and a
      linear "duplex" neck to ``mu`` and ``log sigma^2`` (``latent_dim`` each).
    * **Decoder**: ``[z, c]`` -> linear block to ``decoder_channels[0]`` maps of side
      ``ceil(H / 2**(len(decoder_channels) - 1))`` -> stride-2 transposed-conv blocks through the
      remaining channels -> 3x3 conv to the image channels, cropped to ``H x W`` -> sigmoid.

    The activations are recorded with forward hooks on the classifier's modules chosen by
    ``layer_types`` / ``layers`` (:func:`select_modules`); ``activation_shapes`` comes from a
    probe pass (:func:`arch`) and is checked at every use, so a different classifier fails
    loudly instead of feeding the compressors the wrong maps.

    Args:
        image_shape: ``(C, H, W)`` of the images.
        num_classes: classes of the dataset (size of the class-code table).
        activation_shapes: per recorded activation, its shape without the batch dimension.
        layer_types: class names of the recorded modules.
        layers: qualified names of further recorded modules.
        compressor_depth: conv blocks per compressor.
        compressor_stride: 1 (valid convolutions) or 2.
        compressor_min_channels: lower bound of the compressors' channel halving.
        code_dim: size of the conditioning code ``c``.
        encoder_channels: channels of the input encoder's stride-2 blocks.
        hidden: the encoder's joint linear block.
        latent_dim: size of ``z``.
        decoder_channels: channels of the decoder's first maps and of each upsampling block.

    Example:
        >>> net = arch(ctx)  # probes ctx.classifier
        >>> x_hat = net.decode(torch.zeros(4, net.latent_dim), net.code(classifier, x))
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        activation_shapes: Sequence[Sequence[int]],
        *,
        layer_types: Sequence[str] = ("ReLU",),
        layers: Sequence[str] = (),
        compressor_depth: int = 2,
        compressor_stride: int = 2,
        compressor_min_channels: int = 8,
        code_dim: int = 64,
        encoder_channels: Sequence[int] = (4, 8),
        hidden: int = 64,
        latent_dim: int = 16,
        decoder_channels: Sequence[int] = (64, 32, 16),
    ) -> None:
        super().__init__()
        integer("num_classes", num_classes, minimum=2)
        positive_int("compressor_depth", compressor_depth)
        positive_int("compressor_min_channels", compressor_min_channels)
        positive_int("code_dim", code_dim)
        positive_int("hidden", hidden)
        positive_int("latent_dim", latent_dim)
        choice("compressor_stride", compressor_stride, (1, 2))
        for name, seq in (
            ("encoder_channels", encoder_channels),
            ("decoder_channels", decoder_channels),
        ):
            if not seq or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in seq):
                raise ConfigError(f"{name}={list(seq)!r} must be a non-empty list of positive ints")
        encoder_channels, decoder_channels = tuple(encoder_channels), tuple(decoder_channels)
        if not activation_shapes:
            raise ConfigError("activation_shapes=[]: CARSO needs at least one activation")
        self.image_shape = tuple(int(v) for v in image_shape)
        self.activation_shapes = [tuple(int(v) for v in s) for s in activation_shapes]
        self.layer_types, self.layers = tuple(layer_types), tuple(layers)
        self.latent_dim, self.code_dim = latent_dim, code_dim
        c_img, h, w = self.image_shape

        comps, total = [], 0
        for shape in self.activation_shapes:
            comp, size = _compressor(
                shape, compressor_depth, compressor_stride, compressor_min_channels
            )
            comps.append(comp)
            total += size
        self.compressors = nn.ModuleList(comps)
        self.joint = _block1d(total, code_dim)

        enc: list[nn.Module] = []
        c, eh, ew = c_img, h, w
        for ch in encoder_channels:
            enc += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2)]
            c, eh, ew = ch, (eh - 1) // 2 + 1, (ew - 1) // 2 + 1
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.encoder_joint = _block1d(c * eh * ew + code_dim, hidden)
        self.neck = nn.Linear(hidden, 2 * latent_dim)

        ups = len(decoder_channels) - 1
        self.side = (math.ceil(h / 2**ups), math.ceil(w / 2**ups))
        first = decoder_channels[0]
        self.decoder_in = _block1d(latent_dim + code_dim, first * self.side[0] * self.side[1])
        dec: list[nn.Module] = []
        for c_in, c_out in zip(decoder_channels[:-1], decoder_channels[1:], strict=True):
            dec += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2),
            ]
        dec.append(nn.Conv2d(decoder_channels[-1], c_img, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        # Mean conditioning code per class on clean training images (filled by `train`), for
        # the representation-level attack term.
        self.register_buffer("class_codes", torch.zeros(num_classes, code_dim))

    # -- conditioning -----------------------------------------------------------------------

    def activations(self, classifier: nn.Module, x: Tensor) -> list[Tensor]:
        """The classifier's recorded activations on ``x`` (one forward pass of the classifier)."""
        modules = [m for _, m in select_modules(classifier, self.layer_types, self.layers)]
        with recording(modules) as seen:
            classifier(x)
        shapes = [tuple(a.shape[1:]) for a in seen]
        if shapes != self.activation_shapes:
            raise RuntimeError(
                f"the classifier's recorded activations have shapes {shapes}, but this CVAE was "
                f"built for {self.activation_shapes}: it conditions on another classifier"
            )
        return list(seen)

    def compress(self, activations: Sequence[Tensor]) -> Tensor:
        """The conditioning code ``c`` ``(N, code_dim)`` from recorded activations."""
        parts = [comp(a) for comp, a in zip(self.compressors, activations, strict=True)]
        return self.joint(torch.cat(parts, 1))

    def code(self, classifier: nn.Module, x: Tensor) -> Tensor:
        """``c(x)``: the compressed activations of ``classifier`` on ``x``."""
        return self.compress(self.activations(classifier, x))

    # -- encoder and decoder ----------------------------------------------------------------

    def encode(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log sigma^2)`` of the approximate posterior of ``z`` (training only)."""
        h = self.encoder_joint(torch.cat([self.encoder(x), c], 1))
        mu, logvar = self.neck(h).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: Tensor, c: Tensor) -> Tensor:
        """Pre-sigmoid images ``(N, C, H, W)`` from latents ``z`` and codes ``c``."""
        h = self.decoder_in(torch.cat([z, c], 1))
        h = h.view(len(z), -1, *self.side)
        _, height, width = self.image_shape
        return self.decoder(h)[..., :height, :width]

    def decode(self, z: Tensor, c: Tensor) -> Tensor:
        """Images in [0, 1] from latents ``z`` ``(N, latent_dim)`` and codes ``c``."""
        return torch.sigmoid(self.decode_logits(z, c))

    def loss_terms(
        self, x_in: Tensor, x_clean: Tensor, c: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-image summed BCE to ``x_clean`` and KL to the prior, both ``(N,)``.

        ``x_in`` is the encoder's input (clean or adversarial), ``c`` its code and ``noise``
        the reparameterisation's standard normal draw.
        """
        mu, logvar = self.encode(x_in, c)
        z = mu + (0.5 * logvar).exp() * noise
        bce = (
            F.binary_cross_entropy_with_logits(self.decode_logits(z, c), x_clean, reduction="none")
            .flatten(1)
            .sum(1)
        )
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(1)
        return bce, kl


def arch(
    ctx: PartContext,
    *,
    layer_types: Sequence[str] = ("ReLU",),
    layers: Sequence[str] = (),
    **kwargs: Any,
) -> CVAE:
    """The CVAE for ``ctx``'s images and classifier (the factory of CARSO's ``TrainedPart``).

    A probe pass of ``ctx.classifier`` on two training images finds the recorded activations
    and their shapes; every other argument is :class:`CVAE`'s.

    Raises:
        ConfigError: ``ctx.classifier`` is missing (the part needs ``uses_classifier: true``).
    """
    f = _protected_classifier(
        ctx, "CARSO's CVAE is built from the protected classifier's activations"
    )
    layer_types, layers = tuple(layer_types), tuple(layers)
    modules = [m for _, m in select_modules(f, layer_types, layers)]
    with torch.no_grad(), recording(modules) as seen:
        f(ctx.x_train[:2].to(ctx.device))
    shapes = [tuple(a.shape[1:]) for a in seen]
    log.info("CARSO conditions on %d activations of shapes %s", len(shapes), shapes)
    return CVAE(
        ctx.shape, ctx.num_classes, shapes, layer_types=layer_types, layers=layers, **kwargs
    )


def _protected_classifier(ctx: PartContext, why: str) -> nn.Module:
    """``ctx.classifier``; refuses a part whose config does not hand it over."""
    if ctx.classifier is None:
        raise ConfigError(f"{why}: its TrainedPart needs uses_classifier: true")
    return ctx.classifier


# -- training --------------------------------------------------------------------------------


def craft(
    classifier: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    kind: str,
    eps: float,
    steps: int = 5,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial examples against the classifier alone (Linf): FGSM or PGD with random start.

    PGD takes ``steps`` steps of ``step_size`` (``None``: ``2.5 * eps / steps``, Madry et al.'s
    rule) from a uniform start in the ball, drawn from ``generator``.
    """
    choice("kind", kind, ADV_ATTACKS)
    x = x.detach()
    if kind == "fgsm":
        adv, n_steps, alpha = x.clone(), 1, eps
    else:
        where = generator.device if generator is not None else x.device
        start = torch.rand(x.shape, generator=generator, device=where).to(x.device)
        alpha = 2.5 * eps / steps if step_size is None else step_size
        adv, n_steps = (x + (2 * start - 1) * eps).clamp(0, 1), steps
    for _ in range(n_steps):
        with torch.enable_grad():
            xg = adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(classifier(xg), y), xg)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


def beta_at(step: int, steps: int, beta: float, delay: float, warmup: float) -> float:
    """KL weight at ``step`` of ``steps``.

    0 for the first ``delay`` fraction of the steps, then linear to ``beta`` over the next
    ``warmup`` fraction (the authors: 12.5 % and ~4 % of the epochs).
    """
    t = step / steps - delay
    if t < 0:
        return 0.0
    return beta if warmup <= 0 else beta * min(t / warmup, 1.0)


def train(
    net: CVAE,
    ctx: PartContext,
    *,
    steps: int,
    eps: float,
    batch_size: int = 128,
    lr: float = 1e-3,
    adv_fraction: float = 0.5,
    adv_attacks: Sequence[str] = ("pgd",),
    pgd_steps: int = 5,
    pgd_step_size: float | None = None,
    beta: float = 1.0,
    beta_delay: float = 0.0,
    beta_warmup: float = 0.3,
    samples: int = 8,
    log_every: int = 50,
    eval_samples: int = 1000,
) -> dict[str, Any]:
    """Train CARSO's CVAE in place against the frozen ``ctx.classifier``.

    Per step: a random batch; its first ``round(adv_fraction * batch_size)`` images are replaced
    by adversarial examples crafted against the classifier alone (:func:`craft`, one attack of
    ``adv_attacks`` drawn per batch, Linf ``eps``, PGD with ``pgd_steps`` steps of
    ``pgd_step_size``); the CVAE encodes the (mixed) input,
    conditions on the classifier's activations on it and reconstructs the **clean** image. Adam
    on ``mean(sum BCE + beta_t * KL)`` with ``beta_t`` from :func:`beta_at`.

    Returns the loss curve (every ``log_every`` steps: loss, BCE, KL, beta), the time taken, the
    class-code table's fill, and on the first ``eval_samples`` test images: BCE / KL, the
    accuracy of CARSO (``samples`` prior samples, lexsemble) and of the bare classifier, clean
    and under PGD against the classifier alone.
    """
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    positive_int("samples", samples)
    positive_int("log_every", log_every)
    positive_int("eval_samples", eval_samples)
    real("lr", lr, "> 0", lambda v: v > 0)
    real("adv_fraction", adv_fraction, "in [0, 1]", lambda v: 0 <= v <= 1)
    real("beta", beta, ">= 0", lambda v: v >= 0)
    real("beta_delay", beta_delay, "in [0, 1)", lambda v: 0 <= v < 1)
    real("beta_warmup", beta_warmup, "in [0, 1]", lambda v: 0 <= v <= 1)
    n_adv = round(adv_fraction * batch_size)
    adversary = _Adversary(n_adv, tuple(adv_attacks), eps, pgd_steps, pgd_step_size)
    f = _protected_classifier(ctx, "CARSO's training needs the protected classifier")
    data = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.DATA))
    noise = torch.Generator(device=ctx.device)
    noise.manual_seed(seeds.training(ctx.seed, seeds.Stream.NOISE))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    progress = TrainingProgress("train CARSO CVAE", steps, log_every, logger=log)
    for step in progress:
        idx = torch.randint(len(ctx.x_train), (batch_size,), generator=data)
        x, y = ctx.x_train[idx].to(ctx.device), ctx.y_train[idx].to(ctx.device)
        x_in = adversary.mix(f, x, y, data, noise)
        with torch.no_grad():  # the classifier is frozen: its activations need no graph
            acts = net.activations(f, x_in)
        z_noise = torch.randn(len(x), net.latent_dim, generator=noise, device=ctx.device)
        bce, kl = net.loss_terms(x_in, x, net.compress(acts), z_noise)
        b = beta_at(step, steps, beta, beta_delay, beta_warmup)
        loss = (bce + b * kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = {"loss": loss.item(), "bce": bce.mean().item(), "kl": kl.mean().item()}
        progress.update(step, **values, last={"beta": b})
    net.eval()
    _fill_class_codes(net, ctx)
    held_out = _held_out(net, ctx, eps=eps, pgd_steps=pgd_steps, samples=samples, n=eval_samples)
    _log_training(progress, held_out, pgd_steps)
    return {"loss_curve": progress.curve, **held_out, "train_s": progress.elapsed}


@dataclass(frozen=True)
class _Adversary:
    """The adversarial part of :func:`train`'s batches (see there).

    Attributes:
        n_adv: images per batch replaced by adversarial ones (the first ``n_adv``).
        attacks: the attacks of :func:`craft`, one drawn per batch.
        eps: their Linf radius.
        pgd_steps: PGD's steps.
        pgd_step_size: PGD's step size (``None``: :func:`craft`'s rule).
    """

    n_adv: int
    attacks: tuple[str, ...]
    eps: float
    pgd_steps: int
    pgd_step_size: float | None

    def __post_init__(self) -> None:
        real("eps", self.eps, "> 0", lambda v: v > 0)
        positive_int("pgd_steps", self.pgd_steps)
        if self.pgd_step_size is not None:
            real("pgd_step_size", self.pgd_step_size, "> 0", lambda v: v > 0)
        if not self.attacks or any(a not in ADV_ATTACKS for a in self.attacks):
            raise ConfigError(
                f"adv_attacks={list(self.attacks)!r} is not allowed; allowed: a non-empty list "
                f"of {', '.join(ADV_ATTACKS)}"
            )

    def mix(
        self,
        f: nn.Module,
        x: Tensor,
        y: Tensor,
        data: torch.Generator,
        noise: torch.Generator,
    ) -> Tensor:
        """``x`` with its first ``n_adv`` images attacked; the attack is drawn from ``data``."""
        if not self.n_adv:
            return x
        kind = self.attacks[int(torch.randint(len(self.attacks), (1,), generator=data))]
        adv = craft(
            f,
            x[: self.n_adv],
            y[: self.n_adv],
            kind=kind,
            eps=self.eps,
            steps=self.pgd_steps,
            step_size=self.pgd_step_size,
            generator=noise,
        )
        return torch.cat([adv, x[self.n_adv :]])


def _log_training(progress: TrainingProgress, h: dict[str, float], pgd_steps: int) -> None:
    log.info(
        "CARSO CVAE trained in %.0f s: test BCE %.2f, KL %.2f; clean acc %.3f (bare %.3f), "
        "PGD-%d on the classifier %.3f (bare %.3f)",
        progress.elapsed,
        h["test_bce"],
        h["test_kl"],
        h["test_acc"],
        h["bare_acc"],
        pgd_steps,
        h["test_acc_pgd"],
        h["bare_acc_pgd"],
    )


@torch.no_grad()
def _fill_class_codes(net: CVAE, ctx: PartContext, n: int = 2000) -> None:
    """Mean conditioning code per class over the first ``n`` clean training images."""
    f = ctx.classifier
    sums = torch.zeros_like(net.class_codes)
    counts = torch.zeros(len(sums), device=sums.device)
    for i in range(0, min(n, len(ctx.x_train)), 250):
        x = ctx.x_train[i : min(i + 250, n)].to(ctx.device)
        y = ctx.y_train[i : min(i + 250, n)].to(ctx.device)
        sums.index_add_(0, y, net.code(f, x))
        counts.index_add_(0, y, torch.ones(len(y), device=sums.device))
    net.class_codes.copy_(sums / counts.clamp_min(1)[:, None])


def _held_out(
    net: CVAE, ctx: PartContext, *, eps: float, pgd_steps: int, samples: int, n: int
) -> dict[str, float]:
    """Reconstruction and accuracy on the first ``n`` test images (see :func:`train`)."""
    f = ctx.classifier
    g = torch.Generator(device=ctx.device)
    g.manual_seed(seeds.training(ctx.seed, seeds.Stream.HELD_OUT))
    x_all, y_all = ctx.x_test[:n], ctx.y_test[:n]
    sums = dict.fromkeys(
        ("test_bce", "test_kl", "test_acc", "bare_acc", "test_acc_pgd", "bare_acc_pgd"), 0.0
    )
    for i in range(0, len(x_all), 250):
        x, y = x_all[i : i + 250].to(ctx.device), y_all[i : i + 250].to(ctx.device)
        x_adv = craft(f, x, y, kind="pgd", eps=eps, steps=pgd_steps, generator=g)
        with torch.no_grad():
            c = net.code(f, x)
            z = torch.randn(len(x), net.latent_dim, generator=g, device=ctx.device)
            bce, kl = net.loss_terms(x, x, c, z)
            sums["test_bce"] += bce.sum().item()
            sums["test_kl"] += kl.sum().item()
            for key, inp in (("test_acc", x), ("test_acc_pgd", x_adv)):
                pred = _ensemble(net, f, f, inp, samples, g).argmax(1)
                sums[key] += (pred == y).sum().item()
            sums["bare_acc"] += (f(x).argmax(1) == y).sum().item()
            sums["bare_acc_pgd"] += (f(x_adv).argmax(1) == y).sum().item()
    return {k: v / max(len(x_all), 1) for k, v in sums.items()}


def _sample_logits(
    net: CVAE,
    conditioner: nn.Module,
    classifier: nn.Module,
    x: Tensor,
    z: Tensor,
) -> Tensor:
    """Logits ``(K, N, C)`` of ``classifier`` on the K decodings of latents ``z`` ``(K, N, d)``."""
    k, n, d = z.shape
    c = net.code(conditioner, x)
    decoded = net.decode(z.reshape(k * n, d), c.repeat(k, 1))
    return classifier(decoded).view(k, n, -1)


def _ensemble(
    net: CVAE,
    conditioner: nn.Module,
    classifier: nn.Module,
    x: Tensor,
    samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    where = generator.device if generator is not None else x.device
    z = torch.randn(samples, len(x), net.latent_dim, generator=generator, device=where)
    return lexsemble(_sample_logits(net, conditioner, classifier, x, z.to(x.device)))


# -- the defenses ----------------------------------------------------------------------------


class CARSO(Defense):
    """CARSO, Ballarin, Ansuini & Bortolussi, TMLR 2025 [https://arxiv.org/abs/2306.06081].

    The decision on ``x`` (:meth:`predict`): record the protected classifier's activations on
    ``x`` and compress them to ``c(x)``; draw ``samples`` latents ``z_k ~ N(0, I)``; decode
    ``x_k = Dec(z_k, c(x))``; classify every ``x_k``; aggregate the K logit vectors
    (:func:`aggregate`: the authors' ``lexsemble`` by default, ``mean_logits`` or ``vote``).
    :meth:`purify` returns one decoded sample (so ``classifier(purify(x))`` is the K = 1
    decision). The classifier comes from :meth:`bind` (the harness calls it); the activations
    are always read from the bound classifier (the one the CVAE was trained on), while
    :meth:`predict` classifies the decoded images with the classifier it is given (the
    authors' ``classif_replacement``).

    Properties: stochastic (fresh latents per call, from ``generator`` only), differentiable
    (exactly and cheaply: the input reaches the output only through the classifier's
    activations, the compressors, the decoder and the classifier), not iterative.
    ``2 * samples + 1`` network passes per decision (1 classifier pass for the activations, K
    decoder and K classifier passes).

    Gradient hooks: :meth:`approx` is the identity (BPDA's default: the decoder is trained to
    give back the clean image, so ``purify(x) ~ x`` is BPDA's assumption; CARSO being fully
    differentiable, BPDA is only a baseline). ``surrogate`` is one decoded sample, so
    ``grad=surrogate`` keeps the decision's value and takes one sample's gradient. Both keep
    the *value* of the aggregated decision, so a cross-entropy on it, which saturates (see
    :func:`lexsemble`: doubly exponential in the logits), gives them no gradient: attack them
    with the margin loss. :meth:`attack_loss` offers a term that bypasses the saturating
    aggregator (``attack_term``, see there).

    Arguments:
        cvae (nn.Module): the purifier (:class:`CVAE`; a ``TrainedPart`` until the harness
            resolves it).
        samples (int): K, latents per decision. (Default: 8)
        aggregation (str): ``lexsemble``, ``mean_logits`` or ``vote``. (Default: lexsemble)
        attack_term (str): what :meth:`attack_loss` returns: ``ensemble_ce``,
            ``representation`` or ``none``. (Default: ensemble_ce)

    Shape:
        - Input: ``(N, C, H, W)`` in [0, 1].
        - Output: ``purify``: ``(N, C, H, W)`` in [0, 1]; ``predict``: ``(N, classes)``.

    Example:
        >>> defense = CARSO(cvae, samples=8); defense.bind(classifier)
        >>> logits = defense.predict(classifier, x, generator=torch.Generator().manual_seed(0))
    """

    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=True,
        differentiable=True,
        iterative=False,
        paper=PAPER,
        purifier_calls=17,  # K = 8: calls_per_purify gives 2K + 1 for other K
    )

    def __init__(
        self,
        cvae: nn.Module,
        samples: int = 8,
        aggregation: str = "lexsemble",
        attack_term: str = "ensemble_ce",
    ) -> None:
        super().__init__()
        if not isinstance(cvae, nn.Module):
            raise ConfigError(f"cvae={cvae!r} must be an nn.Module (CARSO's CVAE)")
        if isinstance(samples, int) and not isinstance(samples, bool) and samples == 0:
            raise ConfigError(
                "samples=0 must be an integer >= 1; the authors' z = 0 variant "
                "(ensemble_size 0) is CARSOZero (conf/defense/carso_z0.yaml)"
            )
        self.cvae = cvae
        self.samples = positive_int("samples", samples)
        self.aggregation = choice("aggregation", aggregation, AGGREGATIONS)
        self.attack_term = choice("attack_term", attack_term, ATTACK_TERMS)
        # A tuple keeps the classifier out of the module tree (not moved, counted or saved).
        self._bound: tuple[nn.Module, ...] = ()

    @property
    def calls_per_purify(self) -> int:
        """Network passes per decision: one for the activations, K decoders, K classifiers."""
        return 2 * self.samples + 1

    def bind(self, classifier: nn.Module) -> None:
        """Keep the classifier whose activations condition the decoder."""
        self._bound = (classifier,)

    @property
    def conditioner(self) -> nn.Module:
        """The bound classifier.

        Raises:
            RuntimeError: :meth:`bind` has not been called.
        """
        if not self._bound:
            raise RuntimeError(
                "CARSO conditions on the protected classifier's activations: call "
                "bind(classifier) first (the harness's prepare_parts does)"
            )
        return self._bound[0]

    def _latents(self, k: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """``(k, N, latent_dim)`` prior draws from ``generator`` (on its device, then moved).

        With ``generator=None`` the draws are fresh, from torch's default generator of
        ``x``'s device.
        """
        where = generator.device if generator is not None else x.device
        z = torch.randn(
            k, len(x), self.cvae.latent_dim, generator=generator, device=where, dtype=x.dtype
        )
        return z.to(x.device)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """One decoded sample ``Dec(z, c(x))``, ``z`` drawn from ``generator``."""
        z = self._latents(1, x, generator)[0]
        return self.cvae.decode(z, self.cvae.code(self.conditioner, x))

    def sample_logits(
        self, classifier: nn.Module, x: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """The K decoded samples' logits ``(K, N, C)``, before aggregation."""
        z = self._latents(self.samples, x, generator)
        return _sample_logits(self.cvae, self.conditioner, classifier, x, z)

    def predict(
        self, classifier: nn.Module, x: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """The aggregated scores ``(N, C)`` of the K decoded samples (argmax = the decision)."""
        return aggregate(self.sample_logits(classifier, x, generator=generator), self.aggregation)

    def attack_loss(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor | None:
        """A per-image term ``(N,)`` that bypasses the aggregator, for defense-aware attacks.

        The labels are not passed to this hook, so the current decision ``y_hat`` (argmax of
        :meth:`predict`, without gradient) stands in for them; attacks only run on correctly
        classified images, where ``y_hat`` is the label until the image is fooled.

        * ``ensemble_ce``: the mean over K fresh samples of ``CE(l_k, y_hat)``, which does not
          saturate when the doubly-exponential aggregate does (the adaptive attack of
          docs/defenses/carso.md).
        * ``representation``: ``||c(x) - m_yhat||^2 - min_{j != y_hat} ||c(x) - m_j||^2`` with
          ``m_j`` the mean clean code of class ``j`` (stored at training): pushes the
          conditioning code, the decoder's only view of the input, towards the nearest other
          class. Costs one classifier pass (no decoding) beyond the decision.
        * ``none``: no term.

        The latents come from ``generator`` only (the attack view's own stream): the same
        generator state gives the same term, and torch's global RNG is never drawn from. With
        ``generator=None`` they are fresh draws from torch's default generator, as in
        :meth:`purify`.
        """
        if self.attack_term == "none":
            return None
        f = self.conditioner
        z = self._latents(self.samples, x, generator)
        if self.attack_term == "ensemble_ce":
            logits = _sample_logits(self.cvae, f, f, x, z)
            y_hat = aggregate(logits.detach(), self.aggregation).argmax(1)
            k, n, c = logits.shape
            return (
                F.cross_entropy(logits.reshape(k * n, c), y_hat.repeat(k), reduction="none")
                .view(k, n)
                .mean(0)
            )
        with torch.no_grad():
            y_hat = aggregate(_sample_logits(self.cvae, f, f, x, z), self.aggregation).argmax(1)
        codes = self.cvae.class_codes
        dist = (self.cvae.code(f, x).unsqueeze(1) - codes.unsqueeze(0)).square().sum(-1)
        own = dist.gather(1, y_hat[:, None]).squeeze(1)
        other = dist.scatter(1, y_hat[:, None], math.inf).amin(1)
        return own - other


class CARSOZero(CARSO):
    """CARSO with the latent fixed at ``z = 0`` (the authors' ``ensemble_size = 0``).

    [https://arxiv.org/abs/2306.06081]. One deterministic decoding ``Dec(0, c(x))`` per
    decision, classified and passed through the aggregation (order-preserving for K = 1); the
    generator is ignored.

    Properties: deterministic, differentiable, not iterative; 3 network passes per decision.

    Arguments:
        cvae (nn.Module): the purifier (:class:`CVAE`).
        samples (int): must be 1 (one decoding, at z = 0). (Default: 1)
        aggregation (str): as :class:`CARSO`. (Default: lexsemble)
        attack_term (str): as :class:`CARSO`. (Default: ensemble_ce)

    Example:
        >>> defense = CARSOZero(cvae); defense.bind(classifier)
        >>> logits = defense.predict(classifier, x)
    """

    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=False, differentiable=True, iterative=False, paper=PAPER, purifier_calls=3
    )

    def __init__(
        self,
        cvae: nn.Module,
        samples: int = 1,
        aggregation: str = "lexsemble",
        attack_term: str = "ensemble_ce",
    ) -> None:
        if samples != 1 or isinstance(samples, bool):
            raise ConfigError(
                f"samples={samples!r} must be 1: CARSOZero decodes once, at z = 0 (use CARSO "
                "for K prior samples)"
            )
        super().__init__(cvae, samples=1, aggregation=aggregation, attack_term=attack_term)

    def _latents(self, k: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.zeros(k, len(x), self.cvae.latent_dim, device=x.device, dtype=x.dtype)
