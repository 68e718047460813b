"""AToP: the random transforms, the inpainting purifier, both training stages and the configs.

Random-weight inpainters on 8x8 and 28x28 images keep the transform, contract and gradient
tests at CPU speed; the training tests run a few steps on scikit-learn's digits against an
untrained tiny classifier, with a temporary cache.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from bench.engine.plan import declared_view
from bench.models.parts import prepare_parts
from common.errors import ConfigError
from defenses.atop import AToP, Inpainter, RandomTransform, _fgsm, finetune, inpaint, pretrain
from defenses.base import PartContext
from tests.test_defense_contract import check_contract, tiny_classifier

# What tiny_classifier reads of a dataset.
DIGITS = SimpleNamespace(shape=(1, 8, 8), num_classes=10)


def images(n: int = 6, size: int = 8, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def net(width: int = 4) -> Inpainter:
    torch.manual_seed(0)
    return Inpainter(1, width=width).eval().requires_grad_(False)


class Recorder(nn.Module):
    """Returns its masked input unchanged and keeps every (input, mask) it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        self.seen.append((x, mask))
        return x


# -- 1. the random transforms -------------------------------------------------------------------


@pytest.mark.parametrize(("size", "grid", "block"), [(28, 4, 7), (8, 4, 2), (256, 8, 32)])
def test_block_grid_follows_the_image_size(size: int, grid: int, block: int) -> None:
    ids = RandomTransform(grid=grid).block_ids(size, size)
    assert ids.shape == (size, size) and ids.unique().numel() == grid**2
    # Every block is a block x block square.
    assert all(int((ids == b).sum()) == block * block for b in range(grid**2))
    assert ids[0, block - 1] == 0 and ids[0, block] == 1 and ids[block, 0] == grid


@pytest.mark.parametrize("size", [8, 28])
def test_rt2_masks_miss_the_configured_fraction_of_blocks(size: int) -> None:
    rt = RandomTransform("rt2", grid=4, missing=0.25)
    masks = rt.masks(50, size, size, generator=gen(), device=torch.device("cpu"))
    assert masks.shape == (1, 50, 1, size, size)
    ids = rt.block_ids(size, size)
    for m in masks[0, :, 0]:
        missing = {int(b) for b in ids[m.bool()].unique()}
        assert len(missing) == 4, "4 of 16 blocks"
        # Whole blocks only: a missing block is missing at every one of its pixels.
        assert all(bool(m[ids == b].all()) for b in missing)
    assert masks.mean() == pytest.approx(0.25)
    # Images of a batch get different masks.
    assert not torch.equal(masks[0, 0], masks[0, 1])


def test_rt3_masks_partition_the_blocks() -> None:
    rt = RandomTransform("rt3", grid=4, n_masks=4)
    masks = rt.masks(20, 28, 28, generator=gen(), device=torch.device("cpu"))
    assert masks.shape == (4, 20, 1, 28, 28)
    assert torch.equal(masks.sum(0), torch.ones(20, 1, 28, 28)), "each pixel in exactly one"
    ids = rt.block_ids(28, 28)
    for k in range(4):
        for i in range(20):
            assert ids[masks[k, i, 0].bool()].unique().numel() == 4, "a quarter of the blocks"
    assert rt.passes == 4 and RandomTransform("rt2").passes == 1


def test_noise_is_additive_then_clipped_and_the_mask_multiplicative() -> None:
    x = images(4, 28) * 0.5 + 0.25  # away from the clip, so every kept pixel has gradient 1
    recorder = Recorder()
    rt = RandomTransform("rt2", sigma=0.01)
    out = inpaint(recorder, rt, x.clone().requires_grad_(True), generator=gen())
    masked, mask = recorder.seen[0]
    assert torch.equal(masked.detach(), out.detach())
    assert (masked[mask.bool()] == 0).all(), "missing blocks are zeroed"
    kept = ~mask.bool()
    assert (masked[kept] - x[kept]).abs().max() < 0.06 and not torch.equal(masked[kept], x[kept])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(inpaint(Recorder(), rt, xg, generator=gen()).sum(), xg)
    assert torch.equal(grad, (1 - mask).expand_as(grad)), "d out / d x = 1 kept, 0 missing"
    # RT1 has no noise: the kept pixels are the input's.
    recorder = Recorder()
    inpaint(recorder, RandomTransform("rt1"), x, generator=gen())
    masked, mask = recorder.seen[0]
    assert torch.equal(masked[~mask.bool()], x[~mask.bool()])


