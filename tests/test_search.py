"""Semantic-pair search (arXiv 2306.16122): every exact backend equals the numpy reference, the
reference equals a plain-loop oracle, and bad input is refused with SeppError."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sepp_ray.errors import SeppError
from sepp_ray.mining import (
    Pairs,
    Vectors,
    available_backends,
    build_searcher,
    choose_anchors,
    merge_shard_results,
    search,
    search_numpy,
    similarity_histogram,
    validate_thresholds,
)

LO, HI = 0.96, 0.99
F32 = np.float32


def _chunk_options(name: str) -> list[dict[str, Any]]:
    """Defaults, and tiny chunks that force multi-block merges and ties across blocks."""
    tiny: dict[str, dict[str, Any]] = {
        "torch": {"query_chunk": 7, "key_chunk": 13},
        "numpy": {"chunk_bytes": 4 * 50},
    }
    return [{}, tiny[name]] if name in tiny else [{}]


EXACT_CASES = [(n, opts) for n in available_backends(exact=True) for opts in _chunk_options(n)]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(F32)


def at_cos(q: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector with cosine ~c to unit q (random orthogonal direction)."""
    u = rng.normal(size=q.shape)
    u -= (u @ q) * q
    u /= np.linalg.norm(u)
    return (c * q + np.sqrt(1.0 - c * c) * u).astype(F32)


def clustered(n: int, d: int, centers: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(centers, d)))
    return unit(base[rng.integers(0, centers, n)] + noise * rng.normal(size=(n, d)))


def near_threshold_set(seed: int) -> tuple[Vectors, Vectors]:
    """Anchors whose keys sit just inside/outside lo and hi, above hi, and near-duplicates."""
    rng = np.random.default_rng(seed)
    d, n_anchor = 48, 30
    anchors = unit(rng.normal(size=(n_anchor, d)))
    offsets = [-3e-3, -5e-5, 5e-5, 3e-3]
    cos = [LO + o for o in offsets] + [HI + o for o in offsets] + [0.975, 0.995, 1 - 1e-6]
    rows = [anchors]
    for a in anchors:
        picks = rng.choice(len(cos), size=8, replace=False)  # distinct: no near-ties
        rows.append(np.stack([at_cos(a, cos[i], rng) for i in picks]))
    rows.append(unit(rng.normal(size=(200, d))))  # background
    vecs = np.concatenate(rows)
    ids = rng.permutation(10 * len(vecs))[: len(vecs)].astype(np.int64)  # unordered, sparse ids
    keys = Vectors(ids, vecs)
    qrows = np.concatenate([np.arange(n_anchor), rng.choice(len(vecs), 20, replace=False)])
    return Vectors(ids[np.unique(qrows)], vecs[np.unique(qrows)]), keys


def oracle(
    q: Vectors, k: Vectors, lo: float, hi: float, m: int | None, dup_eps: float = 1e-4
) -> Pairs:
    """Plain loops over the same float32 similarity matrix: the semantics, spelled out."""
    sims = q.vecs @ k.vecs.T
    out: list[tuple[int, int, float, int]] = []
    for i, a in enumerate(q.ids):
        cands = [
            (float(-sims[i, j]), int(kid))
            for j, kid in enumerate(k.ids)
            if kid != a
            and sims[i, j] >= F32(lo)
            and sims[i, j] <= F32(hi)
            and sims[i, j] < F32(1 - dup_eps)
        ]
        for r, (neg, kid) in enumerate(sorted(cands)[:m]):
            out.append((int(a), kid, -neg, r + 1))
    cols: list[Any] = list(zip(*out, strict=True)) if out else [[], [], [], []]
    return Pairs(*(np.array(c) for c in cols))


def assert_same(got: Pairs, ref: Pairs, tol: float = 1e-5) -> None:
    assert len(ref) > 0
    np.testing.assert_array_equal(got.anchor_id, ref.anchor_id)
    np.testing.assert_array_equal(got.positive_id, ref.positive_id)
    np.testing.assert_array_equal(got.rank, ref.rank)
    np.testing.assert_allclose(got.similarity, ref.similarity, atol=tol, rtol=0)
    assert got.anchor_id.dtype == np.int64 and got.rank.dtype == np.int32
    assert got.similarity.dtype == np.float32


