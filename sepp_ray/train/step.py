"""The framework-free training step: augment on the device, forward, backward, optimiser step.

Nothing here knows of Ray (as in Ray's own quick start, the same train function runs with and
without it): the Ray Train driver builds a `Trainer` inside each worker and feeds it batches.
Distributed training is plain DDP around a `LossModule`; the only collective the step itself
makes goes through `sepp_ray.dist` and is a no-op without a process group.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sepp_ray import dist
from sepp_ray.data.augment import GPUAugment
from sepp_ray.errors import SeppError
from sepp_ray.methods.base import PAIR_USES, Method, check_pair_use
from sepp_ray.train.optim import set_lr, set_wd, warmup_cosine

AMP_MODES = ("auto", "bf16", "off")
# how each `pairs.mode` uses the batch's `pos_ids` (sepp_ray.methods.base.PAIR_USES)
_PAIR_USE_OF_MODE = {"multi_positive": "attract", "both": "attract", "cancel": "cancel"}


def pair_use_of_mode(mode: str) -> str:
    """The pair use of a pairs mode: multi_positive and both attract the mined positives,
    cancel removes them from the negatives, every other mode gives no `pos_ids` ("none")."""
    return _PAIR_USE_OF_MODE.get(mode, "none")


class NonFiniteLossError(SeppError):
    """The loss became NaN or infinite; raised before the optimiser step, so the weights and
    optimiser state are those of the last good step and a checkpoint of them is safe."""


@dataclass
class StepConfig:
    """How the step runs.

    amp: "auto" = bf16 autocast on CUDA, none on CPU; "bf16" = bf16 autocast on any device;
    "off" = float32. channels_last applies on CUDA only (on CPU it only slows convolutions).
    grad_clip: max global gradient norm, or None. pair_use: what the batch's mined `pos_ids`
    are to the loss: "none" (not read), "attract" (extra positives, SePP's multi-positive
    loss) or "cancel" (removed from the negatives, false-negative cancellation); the Trainer
    refuses a use its method cannot honour.
    """

    amp: str = "auto"
    channels_last: bool = False
    grad_clip: float | None = None
    pair_use: str = "none"

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise SeppError(f"amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise SeppError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.pair_use not in PAIR_USES:
            raise SeppError(f"pair_use must be one of {list(PAIR_USES)}, got {self.pair_use!r}")


class LossModule(nn.Module):
    """A Method whose `forward` is its training loss, so DDP can wrap it: DDP hooks `forward`,
    and all-reduces the gradients of whatever that forward used. The method's float metrics of
    the last call are kept in `self.metrics`."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method
        self.metrics: dict[str, float] = {}

    def forward(
        self,
        views: list[Tensor],
        ids: Tensor,
        pos_ids: Tensor | None = None,
        epoch: int = 0,
        *,
        labels: Tensor | None = None,
        cancel_ids: Tensor | None = None,
    ) -> Tensor:
        loss, self.metrics = self.method.training_loss(
            views, ids, pos_ids, epoch, labels=labels, cancel_ids=cancel_ids
        )
        return loss


def prepare_loss_module(
    method: Method, device: torch.device | str, channels_last: bool = False
) -> LossModule:
    """Move `method` to `device` (channels_last weights on CUDA if asked) and wrap it.

    Call before wrapping in DDP: DDP's gradient buckets follow the parameters' layout then.
    """
    device = torch.device(device)
    method.to(device)
    if channels_last and device.type == "cuda":
        method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return LossModule(method)


def _as_device_tensor(x: Any, device: torch.device) -> Tensor:
    return torch.as_tensor(x).to(device, non_blocking=True)


