"""Items know their images: no view of an image is a negative of a view of the same image.

Batches are built by hand (items of one image: an original and a pair item made of it, an
augmentation-pair item), so these tests do not depend on the data plane. References are plain
loops over sets of image ids; the MoCo queue test removes the negative from the queue itself.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from test_methods import hand_nce, make_views, tiny  # noqa: E402

from sepp_ray.errors import SeppError  # noqa: E402
from sepp_ray.losses import info_nce_loss, pair_counts, positive_mask, self_mask  # noqa: E402
from sepp_ray.methods.base import Inputs  # noqa: E402
from sepp_ray.methods.identity import RowIds, contrast_masks  # noqa: E402
from sepp_ray.methods.simclr import contrastive_loss  # noqa: E402

T = 0.3
# six items: four originals (images 10..13), a semantic-pair item (anchor 10, positive 12) and
# an augmentation-pair item of image 11. Item ids of pair items are derived, not image ids.
IDS = torch.tensor([10, 11, 12, 13, 901, 902])
VIEW_IDS = torch.tensor([[10, 10], [11, 11], [12, 12], [13, 13], [10, 12], [11, 11]])
N = len(IDS)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images_of(view_ids: torch.Tensor) -> list[set[int]]:
    return [{int(v) for v in row if v >= 0} for row in view_ids]


def hand_masks(
    q_ids: list[int],
    q_img: list[set[int]],
    k_ids: list[int],
    k_img: list[set[int]],
    allowed: list[list[bool]],
    own_ok: list[bool] | None = None,
    mined: list[set[int]] | None = None,
    q_groups: list[int] | None = None,
    k_groups: list[int] | None = None,
    use: str = "none",
) -> tuple[list[list[bool]], list[list[bool]]]:
    """(positives, softmax keys) by loops: positives are the query's own item (where own_ok),
    and with "attract" its mined ids and group; keys sharing an image (and with "cancel" the
    mined ones) leave the softmax unless positive."""
    pos, valid = [], []
    for i, qi in enumerate(q_ids):
        prow, vrow = [], []
        for j, kj in enumerate(k_ids):
            grouped = q_groups is not None and k_groups is not None and q_groups[i] >= 0
            same_group = grouped and k_groups[j] == q_groups[i]  # type: ignore[index]
            linked = mined is not None and (kj in mined[i] or same_group)
            own = kj == qi and (own_ok is None or own_ok[j])
            p = allowed[i][j] and kj >= 0 and (own or (use == "attract" and linked))
            removed = bool(q_img[i] & k_img[j]) or (use == "cancel" and linked)
            prow.append(p)
            vrow.append(allowed[i][j] and (p or not removed))
        pos.append(prow)
        valid.append(vrow)
    return pos, valid


def simclr_inputs(**kw: Any) -> Inputs:
    views, _ = make_views(N)
    return Inputs(views, IDS, view_ids=VIEW_IDS, **kw)


# --- the batch -------------------------------------------------------------------------------


def test_simclr_batch_with_items_of_one_image_equals_hand_removed_negatives() -> None:
    m = tiny("simclr")
    x = simclr_inputs()
    with torch.no_grad():
        loss, metrics = m.training_loss(x.views, IDS, view_ids=VIEW_IDS)
        z = m.projector(m.backbone(torch.cat(x.views)))  # 2N x D
    ids = IDS.tolist() * 2
    img = images_of(VIEW_IDS) * 2
    allowed = [[i != j for j in range(2 * N)] for i in range(2 * N)]
    pos, valid = hand_masks(ids, img, ids, img, allowed)
    torch.testing.assert_close(loss, hand_nce(z, z, pos, valid, m.hp.temperature))
    # the batch does hold same-image pairs that would be negatives: 901 (10, 12) meets the
    # originals 10 and 12, 902 meets 11: 3 item pairs, each way, 2 x 2 views: 24
    shared = sum(
        1
        for i in range(2 * N)
        for j in range(2 * N)
        if allowed[i][j] and img[i] & img[j] and ids[i] != ids[j]
    )
    assert shared == 24
    assert float(metrics["same_image_negatives"]) == 0.0


def test_plain_batch_of_distinct_images_is_unchanged() -> None:
    """Each item its own image: the loss is the old one (item ids only), to the bit."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2 * N, 8, generator=g, dtype=torch.float64)
    ids = torch.arange(N)
    x = Inputs([], ids, view_ids=torch.stack([ids + 50, ids + 50], 1))
    loss, counts = contrastive_loss(z, x, T)
    q = ids.repeat(2)
    old = info_nce_loss(z, z, positive_mask(q, q), T, self_mask(2 * N, 2 * N, 0))
    assert torch.equal(loss, old)
    assert float(counts["same_image_negatives"]) == 0 and float(counts["pairs_used"]) == 0


