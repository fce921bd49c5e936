"""Per-method optimiser recipes: every method has one, overrides win, and the values reach the
optimiser and the training step (fixed predictor rate, weight-decay schedule, clipping)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import torch

from sepp_ray.data.augment import GPUAugment
from sepp_ray.data.recipes import get_recipe
from sepp_ray.errors import SeppError
from sepp_ray.methods import create_method, list_methods
from sepp_ray.methods.base import Method
from sepp_ray.train import StepConfig, Trainer, prepare_loss_module
from sepp_ray.train.driver import PretrainConfig
from sepp_ray.train.optim import LARS
from sepp_ray.train.optim_defaults import (
    DINO_RESNET,
    METHOD_RECIPES,
    OptimRecipe,
    config_recipe,
    resolve_optim,
)

SIZE = 16


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str) -> Method:
    torch.manual_seed(0)
    return create_method(name, backbone="test_resnet", cifar_stem=True)


def worker_optimizer(cfg: PretrainConfig, method: Method) -> tuple[torch.optim.Optimizer, Any]:
    """What the driver and the worker do: the config's recipe (the worker reads it from the
    config dict the driver sends, `asdict(cfg)`), its peak rate, its optimiser."""
    recipe = config_recipe(asdict(cfg))
    assert recipe == cfg.optim_recipe()
    return recipe.build(method, recipe.peak_lr(cfg.batch_size)), recipe


def config(method: str, **kw: Any) -> PretrainConfig:
    return PretrainConfig(dataset="d", out="o", method=method, batch_size=512, **kw)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_has_a_cited_recipe(name: str) -> None:
    recipe = resolve_optim(name)
    assert recipe.source and "arXiv" in recipe.source
    json.dumps(recipe.to_dict())  # fits a manifest


def test_no_recipe_for_a_missing_method() -> None:
    assert set(METHOD_RECIPES) == set(list_methods())
    with pytest.raises(SeppError, match="unknown method 'moco-v9'"):
        resolve_optim("moco-v9")


def test_mocov2_sgd() -> None:
    method = tiny("mocov2")
    opt, recipe = worker_optimizer(config("mocov2"), method)
    assert type(opt) is torch.optim.SGD
    assert recipe.grad_clip is None and recipe.warmup_epochs == 0
    (group,) = opt.param_groups  # MoCo decays every parameter
    assert group["lr"] == pytest.approx(0.03 * 512 / 256)
    assert group["weight_decay"] == 1e-4 and group["momentum"] == 0.9
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(group["params"]) == len(trainable)


def test_simsiam_fixed_predictor_lr() -> None:
    method = tiny("simsiam")
    opt, _ = worker_optimizer(config("simsiam"), method)
    assert type(opt) is torch.optim.SGD
    predictor = {id(p) for p in method.predictor.parameters()}
    fixed = [g for g in opt.param_groups if g.get("fixed_lr") is not None]
    assert {id(p) for g in fixed for p in g["params"]} == predictor
    peak = 0.05 * 512 / 256
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(peak)
        assert g["weight_decay"] == 1e-4 and g["momentum"] == 0.9


def test_dino_adamw_schedule_and_clip() -> None:
    method = tiny("dino")
    opt, recipe = worker_optimizer(config("dino", backbone="vit_small_patch16_224"), method)
    assert type(opt) is torch.optim.AdamW
    assert recipe.grad_clip == 3.0 and recipe.end_lr(1.0) == 1e-6
    decayed, plain = opt.param_groups
    assert decayed["lr"] == pytest.approx(5e-4 * 2) and decayed["betas"] == (0.9, 0.999)
    assert (decayed["weight_decay"], decayed["weight_decay_end"]) == (0.04, 0.4)
    assert plain["weight_decay"] == 0.0 and "weight_decay_end" not in plain


def test_dino_on_a_resnet_takes_the_authors_resnet_recipe() -> None:
    opt, recipe = worker_optimizer(config("dino", backbone="resnet18"), tiny("dino"))
    assert type(opt) is torch.optim.SGD and recipe.source.startswith("DINO")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03 * 512 / 256)
    assert recipe.weight_decay == 1e-4 and recipe.weight_decay_end is None
    assert recipe.grad_clip == 3.0 and recipe.end_lr(1.0) == 1e-6
    # an explicit setting still wins over the backbone's recipe
    chosen = config("dino", backbone="resnet50", optimizer="adamw").optim_recipe()
    assert chosen.optimizer == "adamw"


def test_simclr_lars() -> None:
    method = tiny("simclr")
    opt, recipe = worker_optimizer(config("simclr"), method)
    assert type(opt) is LARS and recipe.grad_clip is None and recipe.warmup_epochs == 10
    weights, biases = opt.param_groups
    assert weights["lr"] == biases["lr"] == pytest.approx(0.3 * 2)
    assert (weights["weight_decay"], weights["lars_exclude"]) == (1e-6, False)
    assert (biases["weight_decay"], biases["lars_exclude"]) == (0.0, True)


def test_barlow_twins_bias_rate() -> None:
    opt, recipe = worker_optimizer(config("barlow_twins"), tiny("barlow_twins"))
    weights, biases = opt.param_groups
    assert weights["lr"] == pytest.approx(0.2 * 2) and biases["lr"] == pytest.approx(0.0048 * 2)
    assert recipe.end_lr(0.4) == pytest.approx(0.0004)


def test_overrides_win() -> None:
    cfg = config(
        "dino",
        optimizer="sgd",
        base_lr=0.03,
        lr_scaling="none",
        weight_decay=1e-4,
        warmup_epochs=2,
        grad_clip=0,
        final_lr=0.0,
    )
    opt, recipe = worker_optimizer(cfg, tiny("dino"))
    assert type(opt) is torch.optim.SGD
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert recipe.weight_decay_end is None  # an explicit weight decay replaces the schedule
    assert "weight_decay_end" not in opt.param_groups[0]
    assert recipe.grad_clip is None and recipe.warmup_epochs == 2 and recipe.end_lr(1.0) == 0.0
    again = resolve_optim("simclr", {"weight_decay": 0.1, "weight_decay_end": 0.2})
    assert (again.weight_decay, again.weight_decay_end) == (0.1, 0.2)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("optimizer", "lamb", "optimizer must be one of"),
        ("lr_scaling", "cubic", "lr_scaling must be one of"),
        ("base_lr", -1.0, "base_lr must be > 0"),
        ("weight_decay", -1.0, "weight_decay must be >= 0"),
        ("grad_clip", -1.0, "grad_clip must be >= 0"),
    ],
)
def test_bad_settings_fail_at_validate(field: str, value: Any, match: str) -> None:
    with pytest.raises(SeppError, match=match):
        config("simclr", **{field: value}).validate()


def test_unknown_override_key() -> None:
    with pytest.raises(SeppError, match="unknown optimizer setting"):
        resolve_optim("simclr", {"momentun": 0.8})


def make_trainer(method: Method, optimizer: torch.optim.Optimizer, steps: int) -> Trainer:
    loss_module = prepare_loss_module(method, "cpu")
    augment = GPUAugment(get_recipe(method.default_recipe, SIZE), seed=0)
    return Trainer(
        loss_module, method, augment, optimizer, StepConfig(), steps, 1, base_lr=0.1, final_lr=0.0
    )


def batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (n, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    ids = torch.arange(n)
    return {"image": img, "image2": img.clone(), "id": ids, "view_ids": torch.stack([ids, ids], 1)}


def test_train_step_keeps_fixed_lr_and_follows_wd_schedule() -> None:
    """Inside the training step the predictor keeps its rate through warm-up and decay while
    the rest follows the schedule, and a weight-decay schedule moves with the step."""
    method = tiny("simsiam")
    recipe = resolve_optim("simsiam", {"weight_decay": 0.04, "weight_decay_end": 0.4})
    opt = recipe.build(method, 0.1)
    trainer = make_trainer(method, opt, steps=4)
    seen = []
    for step in range(4):
        trainer.train_step(batch(), epoch=0, step=step)
        fixed = [g for g in opt.param_groups if g.get("fixed_lr") is not None]
        other = [g for g in opt.param_groups if g.get("fixed_lr") is None]
        assert all(g["lr"] == pytest.approx(0.1) for g in fixed)
        seen.append((other[0]["lr"], other[0]["weight_decay"]))
    lrs, wds = zip(*seen, strict=True)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.1) and lrs[3] < lrs[2] < lrs[1]
    assert wds[0] == pytest.approx(0.04) and wds[0] < wds[1] < wds[2] < wds[3] < 0.4


def test_readme_table_matches_the_recipes() -> None:
    """The README's table of defaults says what METHOD_RECIPES holds (optimizer, base_lr)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = {"lars": "LARS", "sgd": "SGD", "adamw": "AdamW"}
    rows = [
        r
        for r in readme.splitlines()
        if r.startswith("| `") and r.split("|")[2].split()[0] in names.values()
    ]

    def check(row: str, recipe: OptimRecipe, what: str) -> None:
        cells = [c.strip() for c in row.split("|")]
        assert cells[2].split()[0] == names[recipe.optimizer], what
        assert float(cells[3]) == recipe.base_lr, what
        assert int(cells[5]) == recipe.warmup_epochs, what

    resnet = [r for r in rows if "on a ResNet" in r.split("|")[1]]
    for method, recipe in METHOD_RECIPES.items():
        (row,) = [r for r in rows if f"`{method}`" in r.split("|")[1] and r not in resnet]
        check(row, recipe, method)
    (dino_resnet,) = resnet  # DINO's ResNet recipe, chosen by the backbone's name
    check(dino_resnet, DINO_RESNET, "dino on a ResNet")
