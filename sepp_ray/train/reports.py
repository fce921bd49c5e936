"""What a training run reports and monitors, rank 0 writing: the kNN monitor on bounded
samples, TensorBoard, the history entries, and ``ray.train.report`` on every rank the same
number of times (at epoch ends, or every ``report_every_steps`` optimizer steps).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from sepp_ray.train.config import WorkerConfig


def _features(
    method: torch.nn.Module,
    images: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch: int = 512,
) -> torch.Tensor:
    """Backbone features of un-augmented uint8 images (N x S x S x 3), eval mode."""
    from sepp_ray.models.encode import encode

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # N x 3 x S x S, a view
    return encode(method, pixels, mean, std, device, batch_size=batch)


def load_monitor(refs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The monitor's decoded samples (ObjectRefs of `read_slice` outputs) as arrays."""
    import ray

    out: dict[str, np.ndarray] = {}
    for name in ("train", "query"):
        parts = ray.get(refs[name])
        out[f"{name}_images"] = np.concatenate([p["image"] for p in parts])
        out[f"{name}_labels"] = np.concatenate([p["label"] for p in parts])
        out[f"{name}_ids"] = np.concatenate([p["id"] for p in parts])
    return out


def knn_monitor(
    method: torch.nn.Module,
    monitor: dict[str, np.ndarray],
    num_classes: int,
    k: int,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> dict[str, float]:
    from sepp_ray.models.knn import knn_classify

    tr = _features(method, monitor["train_images"], mean, std, device)
    te = _features(method, monitor["query_images"], mean, std, device)
    return knn_classify(
        tr,
        torch.from_numpy(monitor["train_labels"]).to(device),
        te,
        torch.from_numpy(monitor["query_labels"]).to(device),
        num_classes,
        k=min(k, len(tr)),
    )


class Board:
    """TensorBoard on rank 0: written locally, copied to object storage after each epoch."""

    def __init__(self, out_uri: str) -> None:
        from tensorboardX import SummaryWriter

        from sepp_ray.storage import filesystem, is_remote

        self.remote = is_remote(out_uri)
        self.fs, base = filesystem(out_uri)
        self.target = f"{base}/tensorboard"
        self.dir = tempfile.mkdtemp(prefix="sepp-tb-") if self.remote else self.target
        self.writer = SummaryWriter(self.dir)

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        if self.remote:
            self.fs.put(self.dir + "/", self.target + "/", recursive=True)


def pair_totals(stats: dict[str, float], world: int) -> dict[str, int]:
    """Totals over all ranks of a stretch of steps: pair items trained on (semantic, curated,
    augmentation), mined pairs that took part in the loss (multi-positive, cancel), and
    same-image (query, key) pairs left among the negatives (0 proves the image mask).
    `train_epoch` gives per-step, per-rank means."""
    n = stats["steps"] * world
    keys = ("pair_items", "pairs_used", "same_image_negatives")
    return {k: int(round(stats.get(k, 0.0) * n)) for k in keys}


class Reports:
    """What a report does: the kNN monitor when due (rank 0 holds the monitor), the history
    entry, TensorBoard and the console line (rank 0), and ``ray.train.report`` on every rank,
    the same number of times. Without ``report_every_steps`` each epoch's end reports, with the
    epoch's checkpoint when one was saved. With it, a run reports at fixed optimizer steps
    (`sepp_ray.train.milestones.train_to_milestones` calls `milestone`): the report at an
    epoch's end waits for the epoch's checkpoint and carries it, and a checkpoint saved between
    reports gets a report of its own, marked `CHECKPOINT_ONLY`. A report with a checkpoint
    carries the kNN monitor's result, by which Ray keeps the best checkpoints."""

    def __init__(
        self,
        cfg: WorkerConfig,
        rank: int,
        world: int,
        history: list[dict[str, Any]],
        board: Board | None,
        knn: Callable[[], dict[str, float]] | None,
    ) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.history, self.board, self.knn = history, board, knn
        self.by_epoch = cfg.report_every_steps is None
        self.epoch_end = -1  # the global step at which the epoch being trained ends
        self.saves = False  # whether that epoch ends with a checkpoint
        self.held: tuple[dict[str, Any], int] | None = None  # its end's report, held for it
        self.round: int | None = None  # the re-mining round being trained (None: mined once)

    def begin_epoch(self, epoch: int) -> None:
        data = self.cfg.data
        self.epoch_end = epoch * data.steps_per_epoch + data.steps_in(epoch)
        self.saves = saves_after(self.cfg, epoch + 1)

    def add_knn(self, metrics: dict[str, Any], due: bool) -> None:
        if due and self.knn is not None:
            knn = self.knn()
            metrics["knn_top1"], metrics["knn_top5"] = knn["top1"], knn["top5"]

    def record(self, metrics: dict[str, Any]) -> None:
        """The history entry (saved with the next checkpoint; the manifest's history)."""
        entry = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.history.append(entry if self.round is None else {**entry, "round": self.round})

    def publish(self, metrics: dict[str, Any], x: int, where: str, saved: int | None) -> None:
        """TensorBoard at ``x`` and the console (rank 0), then every rank reports, with the
        checkpoint of epoch ``saved`` when one was just written."""
        from sepp_ray.train.ray_checkpoints import report

        if self.board is not None:
            self.board.log(metrics, x)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
            print(f"[sepp] {where} {shown}", flush=True)
        report(metrics, self.cfg.out, saved, self.rank)

    def milestone(self, stats: dict[str, float], step: int) -> None:
        """A report at global step ``step`` (a multiple of report_every_steps, or the last):
        the kNN monitor every ``knn_every`` reports, at the end and with a checkpoint."""
        cfg, total = self.cfg, self.cfg.data.total_steps
        every = cfg.report_every_steps or 1
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": round(step / cfg.data.steps_per_epoch, 4),  # data epochs done
            "loss": stats["loss"],
            "lr": stats["lr"],
            "pairs_per_s": stats["pairs_per_s"] * self.world,
            **pair_totals(stats, self.world),
        }
        at_end = step == self.epoch_end
        due = (step // every) % cfg.knn_every == 0 or step == total
        self.add_knn(metrics, due or (at_end and self.saves))
        self.record(metrics)
        if at_end:
            self.held = (metrics, step)
        else:
            self.publish(metrics, step, f"step {step}/{total}", None)

    def settle_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        """Reporting by epoch: the kNN monitor when due or at a checkpoint, and the history
        entry, before the checkpoint (which saves the history) is written."""
        if self.by_epoch:
            done, epochs = epoch + 1, self.cfg.data.epochs
            due = done % self.cfg.knn_every == 0 or done == epochs
            self.add_knn(metrics, due or self.saves)
            self.record(metrics)

    def end_epoch(self, metrics: dict[str, Any], epoch: int, saved: int | None) -> None:
        """The epoch's report, after its checkpoint (epoch ``saved``, or None) was written."""
        from sepp_ray.train.ray_checkpoints import CHECKPOINT_ONLY, report

        if self.by_epoch:
            where = f"epoch {epoch + 1}/{self.cfg.data.epochs}"
            self.publish(metrics, epoch + 1, where, saved)
        elif self.held is not None:
            (held, step), self.held = self.held, None
            self.publish(held, step, f"step {step}/{self.cfg.data.total_steps}", saved)
        elif saved is not None:
            only = {**metrics, CHECKPOINT_ONLY: True}
            self.add_knn(only, True)
            report(only, self.cfg.out, saved, self.rank)


def saves_after(cfg: WorkerConfig, done: int) -> bool:
    """Whether a checkpoint follows epoch ``done`` (counted from 1): every
    ``checkpoint_every`` epochs, before every re-mining round, and the last."""
    at_round = cfg.remine is not None and done % cfg.remine.every == 0
    # a round's first epoch always has a checkpoint: a run that dies mid-round redoes it from there
    return done % cfg.checkpoint_every == 0 or done == cfg.data.epochs or at_round
