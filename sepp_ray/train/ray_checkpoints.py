"""Checkpoints through Ray Train: the run's checkpoints folder is Ray Train's run folder.

A run's ``RunConfig`` names the run's output as ``storage_path`` and ``checkpoints`` as its
``name``, so Ray Train's run folder is ``OUT/checkpoints``. Rank 0 writes each checkpoint there
in the project's format (`sepp_ray.train.state`: ``epoch-NNNNN``, manifest last) and reports it
where it lies (``CheckpointUploadMode.NO_UPLOAD``): nothing is written twice. Ray then lists the
run's checkpoints (``Result.best_checkpoints``), keeps the best by the kNN monitor and always
the newest (``CheckpointConfig``), hands the newest to a restarted worker group
(``ray.train.get_checkpoint``), and restores the run from its snapshot in that folder when the
same command runs again after the driver died (Train V2 run restoration). Ray's own files there
(its snapshot, a storage marker) are no checkpoints: readers list ``epoch-NNNNN`` folders only.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any

from sepp_ray.storage import Location, ray_storage_filesystem, ray_storage_path
from sepp_ray.train.state import CKPT_DIR, checkpoint_uri

if TYPE_CHECKING:
    from ray.train import Checkpoint, CheckpointConfig, Result

# the validation metric a checkpoint is ranked by: the kNN monitor's top-1 on the val split
SCORE = "knn_top1"
# a report that only carries a checkpoint (runs reporting at fixed steps save at epoch ends,
# between their reports): its metrics say so, and a sweep does not count it as a result
CHECKPOINT_ONLY = "checkpoint_only"


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:05d}"


def checkpoint_config(keep: int, scored: bool) -> CheckpointConfig:
    """Keep the ``keep`` best checkpoints by the kNN monitor (the newest is always kept on top
    of them); without a monitor, the ``keep`` newest. ``keep`` 0: keep all."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(
        num_to_keep=keep if keep > 0 else None,
        checkpoint_score_attribute=SCORE if scored else None,
        checkpoint_score_order="max",
    )


def run_storage(out_uri: str) -> dict[str, Any]:
    """``RunConfig`` arguments that make ``OUT/checkpoints`` Ray Train's run folder."""
    return {
        "name": CKPT_DIR,
        "storage_path": ray_storage_path(out_uri),
        "storage_filesystem": ray_storage_filesystem(out_uri),
    }


def in_place(out_uri: str, epoch: int) -> Checkpoint:
    """Epoch ``epoch``'s checkpoint, already written in the run folder, as Ray sees it."""
    from ray.train import Checkpoint

    uri = checkpoint_uri(out_uri, epoch)
    return Checkpoint(ray_storage_path(uri), filesystem=ray_storage_filesystem(out_uri))


def report(metrics: dict[str, Any], out_uri: str, saved: int | None, rank: int) -> None:
    """``ray.train.report`` on every rank, the same number of times; when epoch ``saved``'s
    checkpoint was just written, rank 0 reports it in place (the other ranks report None)."""
    import ray.train

    if saved is None:
        ray.train.report(metrics)
        return
    ray.train.report(
        metrics,
        checkpoint=in_place(out_uri, saved) if rank == 0 else None,
        checkpoint_dir_name=checkpoint_name(saved),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
    )


def uri_of(out_uri: str, checkpoint: Checkpoint) -> str:
    """The URI of a checkpoint of the run in ``out_uri`` that Ray hands back."""
    return Location(out_uri).child(CKPT_DIR, posixpath.basename(checkpoint.path.rstrip("/"))).uri


def resume_uri(out_uri: str) -> str | None:
    """The checkpoint this rank resumes from: Ray's newest reported one (after a lost worker,
    or in a run restored after its driver died); None for a fresh run."""
    import ray.train

    found = ray.train.get_checkpoint()
    return uri_of(out_uri, found) if found is not None else None


def best_uri(result: Result, out_uri: str) -> str | None:
    """The kept checkpoint with the best kNN monitor result (None without a monitor)."""
    scored = [(m[SCORE], c) for c, m in result.best_checkpoints or [] if SCORE in m]
    return uri_of(out_uri, max(scored, key=lambda x: x[0])[1]) if scored else None


def restored_from(out_uri: str) -> tuple[int, str] | None:
    """(epoch, URI) of the checkpoint a run in ``out_uri`` resumes from: the newest one in Ray
    Train's run snapshot there (left by a run whose driver died); None for a fresh run."""
    from ray.train import Result

    run = Location(out_uri).child(CKPT_DIR).uri
    try:
        found = Result.from_path(
            ray_storage_path(run), storage_filesystem=ray_storage_filesystem(out_uri)
        ).checkpoint
    except RuntimeError:  # no run folder, or no snapshot in it: nothing was reported yet
        return None
    if found is None:
        return None
    uri = uri_of(out_uri, found)
    return int(posixpath.basename(uri).split("-")[1]), uri
