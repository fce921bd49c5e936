"""The backbone checkpoint format shared by pretraining (writer), mining and evaluation (readers).

A checkpoint is a location with ``backbone.pt`` (the backbone's state dict, and nothing else,
so readers need no method code) and a manifest (kind "checkpoint") that says how to rebuild the
architecture: backbone name, CIFAR stem, feature width, input size and normalisation.
Training state for resuming (optimizer, scaler, RNG) lives beside it, written by the trainer.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sepp_ray.errors import IncompleteError, SeppError
from sepp_ray.models.backbones import create_backbone
from sepp_ray.storage import begin_write, filesystem, finish_write, read_manifest

BACKBONE_FILE = "backbone.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneMeta:
    """How to rebuild and feed a backbone."""

    name: str
    cifar_stem: bool
    feat_dim: int
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def state_dict_bytes(module: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    return buf.getvalue()


def save_backbone(
    uri: str,
    backbone: nn.Module,
    meta: BackboneMeta,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    files: dict[str, bytes] | None = None,
) -> str:
    """Write a complete checkpoint location (plus any extra ``files``, written before the
    manifest); returns the sha256 of the weights file."""
    data = state_dict_bytes(backbone)
    digest = hashlib.sha256(data).hexdigest()
    loc = begin_write(uri, overwrite=overwrite)
    loc.write_bytes(BACKBONE_FILE, data)
    for name, blob in (files or {}).items():
        loc.write_bytes(name, blob)
    finish_write(
        loc, {"kind": "checkpoint", "backbone": asdict(meta), "sha256": digest, **(extra or {})}
    )
    return digest


CHECKPOINT_IS = (
    "a checkpoint is a location written by `sepp pretrain` (or save_backbone): a folder with "
    f"{BACKBONE_FILE} and a manifest; a bare weights file is a state dict saved with "
    "torch.save(model.state_dict()) (.pt/.pth/.bin) or safetensors"
)


def _load_state(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message names its unpickler, not the user's file
        held = (
            "it holds Python objects besides tensors"
            if "unsupported global" in str(e).lower()
            else "torch cannot read it"
        )
        raise SeppError(f"{where} is not a checkpoint ({held}): {CHECKPOINT_IS}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise SeppError(f"{where} holds a {kind}, not a state dict: {CHECKPOINT_IS}")
    return state


def checkpoint_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a checkpoint location, or a SeppError saying what ``uri`` is instead."""
    try:
        m = read_manifest(uri)
    except IncompleteError as e:
        raise SeppError(
            f"{uri} is not a checkpoint: it holds no complete sepp-ray output ({e}). "
            "Pass a location written by `sepp pretrain` (or save_backbone)."
        ) from e
    if m.get("kind") != "checkpoint":
        raise SeppError(
            f"{uri} is a {m.get('kind')!r} output, not a checkpoint: pass a location written "
            "by `sepp pretrain` (or save_backbone)"
        )
    return m


def load_into(module: nn.Module, state: dict[str, torch.Tensor], arch: str, where: str) -> None:
    """Strict load with an error that says what does not fit, instead of torch's wall of keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: "
                f"{tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise SeppError(
            f"the weights in {where} do not fit architecture {arch}: {'; '.join(parts)}. "
            "Name the architecture the weights were trained with (and cifar_stem)."
        )
    module.load_state_dict(state, strict=True)


def load_backbone(uri: str) -> tuple[nn.Module, BackboneMeta, str]:
    """A checkpoint's backbone (eval mode, CPU), its meta, and the weights' sha256."""
    b = checkpoint_manifest(uri)["backbone"]
    meta = BackboneMeta(
        b["name"],
        bool(b["cifar_stem"]),
        int(b["feat_dim"]),
        int(b["image_size"]),
        tuple(b["mean"]),
        tuple(b["std"]),
    )
    fs, path = filesystem(uri)
    with fs.open(f"{path}/{BACKBONE_FILE}", "rb") as f:
        data = f.read()
    model, _ = create_backbone(meta.name, cifar_stem=meta.cifar_stem)
    load_into(model, _load_state(data, uri), meta.name, uri)
    return model.eval(), meta, hashlib.sha256(data).hexdigest()


def load_state_file(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """A bare state dict file (.pt/.pth/.bin or .safetensors) and its sha256."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise SeppError(f"weights file {uri} does not exist")
    with fs.open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return dict(load_safetensors(data)), digest
        except Exception as e:
            raise SeppError(f"{uri} is not a checkpoint (not safetensors): {CHECKPOINT_IS}") from e
    return _load_state(data, uri), digest