def test_rt3_runs_one_pass_per_mask_and_merges_the_filled_blocks() -> None:
    recorder = Recorder()
    x = images(3, 8)
    rt = RandomTransform("rt3", sigma=0.0)
    out = inpaint(recorder, rt, x, generator=gen())
    assert len(recorder.seen) == 4
    # The recorder returns each masked copy, which is zero exactly where that copy is missing,
    # so merging the filled blocks of identity "inpaintings" gives zeros everywhere.
    assert torch.equal(out, torch.zeros_like(x))
    # A network that fills with ones: the merge is all ones.
    ones = inpaint(lambda z, m: torch.ones_like(z), rt, x, generator=gen())
    assert torch.equal(ones, torch.ones_like(x))


# -- 2. the defense -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rt",
    [
        RandomTransform("rt1"),
        RandomTransform("rt2"),
        RandomTransform("rt3"),
        RandomTransform("rt2", resize=16),
    ],
    ids=["rt1", "rt2", "rt3", "rt2-resize"],
)
def test_keeps_the_defense_contract(rt: RandomTransform) -> None:
    check_contract(AToP(net(), rt), images(4, 8))


@pytest.mark.parametrize("kind", ["rt2", "rt3"])
def test_shape_range_and_reproducibility(kind: str) -> None:
    defense, x = AToP(net(), RandomTransform(kind)), images(5, 28)
    out = defense.purify(x, generator=gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(defense.purify(x, generator=gen(3)), out)
    assert not torch.equal(defense.purify(x, generator=gen(4)), out)
    # Without a generator: fresh randomness on every call.
    assert not torch.equal(defense.purify(x), defense.purify(x))
    with torch.no_grad():
        assert torch.equal(defense.purify(x, generator=gen(3)), out)


def test_resize_runs_the_inpainter_at_the_configured_size() -> None:
    recorder = Recorder()
    x = images(2, 8)
    out = inpaint(recorder, RandomTransform("rt2", grid=4, resize=32), x, generator=gen())
    assert recorder.seen[0][0].shape[-2:] == (32, 32) and out.shape == x.shape


@pytest.mark.parametrize(
    "rt", [RandomTransform("rt2"), RandomTransform("rt3", resize=16)], ids=["rt2", "rt3-resize"]
)
def test_gradients_flow_end_to_end(rt: RandomTransform) -> None:
    defense = AToP(net(), rt)
    classifier = tiny_classifier(DIGITS)
    x = images(4, 8).requires_grad_(True)
    loss = F.cross_entropy(classifier(defense.purify(x, generator=gen())), torch.arange(4))
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and (grad != 0).any()


def test_calls_per_purify_counts_the_inpainter_passes() -> None:
    assert AToP(net(), RandomTransform("rt2")).calls_per_purify == 1
    assert AToP(net(), RandomTransform("rt3", n_masks=4)).calls_per_purify == 4
    assert AToP.info.stochastic and AToP.info.differentiable and not AToP.info.iterative
    x = images(2, 8)
    defense = AToP(net(), RandomTransform("rt2"))
    torch.testing.assert_close(defense.approx(x), x)  # BPDA identity, as the authors' ablations


# -- 3. bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "rt4"}, "kind='rt4'"),
        ({"sigma": -0.1}, "sigma=-0.1"),
        ({"grid": 0}, "grid=0"),
        ({"missing": 1.0}, "missing=1.0"),
        ({"n_masks": 1}, "n_masks=1"),
        ({"kind": "rt3", "grid": 1, "n_masks": 2}, "n_masks=2 must be at most grid"),
        ({"grid": 8, "resize": 4}, "resize=4"),
    ],
)
def test_bad_transform_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RandomTransform(**kwargs)


