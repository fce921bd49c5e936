"""Evaluation of representations: kNN, linear probe, semi-supervised fine-tuning, detection."""

from sepp_ray.eval.linear import LinearProbeConfig, linear_probe
from sepp_ray.models.knn import knn_classify, knn_scores, topk_accuracy

__all__ = ["knn_classify", "knn_scores", "topk_accuracy", "LinearProbeConfig", "linear_probe"]
