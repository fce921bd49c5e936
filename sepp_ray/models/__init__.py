"""Backbones (timm) and projection / prediction / DINO heads."""

from sepp_ray.models.backbones import BACKBONES, check_backbone, create_backbone, list_backbones
from sepp_ray.models.heads import DINOHead, prediction_mlp, projection_mlp

__all__ = [
    "BACKBONES",
    "DINOHead",
    "check_backbone",
    "create_backbone",
    "list_backbones",
    "prediction_mlp",
    "projection_mlp",
]
