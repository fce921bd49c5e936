"""Pretraining checkpoints on object storage: every one is a complete backbone checkpoint
(usable at once by `sepp mine` and `sepp eval`) plus the training state to resume from.

Layout under a run's output: ``checkpoints/epoch-00010/`` (manifest written last, so a crash
mid-write leaves nothing that looks complete). ``checkpoints/`` is also Ray Train's run folder
(`sepp_ray.train.ray_checkpoints`): Ray chooses which checkpoints to keep and holds its own
files there (its run snapshot, a storage marker), which readers skip: only complete
``epoch-NNNNN`` folders are checkpoints.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from sepp_ray.errors import SeppError
from sepp_ray.models.checkpoint import BackboneMeta, save_backbone
from sepp_ray.storage import Location, read_manifest

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"
CKPT_DIR = "checkpoints"
DIVERGED = "diverged.json"  # written by rank 0 when the loss became non-finite
_NAME = re.compile(r"^epoch-(\d{5})$")


def checkpoint_uri(out_uri: str, epoch: int) -> str:
    return Location(out_uri).child(CKPT_DIR, f"epoch-{epoch:05d}").uri


def save_training_checkpoint(
    out_uri: str,
    epoch: int,
    backbone: torch.nn.Module,
    meta: BackboneMeta,
    state: dict[str, Any],
    info: dict[str, Any],
    keep: int,
) -> str:
    """Write epoch ``epoch``'s checkpoint (rank 0 only), then prune to the newest ``keep``
    (0: prune nothing, as in a Ray Train run, where the run's ``CheckpointConfig`` prunes)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    uri = checkpoint_uri(out_uri, epoch)
    save_backbone(
        uri,
        backbone,
        meta,
        extra={"epoch": epoch, **info},
        overwrite=True,
        files={STATE_FILE: buf.getvalue()},
    )
    complete = list_checkpoints(out_uri)
    for old_epoch, old_uri in complete[:-keep] if keep > 0 else []:
        loc = Location(old_uri)
        loc.fs.rm(loc.path, recursive=True)
        log.info("pruned checkpoint of epoch %d", old_epoch)
    return uri


def list_checkpoints(out_uri: str) -> list[tuple[int, str]]:
    """(epoch, uri) of the complete checkpoints, oldest first."""
    base = Location(out_uri).child(CKPT_DIR)
    found = []
    for name in base.listdir():
        m = _NAME.match(name)
        if m and base.child(name).exists("manifest.json"):
            found.append((int(m.group(1)), base.child(name).uri))
    return sorted(found)


def latest_checkpoint(out_uri: str) -> tuple[int, str] | None:
    found = list_checkpoints(out_uri)
    return found[-1] if found else None


def load_training_state(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the saved training state, the checkpoint manifest)."""
    manifest = read_manifest(uri)
    loc = Location(uri)
    with loc.fs.open(loc.join(STATE_FILE), "rb") as f:
        data = f.read()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # torch's own message names its unpickler, not the damaged file
        raise SeppError(
            f"{loc.join(STATE_FILE)} is not a training state saved by `sepp pretrain`: "
            f"the checkpoint {uri} is damaged; delete it to resume from the one before, or "
            "pass overwrite=true to start over"
        ) from e
    return state, manifest
