"""The framework-free training step: augment on the device, forward, backward, optimiser step.

Nothing here knows of Ray (as in Ray's own quick start, the same train function runs with and
without it): the Ray Train driver builds a `Trainer` inside each worker and feeds it batches.
Distributed training is plain DDP around a `LossModule`; the only collective the step itself
makes goes through `sepp_ray.dist` and is a no-op without a process group.

No step reads a device value on the host: a read waits for every queued kernel, so the GPU idles
while Python prepares the next step (PyTorch CUDA semantics, "Asynchronous execution"; the
performance tuning guide's "avoid unnecessary CPU-GPU synchronization"). Metrics and the
non-finite check accumulate on the device and are read once per logging interval
(`Trainer.read_metrics`); checks that need a read or an extra collective run on the first step
only (`sepp_ray.dist.host_checks`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sepp_ray import dist
from sepp_ray.data.augment import GPUAugment
from sepp_ray.errors import SeppError
from sepp_ray.methods.base import PAIR_USES, Method, Metrics, check_pair_use
from sepp_ray.train.optim import set_lr, set_wd, warmup_cosine

AMP_MODES = ("auto", "bf16", "off")
# how each `pairs.mode` uses the batch's `pos_ids` (sepp_ray.methods.base.PAIR_USES)
_PAIR_USE_OF_MODE = {"multi_positive": "attract", "both": "attract", "cancel": "cancel"}


def pair_use_of_mode(mode: str) -> str:
    """The pair use of a pairs mode: multi_positive and both attract the mined positives,
    cancel removes them from the negatives, every other mode gives no `pos_ids` ("none")."""
    return _PAIR_USE_OF_MODE.get(mode, "none")


class NonFiniteLossError(SeppError):
    """The loss became NaN or infinite on some rank. Raised by `Trainer.read_metrics`, at the
    end of the logging interval that saw it (the check is on the device, so no step waits for
    it): the weights in memory may be non-finite since, so resume from the last checkpoint,
    which was written after a read that found every loss finite (the worker reads before it
    saves)."""


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
    and all-reduces the gradients of whatever that forward used. The method's metrics of the
    last call (device tensors or floats) are kept in `self.metrics`."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method
        self.metrics: Metrics = {}

    def forward(
        self,
        views: list[Tensor],
        ids: Tensor,
        pos_ids: Tensor | None = None,
        epoch: int = 0,
        *,
        labels: Tensor | None = None,
        cancel_ids: Tensor | None = None,
        view_ids: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> Tensor:
        loss, self.metrics = self.method.training_loss(
            views,
            ids,
            pos_ids,
            epoch,
            labels=labels,
            cancel_ids=cancel_ids,
            view_ids=view_ids,
            groups=groups,
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile's `_orig_mod` and DDP's `.module`, in any order."""
    while not isinstance(model, LossModule):
        children = dict(model.named_children())
        inner = children.get("_orig_mod", children.get("module"))
        if inner is None:
            return model
        model = inner
    return model


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
        inner = _unwrap(model)
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
        self._batch_size: int | None = None  # of the first step; every later step keeps it
        # the logging interval's sums: device tensors, host floats, [bad steps, 1 + first bad]
        self._dev_sums: dict[str, Tensor] = {}
        self._host_sums: dict[str, float] = {}
        self._bad: Tensor | None = None
        self._interval_steps = 0
        self._last_lr = 0.0

    def views(self, batch: dict[str, Any]) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        """Views, ids and the method's other inputs of a batch, on the device.

        view1 is made from "image", view2 from "image2" (the semantic or curated positive of a
        pair item, the image itself for an original); multi-crop local views come from "image".
        The third value holds the keyword inputs of `LossModule`: `view_ids` from "view_ids"
        (B x 2: the image ids behind view 1 and view 2, so no view of an image is a negative
        of the same image), `pos_ids` (pair use "attract") or `cancel_ids` ("cancel") from the
        batch's "pos_ids" with `groups` from "group", and `labels` from "label" for methods
        that need labels.
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
        extra: dict[str, Tensor] = {"view_ids": self._view_ids(batch, ids.shape[0])}
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
            extra["groups"] = self._groups(batch, ids.shape[0])
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

    def _view_ids(self, batch: dict[str, Any], n: int) -> Tensor:
        """B x 2 int64 image ids behind each item's two views, on the device."""
        if "view_ids" not in batch:
            raise SeppError(
                f"training batch has no 'view_ids' column (it has {sorted(batch)}): the items "
                "must name the image ids behind their two views; rebuild the run's item table "
                "and feed with this version (re-run `sepp pretrain` into a fresh output)"
            )
        view_ids = _as_device_tensor(batch["view_ids"], self.device).long()  # B x 2
        if view_ids.shape != (n, 2):
            raise SeppError(f"view_ids must be B x 2 (B={n}), got {tuple(view_ids.shape)}")
        return view_ids

    def _groups(self, batch: dict[str, Any], n: int) -> Tensor:
        """B int64 group ids (-1 = none): the items of one group are one class of the batch."""
        if "group" not in batch:
            raise SeppError(
                f"pair_use is {self.cfg.pair_use!r} but the batch has no 'group' column (it has "
                f"{sorted(batch)}): rebuild the run's item table with this version"
            )
        groups = _as_device_tensor(batch["group"], self.device).long()  # B
        if groups.shape != (n,):
            raise SeppError(f"group must be B={n} ints, got {tuple(groups.shape)}")
        return groups

    def train_step(self, batch: dict[str, Any], epoch: int, step: int) -> Metrics:
        """One optimiser step on `batch` at 0-based global `step`, without a host sync.

        Returns this step's metrics as the method gives them (device tensors or floats), with
        `loss` (this rank's, detached, on the device) and `lr`: reading a tensor of them waits
        for the device, so read `read_metrics()` once per logging interval instead. The first
        step runs the input checks that need a sync or an extra collective; later steps must
        keep its batch size (ranks gather equal shapes), SeppError otherwise. Every method's
        metrics hold `same_image_negatives` ((query, key) pairs sharing an image yet left among
        the negatives: 0 proves the image mask) and `pairs_used` (mined pairs attracted or
        cancelled), counted per step on this rank's queries; `read_metrics` averages them over
        steps and ranks, so times the world size they are per global step.
        """
        n = len(batch["id"]) if "id" in batch else -1
        first = self._batch_size is None
        if not first and n != self._batch_size:
            raise SeppError(
                f"batch size changed from {self._batch_size} to {n} at step {step}: every step "
                "of a run must have the same per-rank batch size (drop_last=True)"
            )
        lr = warmup_cosine(step, self.total_steps, self.warmup_steps, self.base_lr, self.final_lr)
        set_lr(self.optimizer, lr)
        set_wd(self.optimizer, step, self.total_steps)  # groups with a weight-decay schedule
        with dist.host_checks(first):
            views, ids, extra = self.views(batch)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.model(views, ids, epoch=epoch, **extra)
        self._batch_size = n
        metrics: Metrics = {**self.loss_module.metrics, "loss": loss.detach(), "lr": lr}
        if "view_ids" in extra:  # pair items (semantic, curated, augmentation) in this batch:
            # an item whose id is not the image id of its first view
            metrics["pair_items"] = (ids != extra["view_ids"][:, 0]).sum().float()
        self._accumulate(metrics, step)
        loss.backward()
        self.method.on_before_optimizer_step(epoch)
        if self.cfg.grad_clip is not None:
            # foreach norms, and no error_if_nonfinite: that would read the norm on the host
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.on_train_step_end(min(step / self.total_steps, 1.0))
        return metrics

    def _accumulate(self, metrics: Metrics, step: int) -> None:
        """Add a step's metrics to the interval sums: tensors on the device, floats on the host.
        A non-finite loss counts as bad and adds 0, so the interval mean stays readable."""
        loss = metrics["loss"]
        assert isinstance(loss, Tensor)
        local = loss.float()
        finite = torch.isfinite(local)
        if self._bad is None:
            self._bad = torch.zeros(2, device=self.device)  # [bad steps, 1 + first bad step]
        seen = self._bad[1] > 0
        first_bad = torch.where(seen | finite, self._bad[1], float(step + 1))
        self._bad.copy_(torch.stack([self._bad[0] + (~finite).float(), first_bad]))
        for k, v in metrics.items():
            if isinstance(v, Tensor):
                v = torch.where(finite, v.detach().float(), 0.0) if k == "loss" else v.detach()
                self._dev_sums[k] = self._dev_sums[k] + v if k in self._dev_sums else v.float()
            elif k != "lr":
                self._host_sums[k] = self._host_sums.get(k, 0.0) + float(v)
        self._last_lr = float(metrics["lr"])
        self._interval_steps += 1

    def read_metrics(self) -> dict[str, float]:
        """Means over the steps since the last read.

        Two all-reduces (the sums, and the earliest non-finite step) then one read of their
        values on the host: the interval's only wait for the device. Tensor metrics (`loss`
        among them) are averaged over ranks too; `lr` is the last step's; `steps` counts the
        interval's steps. Every rank must call it at the same step, and every rank then raises
        NonFiniteLossError if any rank saw a non-finite loss in the interval, so none is left
        waiting in a collective.
        """
        if self._interval_steps == 0:
            raise SeppError("read_metrics: no training step since the last read")
        keys = sorted(self._dev_sums)
        assert self._bad is not None
        local = torch.stack([self._dev_sums[k].float().reshape(()) for k in keys])
        sums = dist.all_reduce_sum(torch.cat([local, self._bad[:1]]))
        # the max over ranks of -(1 + first bad step) finds the earliest bad step of all ranks
        first_bad = dist.all_reduce_max(torch.where(self._bad[1] > 0, -self._bad[1], -3e38))
        values = torch.cat([sums, first_bad.reshape(1)]).tolist()  # waits for the device
        steps, ws = self._interval_steps, dist.world_size()
        n_bad, first = values[-2], values[-1]
        if n_bad > 0:
            at = int(-first) - 1
            raise NonFiniteLossError(
                f"non-finite loss at step {at} ({int(n_bad)} step(s) over all ranks since the "
                f"last read); last finite interval mean loss {self.last_finite_loss}. Lower the "
                "learning rate, enable grad_clip, or resume from the last checkpoint"
            )
        out = {k: v / (steps * ws) for k, v in zip(keys, values, strict=False)}
        out.update({k: v / steps for k, v in self._host_sums.items()})
        out.update(lr=self._last_lr, steps=float(steps))
        self.last_finite_loss = out.get("loss")
        self._reset_interval()
        return out

    def _reset_interval(self) -> None:
        self._dev_sums = {}
        self._host_sums = {}
        self._bad = None
        self._interval_steps = 0
        self._last_lr = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    trainer: Trainer,
    batches: Iterable[dict[str, Any]],
    epoch: int,
    start_step: int,
    log_every: int = 0,
    *,
    reference_steps: int = 0,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Run `trainer.train_step` over `batches`, global steps start_step, start_step + 1, ...

    Metrics are read from the device (`Trainer.read_metrics`, the loop's only wait for the
    device) every `log_every` steps (0 = once, at the end of the epoch) and at the end. Returns
    the epoch's means, `lr` of the last step, `steps`, `pairs_per_s` (items of this rank per
    second of wall time, data loading included, GPU synchronised at both ends), `last_step` and
    `next_step`. NonFiniteLossError from the read that saw a non-finite loss.

    reference_steps: the plain run's epoch in steps (`sepp_ray.train.schedule`); the method
    then reads epoch = step // reference_steps, the same at one step in every arm (0: `epoch`).
    max_steps: stop after this many steps, at a step boundary; given an iterator, the next call
    goes on with the next batch of the same epoch, in the same order (reports at fixed steps).
    """
    if log_every < 0:
        raise SeppError(f"log_every must be >= 0 (0 = once per epoch), got {log_every}")
    if max_steps is not None and max_steps < 1:
        raise SeppError(f"max_steps must be >= 1 or None, got {max_steps}")
    if max_steps is not None:
        batches = itertools.islice(batches, max_steps)  # takes no batch past the last step
    _sync(trainer.device)
    start = time.perf_counter()
    sums: dict[str, float] = {}
    steps = items = 0
    metrics: dict[str, float] = {}

    def read() -> None:
        nonlocal metrics
        metrics = trainer.read_metrics()
        n = metrics["steps"]
        for k, v in metrics.items():
            if k not in ("lr", "steps"):
                sums[k] = sums.get(k, 0.0) + v * n

    for batch in batches:
        step = start_step + steps
        trainer.train_step(batch, step // reference_steps if reference_steps else epoch, step)
        items += len(batch["id"])
        steps += 1
        if log_every and steps % log_every == 0:
            read()
    if steps == 0:
        raise SeppError(
            f"epoch {epoch} got no batches: the dataset shard of this rank is empty or smaller "
            "than one batch (drop_last); use a smaller batch or more data"
        )
    if not log_every or steps % log_every:
        read()
    _sync(trainer.device)
    elapsed = time.perf_counter() - start
    out = {k: v / steps for k, v in sums.items()}
    out.update(
        lr=metrics["lr"],
        steps=float(steps),
        pairs_per_s=items / elapsed if elapsed > 0 else math.inf,
        last_step=float(start_step + steps - 1),
        next_step=float(start_step + steps),
    )
    return out
