"""Each loss against an oracle: lightly's implementations, or hand-computed references.

lightly is imported inside the tests that use it: the GPU image lacks it, and its `pytest -m gpu`
collects this module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sepp_ray.losses import (
    DINOLoss,
    barlow_twins_loss,
    byol_loss,
    info_nce_loss,
    negative_cosine_similarity,
    pair_counts,
    positive_mask,
    resolve_masks,
    same_image_mask,
    self_mask,
    vicreg_loss,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_view_masks(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's masks for queries = keys = cat(view0, view1): ids repeat, self excluded."""
    ids = torch.arange(n).repeat(2)  # 2n
    return positive_mask(ids, ids), self_mask(2 * n, 2 * n, 0)


# --- positive_mask / self_mask ---------------------------------------------------------------


def test_positive_mask_matches_loop() -> None:
    query_ids = torch.tensor([3, 7, 9, -1])
    key_ids = torch.tensor([7, 3, 5, 9, -1, 3, 8])
    pos_ids = torch.tensor([[5, -1], [8, 3], [-1, -1], [-1, 9]])
    got = positive_mask(query_ids, key_ids, pos_ids)
    want = np.zeros((4, 7), dtype=bool)
    for i, qid in enumerate(query_ids.tolist()):
        allowed = {qid} | set(pos_ids[i].tolist())
        for j, kid in enumerate(key_ids.tolist()):
            want[i, j] = kid >= 0 and kid in allowed
    assert got.dtype == torch.bool
    np.testing.assert_array_equal(got.numpy(), want)
    assert not got[:, 4].any()  # a -1 key never matches, not even -1 padding
    assert got[3].nonzero().flatten().tolist() == [3]  # unknown own id, one semantic positive
    np.testing.assert_array_equal(
        positive_mask(query_ids, key_ids).numpy(),
        (query_ids[:, None] == key_ids[None, :]).numpy() & (key_ids >= 0).numpy()[None, :],
    )