def test_same_image_count_can_fail() -> None:
    """The count reads the masks the softmax used: without the image mask it counts them."""
    q = RowIds(IDS, VIEW_IDS, torch.full((N,), -1)).repeat(2)
    valid = self_mask(2 * N, 2 * N, 0)
    m = contrast_masks(q, q, None, "none", valid)
    unmasked = pair_counts(m.same, positive_mask(q.ids, q.ids) & valid, valid)
    assert float(unmasked["same_image_negatives"]) == 24
    assert float(m.counts()["same_image_negatives"]) == 0


# --- MoCo's queue ----------------------------------------------------------------------------


def moco_with_queue() -> tuple[Any, dict[str, torch.Tensor]]:
    """A MoCo whose queue holds keys of items 10 and 11 (4 slots, symmetric enqueue)."""
    m = tiny("mocov2").eval()  # eval: BN running statistics, so forward passes agree
    views, _ = make_views(2, seed=3)
    ids = torch.tensor([10, 11])
    m.training_loss(views, ids, view_ids=torch.stack([ids, ids], 1))
    return m, {k: v.clone() for k, v in m.state_dict().items()}


def without_slots(state: dict[str, torch.Tensor], drop: list[int]) -> Any:
    """A MoCo with the queue slots `drop` deleted: the negatives removed by hand."""
    size = state["queue"].shape[0]
    keep = [i for i in range(size) if i not in drop]
    m = tiny("mocov2", queue_size=len(keep)).eval()
    queue_keys = ("queue", "queue_ids", "queue_images", "queue_groups")
    m.load_state_dict({k: v[keep] if k in queue_keys else v for k, v in state.items()})
    return m


def test_moco_queue_key_of_the_same_image_equals_it_removed_by_hand() -> None:
    m, state = moco_with_queue()
    slots_10 = (m.queue_ids == 10).nonzero().flatten().tolist()
    assert len(slots_10) == 2 and set(m.queue_images[slots_10].flatten().tolist()) == {10}
    # this step: the original of image 10 again, and a pair item (10, 12): both share image
    # 10 with the queued keys of item 10, which must not be negatives of either
    views, _ = make_views(2, seed=4)
    ids, view_ids = torch.tensor([10, 901]), torch.tensor([[10, 10], [10, 12]])

    def loss(model: Any) -> tuple[torch.Tensor, Any]:
        with torch.no_grad():
            return model.training_loss(views, ids, view_ids=view_ids)

    got, metrics = loss(m)
    want, _ = loss(without_slots(state, slots_10))
    torch.testing.assert_close(got, want)
    assert float(metrics["same_image_negatives"]) == 0
    # the test can fail: the same slots as keys of another image are negatives, and count
    m.load_state_dict(state)
    m.queue_ids[slots_10] = 500
    m.queue_images[slots_10] = 500
    other, _ = loss(m)
    assert not torch.allclose(other, want)


def test_moco_cancel_cancels_only_mined_positives() -> None:
    """With no mined pair, cancel mode is plain MoCo even though the queue holds older keys of
    the query's own image (those are the image mask's, in every arm)."""
    m, state = moco_with_queue()
    views, _ = make_views(2, seed=4)
    ids = torch.tensor([10, 11])
    vid = torch.stack([ids, ids], 1)
    with torch.no_grad():
        plain = m.training_loss(views, ids, view_ids=vid)[0]
        m.load_state_dict(state)
        cancel = m.training_loss(views, ids, view_ids=vid, cancel_ids=torch.full((2, 1), -1))[0]
        m.load_state_dict(state)
        mined = m.training_loss(views, ids, view_ids=vid, cancel_ids=torch.tensor([[11], [-1]]))
    torch.testing.assert_close(cancel, plain, rtol=0, atol=0)
    assert not torch.allclose(mined[0], plain)
    assert float(mined[1]["pairs_used"]) > 0


