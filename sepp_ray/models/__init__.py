"""Backbones (timm) and projection / prediction / DINO heads."""

from sepp_ray.models.backbones import create_backbone, list_backbones, register_backbone
from sepp_ray.models.heads import DINOHead, prediction_mlp, projection_mlp

__all__ = [
    "DINOHead",
    "create_backbone",
    "list_backbones",
    "prediction_mlp",
    "projection_mlp",
    "register_backbone",
]
