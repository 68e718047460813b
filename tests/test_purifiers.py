"""The shared score model: training, its cache, pretrained diffusers checkpoints, Tweedie."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from bench.data import digits
from bench.models.parts import TrainedPart, prepare_parts
from bench.models.score import ScoreRecipe, TrainedScoreNet
from common.errors import CheckpointError, ConfigError
from defenses.base import PartContext
from defenses.score import VPSDE, ScoreNet, small_unet

TINY = partial(small_unet, block_out_channels=(16, 32, 32))
RECIPE = ScoreRecipe(steps=30, batch_size=32, log_every=10, eval_samples=64)


def test_vpsde_inverts_its_schedule() -> None:
    sde = VPSDE()
    t = torch.tensor([0.01, 0.1, 0.3, 0.9])
    torch.testing.assert_close(sde.t_of_alpha_bar(sde.alpha_bar(t)), t)
    # Noise-to-signal sigma at t: alpha_bar = 1 / (1 + sigma^2).
    sigma = torch.tensor(0.5)
    assert float(sde.alpha_bar(sde.t_of_sigma(sigma))) == pytest.approx(1 / 1.25)
    # DiffPure's t* = 0.1 keeps about 90% of the signal variance (alpha_bar(0.1) ~ 0.896).
    assert float(sde.alpha_bar(0.1)) == pytest.approx(0.8958, abs=1e-3)


def test_tweedie_denoiser_of_an_oracle_network_recovers_the_image() -> None:
    class Oracle(torch.nn.Module):
        """Knows the clean image: predicts exactly the noise that was added."""

        def __init__(self, x0: torch.Tensor) -> None:
            super().__init__()
            self.x0 = x0

        def forward(self, x_t, timestep):
            ab = VPSDE().alpha_bar(timestep / 999.0).reshape(-1, 1, 1, 1)
            return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()

    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    noisy = x0 + 0.4 * torch.randn_like(x0)
    torch.testing.assert_close(ScoreNet(Oracle(x0)).denoise(noisy, 0.4), x0, atol=1e-4, rtol=0)


def test_trains_once_caches_and_records_the_loss_curve(tmp_path: Path) -> None:
    data = digits()
    first = TrainedScoreNet(TINY, RECIPE, cache_dir=str(tmp_path))
    first.prepare(data, torch.device("cpu"))
    info = first.describe()
    assert info["kind"] == "trained" and len(info["training"]["loss_curve"]) == 3
    curve = [p["loss"] for p in info["training"]["loss_curve"]]
    assert curve[-1] < curve[0], "the denoising loss must fall"
    assert math.isfinite(info["training"]["test_loss"])
    entry = Path(info["checkpoint"])
    assert (entry / "config.json").is_file(), "the cache entry is a diffusers model directory"
    assert json.loads((entry / "metrics.json").read_text())["loss_curve"]

    again = TrainedScoreNet(TINY, RECIPE, cache_dir=str(tmp_path))
    again.prepare(data, torch.device("cpu"))
    assert again.describe()["cache_key"] == info["cache_key"]
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(again.eps(x, 0.3), first.eps(x, 0.3))
    assert not any(p.requires_grad for p in again.parameters()), "frozen after prepare"

    other = TrainedScoreNet(TINY, RECIPE, seed=1, cache_dir=str(tmp_path))
    other.prepare(data, torch.device("cpu"))
    assert other.describe()["cache_key"] != info["cache_key"]


def test_loads_a_local_diffusers_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TINY(in_channels=1, image_size=8)
    net.save_pretrained(str(tmp_path / "ddpm"))
    part = TrainedScoreNet(TINY, RECIPE, pretrained=str(tmp_path / "ddpm"))
    part.prepare(digits(), torch.device("cpu"))
    assert part.describe()["kind"] == "pretrained"
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(part.eps(x, 0.2), ScoreNet(net.eval()).eps(x, 0.2))
    direct = ScoreNet.from_pretrained(tmp_path / "ddpm")
    torch.testing.assert_close(direct.eps(x, 0.2), part.eps(x, 0.2))


def test_missing_pretrained_directory_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a diffusers model directory"):
        TrainedScoreNet(TINY, RECIPE, pretrained=str(tmp_path / "nowhere"))


def test_unprepared_score_model_says_so() -> None:
    with pytest.raises(RuntimeError, match="prepare"):
        TrainedScoreNet(TINY, RECIPE).eps(torch.zeros(1, 1, 8, 8), 0.5)


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("batch_size", -1), ("lr", 0.0)])
def test_bad_recipe_names_the_value(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"{field}={value}"):
        ScoreRecipe(**{field: value})


def test_small_unet_refuses_sizes_it_cannot_halve() -> None:
    with pytest.raises(ValueError, match="image_size=30"):
        small_unet(1, 30, block_out_channels=(16, 32, 32))


def test_prepare_parts_reaches_nested_parts(tmp_path: Path) -> None:
    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score = TrainedScoreNet(TINY, RECIPE, cache_dir=str(tmp_path))

    described = prepare_parts(Holder(), digits(), torch.device("cpu"))
    assert [d["part"] for d in described] == ["score"]


def test_fidelity_measures_agreement_and_gradient_memory(compose_cfg, cache_dir: Path) -> None:
    from bench.tools.fidelity import agreement, gradient_peak_mb

    overrides = [
        "dataset=digits",
        "defense=diffpure",
        "defense.steps=4",
        "n_samples=4",
        "device=cpu",
        f"paths.cache_dir={cache_dir}",
        "classifier.recipe.epochs=10",
        "classifier.recipe.lr=0.1",
        "classifier.recipe.batch_size=64",
        "defense.score.recipe.steps=20",
        "defense.score.recipe.eval_samples=50",
        "defense.score.arch.block_out_channels=[16,32,32]",
    ]
    # The reference against itself: the same noise, the same gradient.
    same = compose_cfg([*overrides, "candidate.gradient=backprop"], config_name="fidelity")
    result = agreement(same)
    assert result["n"] == 4 and result["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    # The adjoint on 4 coarse steps is a different, approximate gradient; it is measured, not
    # trusted (the measured cosine is the point of the tool).
    adjoint = agreement(compose_cfg(overrides, config_name="fidelity"))
    assert adjoint["candidate"] == {"gradient": "adjoint"}
    assert -1 - 1e-6 <= adjoint["cosine_min"] <= adjoint["cosine_mean"] <= 1 + 1e-6
    assert gradient_peak_mb(compose_cfg(overrides, config_name="fidelity")) >= 0


# -- generic trained parts (CARSO's CVAE, AToP's inpainter, AMRM-Pure's MAE) -------------------


def _tiny_arch(ctx: PartContext, width: int = 4) -> torch.nn.Module:
    return torch.nn.Conv2d(ctx.shape[0], ctx.shape[0], 3, padding=1)


def _tiny_train(net: torch.nn.Module, ctx: PartContext, steps: int = 2) -> dict:
    calls.append(ctx.classifier)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        loss = (net(ctx.x_train[:8]) - ctx.x_train[:8]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"loss": loss.item()}


calls: list = []


class _Holder(torch.nn.Module):
    def __init__(self, part: torch.nn.Module) -> None:
        super().__init__()
        self.part = part
        self.bound = None

    def bind(self, classifier: torch.nn.Module) -> None:
        self.bound = classifier


def _part(tmp_path: Path, **kwargs) -> TrainedPart:
    kwargs.setdefault("train", partial(_tiny_train, steps=2))
    return TrainedPart("tiny", partial(_tiny_arch), cache_dir=str(tmp_path), **kwargs)


def test_trained_part_trains_once_then_loads_from_the_cache(tmp_path: Path) -> None:
    calls.clear()
    holder = _Holder(_part(tmp_path))
    described = prepare_parts(holder, digits(), torch.device("cpu"))
    assert isinstance(holder.part, torch.nn.Conv2d) and not holder.part.training
    assert not any(p.requires_grad for p in holder.part.parameters())
    assert described[0]["part"] == "tiny" and "loss" in described[0]["training"]
    again = _Holder(_part(tmp_path))
    prepare_parts(again, digits(), torch.device("cpu"))
    assert len(calls) == 1, "the second resolve must load, not train"
    torch.testing.assert_close(again.part.weight, holder.part.weight)
    # A training argument is part of the key: another value trains again.
    prepare_parts(
        _Holder(_part(tmp_path, train=partial(_tiny_train, steps=3))), digits(), torch.device("cpu")
    )
    assert len(calls) == 2


def test_trained_part_starts_from_its_init_stage(tmp_path: Path) -> None:
    calls.clear()
    frozen = _Holder(_part(tmp_path, init=_part(tmp_path), train=None))
    prepare_parts(frozen, digits(), torch.device("cpu"))
    pre = _Holder(_part(tmp_path))
    prepare_parts(pre, digits(), torch.device("cpu"))
    # With train=None the part is exactly its pre-trained init (the "no fine-tuning" ablation).
    torch.testing.assert_close(frozen.part.weight, pre.part.weight)
    tuned = _Holder(_part(tmp_path, init=_part(tmp_path), train=partial(_tiny_train, steps=4)))
    described = prepare_parts(tuned, digits(), torch.device("cpu"))
    assert described[0]["init"]["part"] == "tiny"
    assert not torch.equal(tuned.part.weight, pre.part.weight)
    # Once cached, the part alone is loaded: its init stage is neither read nor attached.
    again = _Holder(_part(tmp_path, init=_part(tmp_path), train=partial(_tiny_train, steps=4)))
    assert len(prepare_parts(again, digits(), torch.device("cpu"))) == 1
    assert [n for n, _ in again.named_modules()] == ["", "part"]


def test_parts_trained_against_the_classifier_need_it_and_key_on_it(tmp_path: Path) -> None:
    calls.clear()
    clf = torch.nn.Identity()
    with pytest.raises(ConfigError, match="protected classifier"):
        prepare_parts(_Holder(_part(tmp_path, uses_classifier=True)), digits(), torch.device("cpu"))
    holder = _Holder(_part(tmp_path, uses_classifier=True))
    prepare_parts(
        holder, digits(), torch.device("cpu"), classifier=clf, classifier_info={"cache_key": "a"}
    )
    assert calls == [clf] and holder.bound is clf
    prepare_parts(
        _Holder(_part(tmp_path, uses_classifier=True)),
        digits(),
        torch.device("cpu"),
        classifier=clf,
        classifier_info={"cache_key": "b"},
    )
    assert len(calls) == 2, "another classifier must train the part again"


def test_trained_part_refuses_use_before_prepare_and_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not trained yet"):
        _part(tmp_path)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(CheckpointError, match="does not exist"):
        _part(tmp_path, checkpoint=str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError):
        prepare_parts(_Holder(_part(tmp_path, checkpoint=str(bad))), digits(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="name="):
        TrainedPart("bad name!", partial(_tiny_arch))