def test_moco_matches_loops_with_groups_and_images_in_the_queue() -> None:
    """Every MoCo mask by loops: images and groups stored with the queued keys."""
    m = tiny("mocov2").eval()
    g1 = torch.tensor([7, 7, -1])
    first = torch.tensor([20, 21, 22])  # 20 and 21 of group 7; image 22 comes back below
    m.training_loss(
        make_views(3, seed=5)[0],
        first,
        view_ids=torch.stack([first, first], 1),
        pos_ids=torch.full((3, 1), -1),
        groups=g1,
    )
    state = {k: v.clone() for k, v in m.state_dict().items()}
    views, _ = make_views(4, seed=6)
    ids = torch.tensor([23, 24, 903, 25])
    view_ids = torch.tensor([[23, 23], [24, 24], [22, 24], [25, 25]])
    groups = torch.tensor([7, 7, -1, -1])  # 23, 24 join group 7: positives of 20 and 21
    pos_ids = torch.tensor([[20], [-1], [-1], [22]])
    with torch.no_grad():
        got, metrics = m.training_loss(
            views, ids, view_ids=view_ids, pos_ids=pos_ids, groups=groups
        )
        m.load_state_dict(state)
        q1, q2 = (m.projector(m.backbone(v)) for v in views)
        k1, k2 = (F.normalize(m.momentum_projector(m.momentum_backbone(v)), dim=1) for v in views)
    k_ids = ids.tolist() + m.queue_ids.tolist()
    k_img = images_of(view_ids) + images_of(m.queue_images)
    k_groups = groups.tolist() + m.queue_groups.tolist()
    own_ok = [True] * 4 + [False] * len(m.queue_ids)
    allowed = [[kid >= 0 for kid in k_ids] for _ in range(4)]
    mined = [{int(p) for p in row if p >= 0} for row in pos_ids]
    pos, valid = hand_masks(
        ids.tolist(),
        images_of(view_ids),
        k_ids,
        k_img,
        allowed,
        own_ok,
        mined,
        groups.tolist(),
        k_groups,
        "attract",
    )
    t = m.hp.temperature
    want = (
        hand_nce(q1, torch.cat([k2, m.queue]), pos, valid, t)
        + hand_nce(q2, torch.cat([k1, m.queue]), pos, valid, t)
    ) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # mined pairs between different images, both terms: 23 and 24 meet each other in the
    # batch (2) and the 4 queued keys of 20 and 21 (8); 23 also meets 20 by its pos_ids (no
    # extra pair: the same keys); 25 meets 22 in the queue (2 keys), not 903 (image 22)
    used = sum(
        1
        for i in range(4)
        for j in range(len(k_ids))
        if allowed[i][j]
        and not (images_of(view_ids)[i] & k_img[j])
        and (k_ids[j] in mined[i] or (groups[i] >= 0 and k_groups[j] == int(groups[i])))
    )
    assert used == 12
    assert float(metrics["pairs_used"]) == 2 * used
    assert float(metrics["same_image_negatives"]) == 0


# --- multi-positive groups -------------------------------------------------------------------


def cos_between(z: torch.Tensor, a: list[int], b: list[int]) -> float:
    zn = F.normalize(z, dim=1)
    return float((zn[a] @ zn[b].T).mean())


@pytest.mark.parametrize("with_groups", [True, False])
def test_two_positives_of_one_anchor_attract_each_other(with_groups: bool) -> None:
    """Items 1 and 2 are mined positives of anchor 0 (not in this batch). In a group they are
    positives of each other, so a gradient step brings them closer; linked only to the anchor
    they are negatives of each other and move apart."""
    g = torch.Generator().manual_seed(2)
    n = 4
    z = torch.randn(2 * n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 2, 3, 4])
    pos_ids = torch.tensor([[0], [0], [-1], [-1]])
    groups = torch.tensor([5, 5, -1, -1]) if with_groups else None
    x = Inputs([], ids, pos_ids, view_ids=torch.stack([ids, ids], 1), groups=groups)
    loss, counts = contrastive_loss(z, x, T)
    loss.backward()
    assert z.grad is not None
    rows_1, rows_2 = [0, n], [1, n + 1]  # both views of items 1 and 2
    before = cos_between(z.detach(), rows_1, rows_2)
    after = cos_between(z.detach() - 0.5 * z.grad, rows_1, rows_2)
    assert (after > before) is with_groups, (before, after)
    # the loss counts them as positives: 2 rows x 2 rows each way
    assert float(counts["pairs_used"]) == (8 if with_groups else 0)


