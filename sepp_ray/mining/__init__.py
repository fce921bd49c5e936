"""Semantic-pair mining (arXiv 2306.16122): anchors, similarity search backends, pairs."""

from sepp_ray.mining.anchors import (
    Vectors,
    choose_anchors,
    resolve_k,
    validate_thresholds,
    validate_vectors,
)
from sepp_ray.mining.search import (
    DEFAULT_DUP_EPS,
    IVF_RECOMMENDED_N,
    SEARCH_BACKENDS,
    KeySearcher,
    Pairs,
    auto_backend,
    available_backends,
    build_searcher,
    merge_shard_results,
    search,
    search_numpy,
    similarity_histogram,
)

__all__ = [
    "DEFAULT_DUP_EPS",
    "IVF_RECOMMENDED_N",
    "SEARCH_BACKENDS",
    "KeySearcher",
    "Pairs",
    "Vectors",
    "auto_backend",
    "available_backends",
    "build_searcher",
    "choose_anchors",
    "merge_shard_results",
    "resolve_k",
    "search",
    "search_numpy",
    "similarity_histogram",
    "validate_thresholds",
    "validate_vectors",
]
