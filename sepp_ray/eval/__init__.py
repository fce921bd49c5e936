"""Evaluation of representations: kNN, linear probe, semi-supervised fine-tuning, detection."""

from sepp_ray.eval.knn import knn_classify, knn_scores, topk_accuracy
from sepp_ray.eval.linear import LinearProbeConfig, linear_probe

__all__ = ["knn_classify", "knn_scores", "topk_accuracy", "LinearProbeConfig", "linear_probe"]