def test_bad_defense_and_training_arguments_name_the_value() -> None:
    with pytest.raises(ConfigError, match="grid=8 needs images of at least 8x8"):
        AToP(net(), RandomTransform(grid=8)).purify(images(1, 4))
    with pytest.raises(ConfigError, match="purifier='unet'"):
        AToP("unet")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rt=0.25"):
        AToP(net(), 0.25)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="width=0"):
        Inpainter(1, width=0)
    ctx = _ctx()
    with pytest.raises(ConfigError, match="steps=0"):
        pretrain(Inpainter(1, width=4), ctx, rt=RandomTransform(), steps=0)
    with pytest.raises(ConfigError, match="protected classifier"):
        finetune(Inpainter(1, width=4), ctx, rt=RandomTransform(), eps=0.1, steps=1)
    with pytest.raises(ConfigError, match="lam=-1"):
        finetune(Inpainter(1, width=4), ctx, rt=RandomTransform(), eps=0.1, steps=1, lam=-1)
    with pytest.raises(ConfigError, match="clean_fraction=1.5"):
        finetune(
            Inpainter(1, width=4), ctx, rt=RandomTransform(), eps=0.1, steps=1, clean_fraction=1.5
        )


# -- 4. training --------------------------------------------------------------------------------


def _ctx(classifier: nn.Module | None = None) -> PartContext:
    x = images(64, 8, seed=1)
    y = torch.arange(64) % 10
    return PartContext(x, y, x[:16], y[:16], 10, torch.device("cpu"), 0, classifier)


def test_fgsm_stays_in_the_ball_and_raises_the_loss() -> None:
    classifier = tiny_classifier(DIGITS)
    x, y = images(16, 8), torch.arange(16) % 10
    x_adv = _fgsm(classifier, x, y, 0.1)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert F.cross_entropy(classifier(x_adv), y) > F.cross_entropy(classifier(x), y)


def test_training_functions_report_their_metrics() -> None:
    ctx = _ctx(tiny_classifier(DIGITS))
    g = Inpainter(1, width=4)
    pre = pretrain(g, ctx, rt=RandomTransform(), steps=4, batch_size=8, log_every=2, eval_samples=8)
    assert [p["step"] for p in pre["loss_curve"]] == [2, 4] and pre["test_l1"] > 0
    fine = finetune(
        g, ctx, rt=RandomTransform(), eps=0.1, steps=3, batch_size=8, log_every=2, eval_samples=8
    )
    assert [p["step"] for p in fine["loss_curve"]] == [2, 3]
    assert {"l1", "ce"} <= set(fine["loss_curve"][0])
    for key in ("test_l1", "test_acc", "test_acc_fgsm", "bare_acc", "bare_acc_fgsm", "train_s"):
        assert key in fine