def test_positive_mask_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N x P"):
        positive_mask(torch.arange(3), torch.arange(4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D"):
        positive_mask(torch.zeros(3, 1, dtype=torch.long), torch.arange(4))


def test_self_mask() -> None:
    mask = self_mask(3, 8, 2)
    want = np.ones((3, 8), dtype=bool)
    for i in range(3):
        want[i, 2 + i] = False
    np.testing.assert_array_equal(mask.numpy(), want)
    with pytest.raises(ValueError):
        self_mask(3, 4, 2)


# --- info_nce_loss ---------------------------------------------------------------------------


def _loop_reference(
    q: np.ndarray, k: np.ndarray, pos: np.ndarray, t: float, valid: np.ndarray | None
) -> float:
    """SupCon L_out by plain loops: mean over anchors with a positive of the mean -log p."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    per_anchor = []
    for i in range(q.shape[0]):
        allowed = [j for j in range(k.shape[0]) if valid is None or valid[i, j]]
        positives = [j for j in allowed if pos[i, j]]
        if not positives:
            continue
        denom = sum(math.exp(float(q[i] @ k[j]) / t) for j in allowed)
        terms = [-math.log(math.exp(float(q[i] @ k[p]) / t) / denom) for p in positives]
        per_anchor.append(sum(terms) / len(terms))
    return sum(per_anchor) / len(per_anchor)


def test_info_nce_multi_positive_matches_loop() -> None:
    q = torch.randn(3, 2, generator=_gen(1), dtype=torch.float64)
    k = torch.randn(5, 2, generator=_gen(2), dtype=torch.float64)
    pos = torch.tensor(
        [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool
    )  # anchor 0: 2 positives, anchor 1: none (ignored), anchor 2: 3
    valid = torch.tensor(
        [[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [1, 1, 0, 1, 1]], dtype=torch.bool
    )  # anchor 2's positive at column 2 is not valid, so it is not a positive
    for vm in (None, valid):
        got = info_nce_loss(q, k, pos, 0.3, vm).item()
        want = _loop_reference(
            q.numpy(), k.numpy(), pos.numpy(), 0.3, None if vm is None else vm.numpy()
        )
        assert got == pytest.approx(want, rel=1e-10)


def test_info_nce_multi_positive_is_mean_over_positives() -> None:
    q = torch.randn(1, 4, generator=_gen(3))
    k = torch.randn(6, 4, generator=_gen(4))
    both = torch.tensor([[True, False, True, False, False, False]])
    first = torch.tensor([[True, False, False, False, False, False]])
    second = torch.tensor([[False, False, True, False, False, False]])
    got = info_nce_loss(q, k, both, 0.2)
    want = (info_nce_loss(q, k, first, 0.2) + info_nce_loss(q, k, second, 0.2)) / 2
    torch.testing.assert_close(got, want)


def test_info_nce_rows_without_positive_are_ignored() -> None:
    q = torch.randn(4, 8, generator=_gen(5))
    k = torch.randn(7, 8, generator=_gen(6))
    pos = torch.zeros(4, 7, dtype=torch.bool)
    pos[0, 2] = pos[2, 5] = pos[2, 6] = True
    got = info_nce_loss(q, k, pos, 0.5)
    want = info_nce_loss(q[[0, 2]], k, pos[[0, 2]], 0.5)
    torch.testing.assert_close(got, want)


def test_info_nce_valid_mask_excludes_self() -> None:
    """Self-similarity is dropped from the denominator, and the self column is never a positive
    even when pos_mask (built from ids) marks it."""
    z = torch.randn(4, 3, generator=_gen(7), dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 1])
    got = info_nce_loss(z, z, positive_mask(ids, ids), 0.5, self_mask(4, 4, 0))
    zn = F.normalize(z, dim=1)
    want = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        logits = torch.stack([zn[i] @ zn[j] / 0.5 for j in others])
        partner = others.index([2, 3, 0, 1][i])
        want += -(logits[partner] - torch.logsumexp(logits, 0)).item() / 4
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_info_nce_cancel_removes_exactly_the_mined_pairs_from_the_negatives() -> None:
    """False-negative cancellation (arXiv 2011.11765) on 3 images x 2 views, SimCLR form:
    image 0 mined image 1, image 2 mined images 0 and 2 (itself: its other view stays the
    positive). The cancelled keys leave the denominator and nothing else changes."""
    z = torch.randn(6, 3, generator=_gen(30), dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    mined = torch.tensor([[1, -1], [-1, -1], [0, 2]])  # per image, -1 padded
    pos, valid = positive_mask(ids, ids), self_mask(6, 6, 0)
    cancel = positive_mask(ids, ids, mined.repeat(2, 1))
    got = info_nce_loss(z, z, pos, 0.4, valid, cancel).item()

    mined_of = {0: {1}, 1: set(), 2: {0, 2}}
    hand_valid = np.zeros((6, 6), dtype=bool)
    for i in range(6):
        for j in range(6):
            is_pos = j != i and int(ids[j]) == int(ids[i])
            hand_valid[i, j] = j != i and (is_pos or int(ids[j]) not in mined_of[int(ids[i])])
    assert hand_valid.sum() == 6 * 5 - 2 * 2 - 2 * 2  # views 0 and 2 each drop 2 keys
    want = _loop_reference(z.numpy(), z.numpy(), pos.numpy(), 0.4, hand_valid)
    assert got == pytest.approx(want, rel=1e-10)

    plain = info_nce_loss(z, z, pos, 0.4, valid).item()
    attract = info_nce_loss(z, z, positive_mask(ids, ids, mined.repeat(2, 1)), 0.4, valid)
    assert len({round(got, 8), round(plain, 8), round(attract.item(), 8)}) == 3


def test_positive_mask_without_same_id() -> None:
    q, k = torch.tensor([3, 7]), torch.tensor([3, 7, 5, -1])
    pos = torch.tensor([[5, -1], [-1, -1]])
    assert positive_mask(q, k, pos, same_id=False).tolist() == [
        [False, False, True, False],
        [False, False, False, False],
    ]
    assert not positive_mask(q, k, same_id=False).any()


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_info_nce_one_positive_equals_lightly_ntxent(temperature: float) -> None:
    n = 8
    z0 = torch.randn(n, 16, generator=_gen(8))
    z1 = torch.randn(n, 16, generator=_gen(9))
    pos, valid = _two_view_masks(n)
    z = torch.cat([z0, z1])
    from lightly.loss import NTXentLoss

    got = info_nce_loss(z, z, pos, temperature, valid)
    want = NTXentLoss(temperature=temperature)(z0, z1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_info_nce_moco_form_equals_cross_entropy() -> None:
    """Query vs cat(key, queue) with the key as only positive = MoCo's CE on N x (1+K) logits."""
    n, k_queue, t = 5, 11, 0.2
    q = F.normalize(torch.randn(n, 6, generator=_gen(10)), dim=1)
    k = F.normalize(torch.randn(n, 6, generator=_gen(11)), dim=1)
    queue = F.normalize(torch.randn(k_queue, 6, generator=_gen(12)), dim=1)
    ids = torch.arange(n)
    queue_ids = torch.full((k_queue,), -1)  # ids of old batches unknown: never positives
    key_ids = torch.cat([ids, queue_ids])  # N + K
    # MoCo's negatives are the queue only: the other queries' keys are not in the denominator
    valid = torch.cat([torch.eye(n, dtype=torch.bool), torch.ones(n, k_queue, dtype=torch.bool)], 1)
    got = info_nce_loss(q, torch.cat([k, queue]), positive_mask(ids, key_ids), t, valid)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / t  # N x (1+K)
    want = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(got, want)


def test_info_nce_gradcheck() -> None:
    q = torch.randn(3, 2, generator=_gen(13), dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 2, generator=_gen(14), dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, 1] = valid[2, 3] = False

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return info_nce_loss(a, b, pos, 0.4, valid)

    assert torch.autograd.gradcheck(fn, (q, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_info_nce_low_precision_is_fp32_and_stable(dtype: torch.dtype) -> None:
    n = 16
    z = torch.randn(2 * n, 32, generator=_gen(15)).to(dtype)
    pos, valid = _two_view_masks(n)
    got = info_nce_loss(z, z, pos, 0.01, valid)  # small temperature: logits up to 100
    want = info_nce_loss(z.double(), z.double(), pos, 0.01, valid)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    zg = z.clone().requires_grad_()
    info_nce_loss(zg, zg, pos, 0.01, valid).backward()
    assert zg.grad is not None and torch.isfinite(zg.grad.float()).all()


def test_info_nce_raises_without_positive() -> None:
    z = torch.randn(3, 4, generator=_gen(16))
    ids = torch.arange(3)
    with pytest.raises(ValueError, match="no anchor has a positive"):
        info_nce_loss(z, z, positive_mask(ids, ids), 0.1, self_mask(3, 3, 0))
    with pytest.raises(ValueError, match="pos_mask"):
        info_nce_loss(z, z, torch.ones(3, 2, dtype=torch.bool), 0.1)


# --- negative cosine / BYOL ------------------------------------------------------------------


def test_negative_cosine_and_byol() -> None:
    from lightly.loss import NegativeCosineSimilarity

    p = torch.randn(10, 7, generator=_gen(17))
    z = torch.randn(10, 7, generator=_gen(18))
    got = negative_cosine_similarity(p, z)
    torch.testing.assert_close(got, NegativeCosineSimilarity()(p, z))
    byol = byol_loss(p, z)
    torch.testing.assert_close(byol, 2.0 * (1.0 + got))
    want = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean()  # BYOL eq. 2
    torch.testing.assert_close(byol, want)
    assert negative_cosine_similarity(p.bfloat16(), z.bfloat16()).dtype == torch.float32


# --- DINO ------------------------------------------------------------------------------------


def test_dino_matches_lightly_over_steps() -> None:
    """2 global + 2 local crops, teacher temperature warm-up and centre updates over 4 steps."""
    from lightly.loss import DINOLoss as LightlyDINOLoss

    out_dim, b = 12, 6
    temps = {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "student_temp": 0.1}
    ours = DINOLoss(
        out_dim, warmup_teacher_temp_epochs=3, total_epochs=10, center_momentum=0.8, **temps
    )
    ref = LightlyDINOLoss(out_dim, warmup_teacher_temp_epochs=3, center_momentum=0.8, **temps)
    assert "center" in dict(ours.named_buffers())
    g = _gen(19)
    for epoch in range(4):  # epochs 0..2 warm up, 3 uses teacher_temp
        teacher = [torch.randn(b, out_dim, generator=g) * 3 for _ in range(2)]
        student = [torch.randn(b, out_dim, generator=g, requires_grad=True) for _ in range(4)]
        got = ours(student, teacher, epoch)
        want = ref(teacher, student, epoch=epoch)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ours.center, ref.center.reshape(1, out_dim))
        grads = torch.autograd.grad(got, student)
        want_grads = torch.autograd.grad(want, student)
        for a, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(a, w)
    assert ours.center.abs().sum() > 0  # the centre did move
    assert ours.teacher_temperature(1) == pytest.approx(0.055)
    assert ours.teacher_temperature(50) == pytest.approx(0.07)


def test_dino_rejects_bad_views() -> None:
    loss = DINOLoss(4)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError):
        loss([x], [x], 0)
    with pytest.raises(ValueError):
        loss([x, torch.randn(3, 4)], [x], 0)


# --- VICReg / Barlow Twins -------------------------------------------------------------------


def test_vicreg_matches_lightly() -> None:
    from lightly.loss import VICRegLoss

    z_a = torch.randn(16, 10, generator=_gen(20), requires_grad=True)
    z_b = torch.randn(16, 10, generator=_gen(21), requires_grad=True)
    for gather in (True, False):  # no process group: gather changes nothing
        got = vicreg_loss(z_a, z_b, sim_coeff=20.0, std_coeff=30.0, cov_coeff=2.0, gather=gather)
        want = VICRegLoss(lambda_param=20.0, mu_param=30.0, nu_param=2.0)(z_a, z_b)
        torch.testing.assert_close(got, want)
        for a, w in zip(
            torch.autograd.grad(got, (z_a, z_b)), torch.autograd.grad(want, (z_a, z_b)), strict=True
        ):
            torch.testing.assert_close(a, w)
    # small-scale embeddings: the variance hinge is active, so the term is really compared
    small = (z_a.detach() * 0.1, z_b.detach() * 0.1)
    torch.testing.assert_close(vicreg_loss(*small), VICRegLoss()(*small))


def test_barlow_twins_matches_lightly() -> None:
    from lightly.loss import BarlowTwinsLoss

    z_a = torch.randn(16, 10, generator=_gen(22), requires_grad=True)
    z_b = (z_a.detach() + 0.5 * torch.randn(16, 10, generator=_gen(23))).requires_grad_()
    got = barlow_twins_loss(z_a, z_b, lambda_offdiag=0.0051)
    want = BarlowTwinsLoss(lambda_param=0.0051)(z_a, z_b)
    torch.testing.assert_close(got, want)
    for a, w in zip(
        torch.autograd.grad(got, (z_a, z_b)), torch.autograd.grad(want, (z_a, z_b)), strict=True
    ):
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("fn", [vicreg_loss, barlow_twins_loss])
def test_redundancy_losses_low_precision(fn) -> None:  # type: ignore[no-untyped-def]
    z_a = torch.randn(16, 10, generator=_gen(24))
    z_b = torch.randn(16, 10, generator=_gen(25))
    got = fn(z_a.bfloat16(), z_b.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(z_a.bfloat16().float(), z_b.bfloat16().float()))
    with pytest.raises(ValueError):
        fn(z_a, z_b[:, :5])


# --- image identity: same-image keys, augmentation-pair weight, pair counts ------------------


def test_same_image_mask_matches_loop() -> None:
    q = torch.tensor([[1, 1], [2, 5], [-1, -1], [7, 3]])
    k = torch.tensor([[5, 5], [1, 9], [-1, 2], [3, 3], [8, 8]])
    got = same_image_mask(q, k)
    want = [
        [bool({a for a in qi if a >= 0} & {b for b in kj if b >= 0}) for kj in k.tolist()]
        for qi in q.tolist()
    ]
    assert got.tolist() == want
    assert got.sum() == 4 and not got[2].any()  # a -1 ("none") matches nothing
    with pytest.raises(ValueError, match="N x A"):
        same_image_mask(torch.arange(3), k)


def test_info_nce_same_image_key_is_removed_like_by_hand() -> None:
    """A same-image key leaves the softmax of its query only, unless it is the positive: the
    loss equals each anchor's loss with that key deleted from the keys."""
    q = torch.randn(3, 4, generator=_gen(40), dtype=torch.float64)
    k = torch.randn(5, 4, generator=_gen(41), dtype=torch.float64)
    pos = torch.zeros(3, 5, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = True
    same = torch.zeros(3, 5, dtype=torch.bool)
    same[0, 3] = same[1, 1] = same[1, 4] = True  # (1, 1) is its positive: kept
    got = info_nce_loss(q, k, pos, 0.3, same_image=same)
    per_anchor = []
    for i in range(3):
        keep = [j for j in range(5) if pos[i, j] or not same[i, j]]
        per_anchor.append(info_nce_loss(q[i : i + 1], k[keep], pos[i : i + 1, keep], 0.3))
    torch.testing.assert_close(got, torch.stack(per_anchor).mean())
    assert not torch.allclose(got, info_nce_loss(q, k, pos, 0.3))


@pytest.mark.parametrize("w", [None, 0.0, 0.5, 1.0])
def test_info_nce_aug_weight_matches_loop(w: float | None) -> None:
    q = torch.randn(3, 4, generator=_gen(42), dtype=torch.float64)
    k = torch.randn(6, 4, generator=_gen(43), dtype=torch.float64)
    aug = torch.zeros(3, 6, dtype=torch.bool)
    aug[0, 0] = aug[1, 1] = True  # anchor 2 has no augmentation pair among the keys
    pos = aug.clone()
    pos[0, 2] = pos[0, 3] = pos[0, 4] = pos[2, 5] = True  # anchor 1: only its aug pair
    got = info_nce_loss(q, k, pos, 0.2, aug_mask=aug, aug_weight=w).item()
    log_p = torch.log_softmax(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2, dim=1)
    want = []
    for i in range(3):
        a = [-log_p[i, j].item() for j in range(6) if aug[i, j]]
        o = [-log_p[i, j].item() for j in range(6) if pos[i, j] and not aug[i, j]]
        if w is None or not a or not o:  # every positive alike, or only one kind
            want.append(sum(a + o) / len(a + o))
        else:
            want.append(w * sum(a) / len(a) + (1 - w) * sum(o) / len(o))
    assert got == pytest.approx(sum(want) / 3, rel=1e-10)
    # None is the plain multi-positive loss; the default weighs anchor 0's pair 1/4
    if w is None:
        assert got == pytest.approx(info_nce_loss(q, k, pos, 0.2).item(), rel=1e-12)
    with pytest.raises(ValueError, match="aug_weight"):
        info_nce_loss(q, k, pos, 0.2, aug_mask=aug, aug_weight=1.5)


def test_resolve_masks_and_pair_counts() -> None:
    pos = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    same = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    mined = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    p, v = resolve_masks(pos, valid, mined, same)  # cancel mode: mined leave the negatives
    assert p.tolist() == pos.tolist()
    assert v is not None and v.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert resolve_masks(p, v, mined, same)[1].tolist() == v.tolist()  # idempotent
    counts = pair_counts(same, p, v, mined, valid)
    # mined pairs of different images the query may meet: (0, 2), (0, 3), (1, 0); (1, 3) is
    # not a key of query 1 and (0, 1) is its own image
    assert float(counts["pairs_used"]) == 3 and float(counts["same_image_negatives"]) == 0
    # the same-image keys left in the softmax are counted: (0, 1) and (1, 2)
    assert float(pair_counts(same, pos, valid)["same_image_negatives"]) == 2