@pytest.mark.parametrize("m", [1, 3, None])
def test_reference_matches_loop_oracle(m: int | None) -> None:
    q, k = near_threshold_set(seed=1)
    assert_same(search_numpy(q, k, LO, HI, m), oracle(q, k, LO, HI, m), tol=0)


@pytest.mark.parametrize(("backend", "opts"), EXACT_CASES)
@pytest.mark.parametrize("m", [1, 4])
def test_exact_backends_equal_reference_near_thresholds(
    backend: str, opts: dict[str, Any], m: int
) -> None:
    q, k = near_threshold_set(seed=2)
    ref = search_numpy(q, k, LO, HI, m)
    assert (ref.rank > 1).any() or m == 1
    assert_same(search(q, k, LO, HI, m, backend=backend, **opts), ref)


@pytest.mark.parametrize(("backend", "opts"), EXACT_CASES)
def test_exact_backends_equal_reference_clustered(backend: str, opts: dict[str, Any]) -> None:
    x = clustered(600, 24, centers=12, noise=0.04, seed=3)
    ids = np.arange(600, dtype=np.int64)[::-1].copy()
    k = Vectors(ids, x)
    q = k.take(np.arange(0, 600, 7))
    ref = search_numpy(q, k, 0.97, 0.995, 5)
    assert_same(search(q, k, 0.97, 0.995, 5, backend=backend, **opts), ref)


def gap_midpoint(sims: np.ndarray, near: float, width: float = 2e-3) -> float:
    """The middle of the widest gap between similarities within `width` of `near`: a threshold
    no similarity sits on, where float rounding of different backends could disagree."""
    v = np.unique(sims[(sims > near - width) & (sims < near + width)].astype(np.float64))
    i = int(np.argmax(np.diff(v)))
    return float((v[i] + v[i + 1]) / 2)


def crowded(seed: int = 15) -> tuple[Vectors, Vectors, float, float]:
    """Few tight clusters: anchors with hundreds of in-window keys, far past any first k."""
    x = clustered(1500, 16, centers=4, noise=0.06, seed=seed)
    rng = np.random.default_rng(seed)
    k = Vectors(rng.permutation(1500).astype(np.int64), x)
    q = k.take(np.arange(0, 1500, 10))
    sims = q.vecs @ k.vecs.T
    return q, k, gap_midpoint(sims, LO), gap_midpoint(sims, 0.995)


def test_crowded_reference_matches_loop_oracle() -> None:
    q, k, lo, hi = crowded()
    ref = search_numpy(q, k, lo, hi)  # m = None: every in-window key
    assert_same(ref, oracle(q, k, lo, hi, None), tol=0)
    per_anchor = np.bincount(np.unique(ref.anchor_id, return_inverse=True)[1])
    assert per_anchor.max() > 200 and np.median(per_anchor) > 64


def assert_same_pairs(got: Pairs, ref: Pairs) -> None:
    """Same (anchor, positive) set and similarities; rank order may differ only where two
    similarities are equal to float32 rounding (BLAS kernels sum in different orders)."""
    assert len(ref) > 0 and len(got) == len(ref)
    as_dict = {}
    for name, p in (("got", got), ("ref", ref)):
        keys = zip(p.anchor_id.tolist(), p.positive_id.tolist(), strict=True)
        as_dict[name] = dict(zip(keys, p.similarity.tolist(), strict=True))
    assert as_dict["got"].keys() == as_dict["ref"].keys()
    diff = [abs(as_dict["got"][key] - s) for key, s in as_dict["ref"].items()]
    assert max(diff) <= 1e-5
    np.testing.assert_array_equal(got.anchor_id, ref.anchor_id)  # anchors in input order
    np.testing.assert_array_equal(got.rank, ref.rank)


@pytest.mark.parametrize(("backend", "opts"), EXACT_CASES)
def test_every_in_window_key_is_returned(backend: str, opts: dict[str, Any]) -> None:
    q, k, lo, hi = crowded()
    ref = search_numpy(q, k, lo, hi, None)
    got = search(q, k, lo, hi, None, backend=backend, **opts)
    assert_same_pairs(got, ref)
    assert_same_pairs(search(q, k, lo, hi, backend=backend, **opts), ref)  # None: the default
    capped = search(q, k, lo, hi, 5, backend=backend, **opts)
    assert_same_pairs(capped, Pairs(*(getattr(got, c)[got.rank <= 5] for c in got.to_dict())))