@pytest.mark.parametrize(("clean_fraction", "adversarial"), [(0.0, 8), (0.5, 4), (1.0, 0)])
def test_clean_fraction_keeps_that_share_of_each_batch_clean(
    monkeypatch: pytest.MonkeyPatch, clean_fraction: float, adversarial: int
) -> None:
    import defenses.atop as atop

    crafted: list[int] = []

    def counting_fgsm(f: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        crafted.append(len(x))
        return _fgsm(f, x, y, eps)

    monkeypatch.setattr(atop, "_fgsm", counting_fgsm)
    held_out = dict.fromkeys(
        ("test_l1", "test_acc", "test_acc_fgsm", "bare_acc", "bare_acc_fgsm"), 0.0
    )
    monkeypatch.setattr(atop, "_held_out", lambda *args, **kwargs: held_out)  # crafts its own
    finetune(
        Inpainter(1, width=4),
        _ctx(tiny_classifier(DIGITS)),
        rt=RandomTransform(),
        eps=0.1,
        steps=2,
        batch_size=8,
        clean_fraction=clean_fraction,
    )
    assert crafted == ([adversarial] * 2 if adversarial else [])


def _prepare(compose_cfg, tmp_path: Path, defense: str) -> tuple[AToP, list[dict]]:
    overrides = [
        f"defense={defense}",
        "dataset=digits",
        f"paths.cache_dir={tmp_path}",
        "defense.purifier.arch.width=4",
        "defense.purifier.init.train.steps=5",
        "defense.purifier.init.train.batch_size=16",
        "+defense.purifier.init.train.eval_samples=32",
    ]
    if defense == "atop":
        overrides += [
            "defense.purifier.train.steps=5",
            "defense.purifier.train.batch_size=16",
            "+defense.purifier.train.eval_samples=32",
            "defense.purifier.train.lr=1e-2",  # a visible change in 5 steps
        ]
    cfg = compose_cfg(overrides)
    atop = instantiate(cfg.defense)
    dataset = instantiate(cfg.dataset)
    parts = prepare_parts(
        atop,
        dataset,
        torch.device("cpu"),
        classifier=tiny_classifier(dataset),
        classifier_info={"key": "tiny"},
    )
    return atop, parts


def test_fine_tuning_changes_the_pretrained_weights_and_the_ablation_keeps_them(
    compose_cfg, tmp_path: Path
) -> None:
    tuned, tuned_parts = _prepare(compose_cfg, tmp_path, "atop")
    plain, plain_parts = _prepare(compose_cfg, tmp_path, "atop_pretrained")
    assert isinstance(tuned.purifier, Inpainter) and isinstance(plain.purifier, Inpainter)
    # Both start from the same pre-training stage (one cache entry, trained once).
    assert tuned_parts[0]["init"]["cache_key"] == plain_parts[0]["init"]["cache_key"]
    pre_entry = Path(tuned_parts[0]["init"]["checkpoint"])
    pre = torch.load(pre_entry / "weights.pt", weights_only=True)
    plain_state, tuned_state = plain.purifier.state_dict(), tuned.purifier.state_dict()
    assert all(torch.equal(plain_state[k], pre[k]) for k in pre), "ablation = pre-trained stage"
    assert any(not torch.equal(tuned_state[k], pre[k]) for k in pre), "fine-tuning changed it"
    training = tuned_parts[0]["training"]
    assert "test_acc_fgsm" in training and training["loss_curve"][-1]["step"] == 5
    x = images(4, 8)
    check_contract(tuned.eval(), x)
    check_contract(plain.eval(), x)


# -- 5. configs ---------------------------------------------------------------------------------


def test_paper_experiment_composes(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=lin2024_atop_cifar10"])
    assert cfg.hydra.runtime.choices.dataset == "cifar10"
    assert cfg.hydra.runtime.choices.classifier == "resnet18"
    assert cfg.n_samples == 512 and cfg.threat.eps == pytest.approx(8 / 255)
    assert set(cfg.suite.attacks) == {"autoattack_standard", "autoattack_rand"}
    defense = instantiate(cfg.defense)
    assert defense.rt == RandomTransform("rt2", sigma=0.25, grid=8, missing=0.25, resize=256)
    assert defense.rt.block_ids(256, 256)[0, 31] == 0 and defense.rt.n_missing == 16
    finetune_args = defense.purifier.train_fn.keywords
    assert finetune_args["lam"] == 0.05 and finetune_args["eps"] == pytest.approx(8 / 255)
    assert finetune_args["rt"] == defense.rt == defense.purifier.init.train_fn.keywords["rt"]


def test_variants_and_suite_compose(compose_cfg) -> None:
    rt3 = instantiate(compose_cfg(["defense=atop_rt3", "dataset=digits"]).defense)
    assert rt3.rt.kind == "rt3" and rt3.calls_per_purify == 4
    # RT3's passes are RT2 inputs: it deploys atop's inpainter, one cache entry for both.
    assert rt3.purifier.train_fn.keywords["rt"].kind == "rt2"
    cfg = compose_cfg(["defense=atop", "dataset=digits"])
    rt2, data, info = instantiate(cfg.defense), instantiate(cfg.dataset), {"cache_key": "k"}
    assert rt3.purifier.spec(data, info) == rt2.purifier.spec(data, info)
    plain = compose_cfg(["defense=atop_pretrained", "dataset=digits"]).defense
    assert plain.purifier.train is None and plain.purifier.init.train.steps > 0
    suite_cfg = compose_cfg(["suite=compare_atop"])
    suite = suite_cfg.suite
    assert suite.cascade is False
    assert {"autoattack_rand", "pgd_eot", "bpda_eot", "transfer"} <= set(suite.attacks)
    views = {name: declared_view(suite_cfg, name) for name in suite.attacks}
    assert views["pgd_eot"]["grad"] == "exact" and views["bpda_eot"]["grad"] == "bpda"