def _images(x: Any, name: str, device: torch.device) -> Tensor:
    """B x H x W x 3 uint8 (Ray Data / numpy layout) -> B x 3 x H x W on `device`."""
    t = _as_device_tensor(x, device)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise SeppError(f"batch[{name!r}] must be B x H x W x 3 images, got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2)  # a channels_last view, no copy


class Trainer:
    """One SSL training step at a time, for one rank.

    `model` is a `LossModule` around `method`, possibly DDP-wrapped (then gradients are
    averaged over ranks in backward). `augment` makes the views on the model's device. The
    learning rate follows `warmup_cosine(step, total_steps, warmup_steps, base_lr, final_lr)`.
    The caller sets train()/eval() mode.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        augment: GPUAugment,
        optimizer: torch.optim.Optimizer,
        cfg: StepConfig,
        total_steps: int,
        warmup_steps: int,
        base_lr: float,
        final_lr: float = 0.0,
    ) -> None:
        inner = getattr(model, "module", model)  # DDP keeps the wrapped module in .module
        if not isinstance(inner, LossModule) or inner.method is not method:
            raise SeppError(
                "model must be LossModule(method), optionally wrapped in DDP; build it with "
                "prepare_loss_module(method, device)"
            )
        warmup_cosine(0, total_steps, warmup_steps, base_lr, final_lr)  # validates the schedule
        self.model = model
        self.loss_module = inner
        self.method = method
        self.augment = augment
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.base_lr = base_lr
        self.final_lr = final_lr
        self.device = next(method.parameters()).device
        cuda = self.device.type == "cuda"
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
        self.channels_last = cfg.channels_last and cuda
        check_pair_use(type(method), cfg.pair_use)
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.last_finite_loss: float | None = None

    def views(self, batch: dict[str, Any]) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        """Views, ids and the method's other inputs of a batch, on the device.

        view1 is made from "image", view2 from "image2" (the semantic or curated positive of a
        pair item, the image itself for an original); multi-crop local views come from "image".
        The third value holds the keyword inputs of `LossModule`: `pos_ids` (pair use
        "attract") or `cancel_ids` ("cancel") from the batch's "pos_ids", and `labels` from
        "label" for methods that need labels.
        """
        for key in ("image", "image2", "id"):
            if key not in batch:
                raise SeppError(f"training batch has no {key!r} column (it has {sorted(batch)})")
        image = _images(batch["image"], "image", self.device)
        image2 = _images(batch["image2"], "image2", self.device)
        ids = _as_device_tensor(batch["id"], self.device).long()  # B
        v1, v2 = self.augment.pair_views(image, image2)
        recipe = self.augment.recipe
        views = [v1, v2]
        if recipe.local is not None and "local" in batch:  # CPU crops: B x L x S x S x 3
            local = _as_device_tensor(batch["local"], self.device)
            views += [
                self.augment.one_view(local[:, j].permute(0, 3, 1, 2), recipe.local)
                for j in range(local.shape[1])
            ]
        elif recipe.local is not None:
            views += [self.augment.one_view(image, recipe.local) for _ in range(recipe.n_local)]
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        extra: dict[str, Tensor] = {}
        use = self.cfg.pair_use
        if use != "none":
            if "pos_ids" not in batch:
                raise SeppError(
                    f"pair_use is {use!r} but the batch has no 'pos_ids' column: mine pairs "
                    "first, or use pairs.mode=dataset or none"
                )
            pos_ids = _as_device_tensor(batch["pos_ids"], self.device).long()  # B x P
            if pos_ids.ndim != 2 or pos_ids.shape[0] != ids.shape[0]:
                raise SeppError(
                    f"pos_ids must be B x P (B={ids.shape[0]}), got {tuple(pos_ids.shape)}"
                )
            extra["pos_ids" if use == "attract" else "cancel_ids"] = pos_ids
        if self.method.needs_labels:
            if "label" not in batch:
                raise SeppError(
                    f"method {self.method.name!r} needs class labels but the batch has no "
                    "'label' column: train it on a labelled dataset"
                )
            labels = _as_device_tensor(batch["label"], self.device).long()  # B
            if labels.shape != ids.shape:
                raise SeppError(f"label must be B={ids.shape[0]} ints, got {tuple(labels.shape)}")
            extra["labels"] = labels
        return views, ids, extra

    def train_step(self, batch: dict[str, Any], epoch: int, step: int) -> dict[str, float]:
        """One optimiser step on `batch` at 0-based global `step`; returns float metrics: the
        method's, `loss` (mean over ranks) and `lr`. NonFiniteLossError before any update if
        the loss is NaN/inf on any rank."""
        lr = warmup_cosine(step, self.total_steps, self.warmup_steps, self.base_lr, self.final_lr)
        set_lr(self.optimizer, lr)
        set_wd(self.optimizer, step, self.total_steps)  # groups with a weight-decay schedule
        views, ids, extra = self.views(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.model(views, ids, epoch=epoch, **extra)
        # [sum of losses, ranks with a non-finite loss]: every rank raises or none does, so no
        # rank is left waiting in backward's all-reduce. The one host sync of the step.
        local = loss.detach().float()
        stats = dist.all_reduce_sum(torch.stack([local, (~torch.isfinite(local)).float()]))
        loss_sum, n_bad = stats.tolist()
        if n_bad > 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {epoch}) on {int(n_bad)} rank(s); last "
                f"finite loss {self.last_finite_loss}. Lower the learning rate, enable "
                "grad_clip, or resume from the last checkpoint"
            )
        loss.backward()
        self.method.on_before_optimizer_step(epoch)
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.on_train_step_end(min(step / self.total_steps, 1.0))
        mean_loss = loss_sum / dist.world_size()
        self.last_finite_loss = mean_loss
        return {**self.loss_module.metrics, "loss": mean_loss, "lr": lr}

    def rng_state(self) -> dict[str, Any]:
        """All random state of this rank, augment generator included (see `rng_state`)."""
        return rng_state(self.augment, self.device)

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore what `Trainer.rng_state` returned."""
        set_rng_state(state, self.augment, self.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    trainer: Trainer,
    batches: Iterable[dict[str, Any]],
    epoch: int,
    start_step: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Run `trainer.train_step` over `batches`, global steps start_step, start_step + 1, ...

    Returns the mean of every step metric, `lr` of the last step, `steps`, `pairs_per_s` (items
    of this rank per second of wall time, data loading included, GPU synchronised at both ends),
    `last_step` and `next_step`. `on_step(step, metrics)` is called after each step (logging).
    """
    _sync(trainer.device)
    start = time.perf_counter()
    sums: dict[str, float] = {}
    steps = items = 0
    metrics: dict[str, float] = {}
    for batch in batches:
        metrics = trainer.train_step(batch, epoch, start_step + steps)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        items += len(batch["id"])
        if on_step is not None:
            on_step(start_step + steps, metrics)
        steps += 1
    _sync(trainer.device)
    elapsed = time.perf_counter() - start
    if steps == 0:
        raise SeppError(
            f"epoch {epoch} got no batches: the dataset shard of this rank is empty or smaller "
            "than one batch (drop_last); use a smaller batch or more data"
        )
    out = {k: v / steps for k, v in sums.items()}
    out.update(
        lr=metrics["lr"],
        steps=float(steps),
        pairs_per_s=items / elapsed if elapsed > 0 else math.inf,
        last_step=float(start_step + steps - 1),
        next_step=float(start_step + steps),
    )
    return out


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with a seed derived from (seed, rank), so
    ranks draw different streams and (seed, rank) pairs never collide. Returns that seed; give
    it to `GPUAugment(seed=...)` too."""
    derived = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # also seeds every CUDA device
    return derived


def rng_state(augment: GPUAugment | None = None, device: Any = None) -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, and the augment's generator on
    `device`: what a resumed run needs to draw exactly what the uninterrupted run would have.

    Plain containers and tensors only, so `torch.load(..., weights_only=True)` reads it back.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if augment is not None and device is not None:
        state["augment"] = augment.generator(torch.device(device)).get_state()
    return state


def set_rng_state(
    state: dict[str, Any], augment: GPUAugment | None = None, device: Any = None
) -> None:
    """Restore what `rng_state` returned (CUDA states only when the device count matches)."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if augment is not None and device is not None and "augment" in state:
        augment.generator(torch.device(device)).set_state(state["augment"])


def _tuples(x: Any) -> Any:
    """random.setstate wants nested tuples; a checkpoint round trip may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