@pytest.mark.parametrize("backend", available_backends(exact=True))
def test_merged_key_shards_keep_every_in_window_key(backend: str) -> None:
    q, k, lo, hi = crowded()
    shard_of = np.random.default_rng(16).integers(0, 3, len(k))
    parts = [
        search(q, k.take(np.flatnonzero(shard_of == s)), lo, hi, backend=backend) for s in range(3)
    ]
    merged = merge_shard_results(parts, None, query_ids=q.ids)
    assert_same_pairs(merged, search_numpy(q, k, lo, hi))


@pytest.mark.parametrize("backend", available_backends())
def test_output_past_the_limit_is_an_error(backend: str) -> None:
    q, k, lo, hi = crowded()
    n = len(search_numpy(q, k, lo, hi))
    assert len(search(q, k, lo, hi, backend=backend, limit=n)) <= n
    with pytest.raises(SeppError, match=f"more than {n // 3} pairs.*Raise lo"):
        search(q, k, lo, hi, backend=backend, limit=n // 3)
    assert len(search(q, k, lo, hi, 2, backend=backend, limit=2 * len(q))) <= 2 * len(q)
    with pytest.raises(SeppError, match="limit"):
        search(q, k, lo, hi, backend=backend, limit=-1)


def edge_keys(lo: float, hi: float, step: type = F32, dim: int = 8) -> tuple[Vectors, dict]:
    """Anchor e1 and keys whose dot with it is exactly a chosen value (one nonzero product):
    lo, hi, and one `step`-dtype spacing outside each."""
    named = {
        "at_lo": F32(lo),
        "at_hi": F32(hi),
        "below_lo": F32(np.nextafter(step(lo), step(-1))),
        "above_hi": F32(np.nextafter(step(hi), step(2))),
    }
    vecs, ids, names = [np.eye(dim, dtype=F32)[0]], [100], {}
    for j, (name, c) in enumerate(named.items()):
        v = np.zeros(dim, dtype=F32)
        v[0], v[j + 1] = c, np.sqrt(1 - float(c) ** 2)
        vecs.append(v)
        ids.append(200 + j)
        names[name] = 200 + j
    return Vectors(np.array(ids, dtype=np.int64), np.stack(vecs)), names


@pytest.mark.parametrize(("backend", "opts"), EXACT_CASES)
def test_threshold_edges_are_inclusive(backend: str, opts: dict[str, Any]) -> None:
    k, names = edge_keys(LO, HI)
    got = search(k.take(np.array([0])), k, LO, HI, 10, backend=backend, **opts)
    assert got.positive_id.tolist() == [names["at_hi"], names["at_lo"]]
    assert got.similarity.tolist() == [F32(HI), F32(LO)]
    assert got.rank.tolist() == [1, 2]


@pytest.mark.parametrize(("backend", "opts"), EXACT_CASES)
def test_self_and_duplicates_excluded(backend: str, opts: dict[str, Any]) -> None:
    e1 = np.eye(4, dtype=F32)[0]

    def key(c: float, j: int) -> np.ndarray:
        v = np.zeros(4, dtype=F32)
        v[0], v[j] = F32(c), np.sqrt(1 - float(F32(c)) ** 2)
        return v

    # 5 has norm 0.9995 (valid): its self-similarity 0.999 is in range and not a duplicate, so
    # only the id rule drops it; 6 and 10 are both e1: exact duplicates of each other
    vecs = np.stack([0.9995 * e1, e1, key(1 - 1e-5, 1), key(1 - 1e-3, 2), key(0.995, 3), e1])
    k = Vectors(np.array([5, 6, 7, 8, 9, 10]), vecs.astype(F32))
    q = k.take(np.array([0, 1]))

    def per_anchor(p: Pairs) -> dict[int, list[int]]:
        return {a: p.positive_id[p.anchor_id == a].tolist() for a in (5, 6)}

    got = search(q, k, 0.99, 1.0, 10, backend=backend, **opts)
    # 6 and 10 tie at 0.9995 for anchor 5: smaller id first; 7 is within dup_eps of anchor 6
    assert per_anchor(got) == {5: [6, 10, 7, 8, 9], 6: [5, 8, 9]}
    assert (got.anchor_id != got.positive_id).all()
    wide = search(q, k, 0.99, 1.0, 10, backend=backend, dup_eps=1e-6, **opts)
    assert per_anchor(wide) == {5: [6, 10, 7, 8, 9], 6: [7, 5, 8, 9]}  # 10 (cos 1) still out


@pytest.mark.parametrize(("backend", "opts"), EXACT_CASES)
def test_ties_break_by_smaller_id(backend: str, opts: dict[str, Any]) -> None:
    dim, c = 40, F32(0.97)
    rng = np.random.default_rng(4)
    vecs = [np.eye(dim, dtype=F32)[0]]
    for j in range(1, 31):  # 30 distinct keys, all at exactly cos c with e1
        v = np.zeros(dim, dtype=F32)
        v[0], v[j] = c, np.sqrt(1 - float(c) ** 2)
        vecs.append(v)
    ids = np.concatenate([[0], rng.permutation(np.arange(1000, 1030))]).astype(np.int64)
    k = Vectors(ids, np.stack(vecs))
    for m in (1, 3):
        got = search(k.take(np.array([0])), k, LO, HI, m, backend=backend, **opts)
        assert got.positive_id.tolist() == list(range(1000, 1000 + m))
        again = search(k.take(np.array([0])), k.take(rng.permutation(31)), LO, HI, m, backend)
        assert again.positive_id.tolist() == got.positive_id.tolist()


@pytest.mark.parametrize("backend", available_backends())
def test_no_pairs_gives_typed_empty_result(backend: str) -> None:
    x = unit(np.random.default_rng(14).normal(size=(300, 64)))  # random: cos near 0
    k = Vectors(np.arange(300, dtype=np.int64), x)
    got = search(k.take(np.arange(20)), k, 0.999, 0.9995, 2, backend=backend)
    assert len(got) == 0 and got.similarity.dtype == np.float32 and got.rank.dtype == np.int32
    assert len(merge_shard_results([got, got], 2)) == 0


@pytest.mark.parametrize("backend", available_backends(exact=True))
def test_m_cap_and_output_order(backend: str) -> None:
    x = clustered(500, 16, centers=5, noise=0.05, seed=5)
    k = Vectors(np.arange(500, dtype=np.int64), x)
    order = np.random.default_rng(5).permutation(500)[:60]  # anchors in a scrambled order
    q = k.take(order)
    got = search(q, k, 0.9, 0.999, 3, backend=backend)
    sims = q.vecs @ k.vecs.T
    in_range = (sims >= F32(0.9)) & (sims <= F32(0.999)) & (k.ids[None] != q.ids[:, None])
    expect = np.minimum(in_range.sum(1), 3)
    counts = {a: int((got.anchor_id == a).sum()) for a in q.ids}
    assert [counts[a] for a in q.ids] == expect.tolist()
    assert expect.max() == 3
    first = [int(np.flatnonzero(got.anchor_id == a)[0]) for a in q.ids if counts[a]]
    assert first == sorted(first)  # anchors keep input order
    for a in q.ids:  # ranks 1..n with non-increasing similarity
        sel = got.anchor_id == a
        assert got.rank[sel].tolist() == list(range(1, int(sel.sum()) + 1))
        assert (np.diff(got.similarity[sel]) <= 0).all()


@pytest.mark.parametrize("backend", available_backends(exact=True))
def test_merge_of_key_shards_equals_union(backend: str) -> None:
    x = clustered(700, 16, centers=10, noise=0.05, seed=6)
    rng = np.random.default_rng(6)
    k = Vectors(rng.permutation(700).astype(np.int64), x)
    q = k.take(rng.permutation(700)[:80])
    full = search(q, k, 0.95, 0.995, 4, backend=backend)
    shard_of = rng.integers(0, 3, 700)
    parts = [
        search(q, k.take(np.flatnonzero(shard_of == s)), 0.95, 0.995, 4, backend=backend)
        for s in range(3)
    ]
    assert_same(merge_shard_results(parts, 4, query_ids=q.ids), full, tol=1e-6)
    by_id = np.argsort(q.ids)
    sorted_full = search(q.take(by_id), k, 0.95, 0.995, 4, backend=backend)
    assert_same(merge_shard_results(parts, 4), sorted_full, tol=1e-6)
    with pytest.raises(SeppError, match="overlap"):
        merge_shard_results([parts[0], parts[0]], 4)


def test_faiss_ivf_recall_on_clustered_data() -> None:
    x = clustered(4000, 32, centers=40, noise=0.035, seed=7)
    k = Vectors(np.arange(4000, dtype=np.int64), x)
    q = k.take(np.arange(0, 4000, 8))
    exact = search_numpy(q, k, LO, HI, 5)
    approx = search(q, k, LO, HI, 5, backend="faiss-ivf", nprobe=8, seed=0)
    truth = set(zip(exact.anchor_id.tolist(), exact.positive_id.tolist(), strict=True))
    found = set(zip(approx.anchor_id.tolist(), approx.positive_id.tolist(), strict=True))
    assert len(truth) > 1000
    assert len(truth & found) / len(truth) >= 0.9
    sims = np.einsum("ij,ij->i", k.vecs[approx.anchor_id], k.vecs[approx.positive_id])
    assert ((sims >= LO - 1e-5) & (sims <= HI + 1e-5)).all()  # approximate: never out of range
    assert (approx.anchor_id != approx.positive_id).all()


def test_torch_backend_takes_tensors_and_refuses_bf16() -> None:
    q, k = near_threshold_set(seed=8)
    as_t = Vectors(k.ids, torch.from_numpy(k.vecs))
    assert_same(search(q, as_t, LO, HI, 2, backend="torch"), search_numpy(q, k, LO, HI, 2))
    with pytest.raises(SeppError, match="bf16"):
        build_searcher(k, "torch", dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        from sepp_ray.mining.search import similarity_block

        similarity_block(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3))


def test_vector_validation_errors() -> None:
    q, k = near_threshold_set(seed=9)
    bad = k.numpy().copy()
    bad[3, 0], bad[10, 5] = np.nan, np.inf
    with pytest.raises(SeppError, match="^2 key vector rows contain NaN or inf"):
        search(q, Vectors(k.ids, bad), LO, HI)
    scaled = k.numpy().copy()
    scaled[:4] *= 1.01
    with pytest.raises(SeppError, match="^4 key vector rows are not unit norm"):
        search(q, Vectors(k.ids, scaled), LO, HI)
    with pytest.raises(SeppError, match="float32"):
        search(q, Vectors(k.ids, k.numpy().astype(np.float64)), LO, HI)
    with pytest.raises(SeppError, match="repeats"):
        search(q, Vectors(np.zeros(len(k), dtype=np.int64), k.vecs), LO, HI)
    with pytest.raises(SeppError, match="dim"):
        search(Vectors(q.ids, unit(np.ones((len(q), 5)))), k, LO, HI)
    with pytest.raises(SeppError, match="non-empty"):
        search(Vectors(np.zeros(0, dtype=np.int64), np.zeros((0, 48), F32)), k, LO, HI)
    with pytest.raises(SeppError, match="positive int"):
        search(q, k, LO, HI, m=0)
    with pytest.raises(SeppError, match="unknown search backend"):
        search(q, k, LO, HI, backend="annoy")


@pytest.mark.parametrize(
    ("lo", "hi", "msg"),
    [
        (0.99, 0.96, "swap"),
        (-1.5, 0.9, "outside"),
        (0.5, 1.01, "outside"),
        (float("nan"), 1, "NaN"),
    ],
)
def test_threshold_validation(lo: float, hi: float, msg: str) -> None:
    with pytest.raises(SeppError, match=msg):
        validate_thresholds(lo, hi)
    q, k = near_threshold_set(seed=10)
    with pytest.raises(SeppError, match=msg):
        search(q, k, lo, hi)
    assert validate_thresholds(0.96, 0.99) == (0.96, 0.99)


def test_anchor_choice_is_seeded_and_order_free() -> None:
    ids = np.random.default_rng(11).permutation(np.arange(5, 5005)).astype(np.int64)
    a = choose_anchors(ids, 0.1, seed=3)
    assert len(a) == 500 and (np.diff(a) > 0).all() and np.isin(a, ids).all()
    np.testing.assert_array_equal(a, choose_anchors(ids[::-1].copy(), 0.1, seed=3))
    np.testing.assert_array_equal(a, choose_anchors(ids, 500, seed=3))  # count form, same draw
    assert not np.array_equal(a, choose_anchors(ids, 0.1, seed=4))
    np.testing.assert_array_equal(choose_anchors(ids, 1.0, seed=0), np.sort(ids))
    assert len(choose_anchors(ids, 1, seed=0)) == 1


@pytest.mark.parametrize(
    ("k", "msg"),
    [(0, "no anchor"), (5001, "exceeds"), (0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (1e-5, "raise")],
)
def test_anchor_count_errors(k: float, msg: str) -> None:
    with pytest.raises(SeppError, match=msg):
        choose_anchors(np.arange(5000), k, seed=0)


def test_anchor_input_errors() -> None:
    with pytest.raises(SeppError, match="non-empty"):
        choose_anchors(np.zeros(0, dtype=np.int64), 1, seed=0)
    with pytest.raises(SeppError, match="repeats"):
        choose_anchors(np.array([1, 2, 2]), 1, seed=0)


def test_similarity_histogram_counts_pairs() -> None:
    q, k = near_threshold_set(seed=12)
    pairs = search_numpy(q, k, LO, HI, 4)
    counts, edges = similarity_histogram(pairs.similarity, bins=6, lo=LO, hi=HI)
    assert counts.sum() == len(pairs) and len(edges) == 7
    assert edges[0] == pytest.approx(LO) and edges[-1] == pytest.approx(HI)


@pytest.mark.gpu
def test_torch_cuda_fp16_matches_reference() -> None:
    lo, hi = 0.9375, 0.984375  # exact in fp16, so the edges stay exact on the fp16 path
    k, names = edge_keys(lo, hi, step=np.float16)
    got = search(k.take(np.array([0])), k, lo, hi, 10, backend="torch", device="cuda")
    assert got.positive_id.tolist() == [names["at_hi"], names["at_lo"]]
    x = clustered(3000, 64, centers=30, noise=0.03, seed=13)
    kk = Vectors(np.arange(3000, dtype=np.int64), x)
    q = kk.take(np.arange(0, 3000, 5))
    ref = search_numpy(q, kk, LO, HI, 3)
    gpu = search(q, kk, LO, HI, 3, backend="torch", device="cuda")
    a = set(zip(ref.anchor_id.tolist(), ref.positive_id.tolist(), strict=True))
    b = set(zip(gpu.anchor_id.tolist(), gpu.positive_id.tolist(), strict=True))
    assert len(a) > 500 and len(a & b) >= 0.99 * max(len(a), len(b))
    cq, ck, clo, chi = crowded()  # every in-window key (m = None) on the fp16 path
    ref_all = search_numpy(cq, ck, clo, chi)
    gpu_all = search(cq, ck, clo, chi, backend="torch", device="cuda")
    a = set(zip(ref_all.anchor_id.tolist(), ref_all.positive_id.tolist(), strict=True))
    b = set(zip(gpu_all.anchor_id.tolist(), gpu_all.positive_id.tolist(), strict=True))
    assert len(a) > 10_000 and len(a & b) >= 0.99 * max(len(a), len(b))


def _module_imports(module: Any) -> set[str]:
    """The sepp_ray modules a module imports at its top level (its own import statements)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("sepp_ray.")}


def test_backends_import_the_base_never_the_entry_point() -> None:
    """search imports every backend; the backends and the base import neither search nor each
    other, so the registry fills without an import circle."""
    import importlib

    from sepp_ray.mining import search_base, search_faiss, search_torch

    entry = importlib.import_module("sepp_ray.mining.search")  # the package re-exports search()

    backends = {"sepp_ray.mining.search_torch", "sepp_ray.mining.search_faiss"}
    assert backends <= _module_imports(entry)
    for mod in (search_base, search_torch, search_faiss):
        imported = _module_imports(mod)
        assert "sepp_ray.mining.search" not in imported, mod.__name__
        assert not (imported & backends), mod.__name__
    assert "sepp_ray.mining.search_base" in _module_imports(search_torch)
    assert {"numpy", "torch", "faiss-flat", "faiss-ivf"} <= set(available_backends())


def test_faiss_backend_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """The faiss module loads and registers without faiss; building a faiss index without it
    is the import error that names faiss."""
    import ast
    import inspect
    import sys

    from sepp_ray.mining import search_faiss

    top = ast.parse(inspect.getsource(search_faiss)).body
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.split(".")[0] == "faiss"]
    monkeypatch.setitem(sys.modules, "faiss", None)
    _, k = near_threshold_set(seed=11)
    with pytest.raises(ImportError, match="faiss"):
        build_searcher(k, "faiss-flat")