def test_groups_follow_the_use_and_need_mined_ids() -> None:
    m = tiny("simclr")
    views, ids = make_views(4)
    with pytest.raises(SeppError, match="groups"):
        m.training_loss(views, ids, groups=torch.tensor([1, 1, -1, -1]))
    with pytest.raises(ValueError, match="groups"):
        m.training_loss(views, ids, pos_ids=torch.full((4, 1), -1), groups=torch.zeros(3).long())


# --- across ranks ----------------------------------------------------------------------------

# rank 0 holds originals 10 and 11, rank 1 the pair item (10, 12) and the original of 12
DIST_IDS = torch.tensor([10, 11, 901, 12])
DIST_VIEWS = torch.tensor([[10, 10], [11, 11], [10, 12], [12, 12]])


def dist_case(rank: int, world: int) -> dict[str, Any]:
    """SimCLR's loss on fixed embeddings and two MoCo steps, on this rank's half."""
    n = len(DIST_IDS) // world
    part = slice(rank * n, (rank + 1) * n)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, len(DIST_IDS), 8, generator=g, dtype=torch.float64)
    z_local = z[:, part].reshape(2 * n, 8)  # view-major rows of this rank's items
    x = Inputs([], DIST_IDS[part], view_ids=DIST_VIEWS[part])
    loss, counts = contrastive_loss(z_local, x, T)
    rows = RowIds.of(x).repeat(2)
    masks = contrast_masks(rows, rows.gather(), None, "none")
    m = tiny("mocov2").eval()
    views, _ = make_views(len(DIST_IDS), seed=8)
    moco = []
    for _ in range(2):  # step 2 meets step 1's keys of the same images in the queue
        with torch.no_grad():
            out = m.training_loss([v[part] for v in views], x.ids, view_ids=x.view_ids)
        moco.append((float(out[0]), float(out[1]["same_image_negatives"])))
    return {
        "loss": float(loss),
        "same_image_negatives": float(counts["same_image_negatives"]),
        "shared_with_other_rank": int(masks.same[:, 2 * n :].sum()) if rank == 0 else -1,
        "moco": moco,
    }


def dist_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = dist_case(rank, world)
        results: list[Any] = [None] * world
        torch_dist.all_gather_object(results, result)
        if rank == 0:
            torch.save(results, out)
    finally:
        torch_dist.destroy_process_group()


def test_the_mask_holds_for_keys_gathered_from_another_rank(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "identity.pt"
    mp.spawn(dist_worker, args=(2, port, str(out)), nprocs=2, join=True)
    ranks = torch.load(out)
    one = dist_case(0, 1)
    # rank 0's views of image 10 meet the pair item's views on rank 1 (2 x 2 pairs)
    assert ranks[0]["shared_with_other_rank"] == 4
    assert all(r["same_image_negatives"] == 0 for r in ranks)
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(one["loss"], rel=1e-10)
    for step in range(2):
        mean = sum(r["moco"][step][0] for r in ranks) / 2
        assert mean == pytest.approx(one["moco"][step][0], rel=1e-4)
        assert all(r["moco"][step][1] == 0 for r in ranks)


# --- the training step -----------------------------------------------------------------------


def test_trainer_passes_view_ids_and_groups_and_reports_the_counts() -> None:
    from tests.test_train_step import batch, make_trainer
    from tests.test_train_step import tiny as step_tiny

    b = batch(pair=True)
    b["group"] = torch.tensor([3, 3, 3, -1, -1, -1, -1, -1])  # items 0, 1, 2: one group
    b["view_ids"][4] = torch.tensor([0, 1004])  # item 4 is a pair item of image 0
    trainer = make_trainer(step_tiny(), pair_use="attract")
    metrics = trainer.train_step(b, 0, 0)
    # both views of items 0, 1, 2 attract each other (pos_ids link 0 and 1 too): 3 x 2 item
    # pairs x 2 x 2 views; none of them shares an image
    assert float(metrics["pairs_used"]) == 24
    assert float(metrics["same_image_negatives"]) == 0
    out = trainer.read_metrics()
    assert out["pairs_used"] == 24 and out["same_image_negatives"] == 0
    for key, fix in (("view_ids", "rebuild the run's item table"), ("group", "rebuild")):
        with pytest.raises(SeppError, match=f"no '{key}' column.*{fix}"):
            trainer.train_step({k: v for k, v in b.items() if k != key}, 0, 1)
    with pytest.raises(SeppError, match="view_ids must be B x 2"):
        trainer.train_step({**b, "view_ids": b["id"]}, 0, 1)
