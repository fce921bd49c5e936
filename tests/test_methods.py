"""Every registered SSL method, parametrised over the registry: a new method is tested once it
is registered. Tiny backbone (timm `test_resnet`), tiny heads, 8 px images."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sepp_ray.data.recipes import RECIPES
from sepp_ray.errors import SeppError
from sepp_ray.methods import (
    PAIR_USES,
    check_pair_use,
    create_method,
    fit_hparams,
    list_methods,
    make_hparams,
    method_class,
    method_hparams,
)
from sepp_ray.methods.base import Method, cosine_momentum, ema_update

# shrink whichever of these fields a method's hyperparameters have
SMALL = {
    "proj_hidden_dim": 64,
    "proj_output_dim": 32,
    "pred_hidden_dim": 64,
    "queue_size": 48,
    "out_dim": 64,
    "bottleneck_dim": 32,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread per test, restored after: on tiny tensors on a shared 2-core machine
    torch's thread pool only waits on descheduled threads (a 10x slowdown was measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ATTRACT = ["simclr", "supcon", "mocov2", "nnclr"]  # pair use "attract" (pos_ids)
CANCEL = ["simclr", "mocov2", "nnclr"]  # pair use "cancel" (cancel_ids)
N = 8  # images per batch in the per-step tests


def tiny(name: str, **extra: Any) -> Any:
    """A method with tiny heads (typed Any: tests reach into each method's own submodules)."""
    fields = {f.name for f in dataclasses.fields(method_hparams(name))}
    overrides = {k: v for k, v in SMALL.items() if k in fields} | extra
    torch.manual_seed(0)
    return create_method(name, backbone="test_resnet", **overrides)


def make_views(n: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n fixed images and two fixed 'augmentations' of them: noise, and flip + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    v1 = x + 0.1 * torch.randn(x.shape, generator=g)
    v2 = x.flip(-1) + 0.1 * torch.randn(x.shape, generator=g)
    return [v1, v2], torch.arange(n, dtype=torch.long)


def labels_for(method: Method, n: int) -> torch.Tensor | None:
    """Class labels (4 classes, -1 for the last image) for methods that need them, else None."""
    if not method.needs_labels:
        return None
    labels = torch.arange(n) % 4
    labels[-1] = -1
    return labels


def train_loss(
    method: Method, views: list[torch.Tensor], ids: torch.Tensor, **kw: Any
) -> torch.Tensor:
    """`training_loss`'s loss, with labels for methods that need them."""
    kw.setdefault("labels", labels_for(method, len(ids)))
    return method.training_loss(views, ids, **kw)[0]


def loss_from(
    method: Method,
    state: dict[str, torch.Tensor],
    views: list[torch.Tensor],
    ids: torch.Tensor,
    pos_ids: torch.Tensor | None,
    **kw: Any,
) -> torch.Tensor:
    """Loss from a fixed state (training_loss mutates queues and DINO's centre)."""
    method.load_state_dict(state)
    with torch.no_grad():
        return train_loss(method, views, ids, pos_ids=pos_ids, **kw)


def linked_pos_ids(n: int) -> torch.Tensor:
    """N x 2 semantic positives, -1 padded: image 0 <-> 1 and image 2 -> 5."""
    pos = torch.full((n, 2), -1, dtype=torch.long)
    pos[0, 0], pos[1, 1], pos[2, 0] = 1, 0, 5
    return pos


@pytest.mark.parametrize("name", list_methods())
def test_registry_metadata(name: str) -> None:
    cls = method_hparams(name)
    assert dataclasses.is_dataclass(cls)
    cls()  # every field has the paper's default
    m = tiny(name)
    assert m.name == name
    assert m.default_recipe in RECIPES
    assert ("attract" in m.pair_uses) is (name in ATTRACT)
    assert ("cancel" in m.pair_uses) is (name in CANCEL)
    assert "none" in m.pair_uses and m.pair_uses <= set(PAIR_USES)
    assert m.needs_labels is (name == "supcon")


@pytest.mark.parametrize("name", list_methods())
def test_loss_finite_and_grad_reaches_backbone(name: str) -> None:
    m = tiny(name)
    views, ids = make_views(N)
    loss, metrics = m.training_loss(views, ids, labels=labels_for(m, N))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert metrics["loss"] == pytest.approx(loss.item())
    loss.backward()
    grads = [p.grad for p in m.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads if g is not None) > 0
    # frozen (target) parameters never receive a gradient
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", list_methods())
def test_loss_falls(name: str) -> None:
    m = tiny(name)
    views, ids = make_views(16, seed=1)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    steps, losses = 30, []
    for step in range(steps):
        loss = train_loss(m, views, ids, epoch=step // 10)
        opt.zero_grad()
        loss.backward()
        m.on_before_optimizer_step(step // 10)
        opt.step()
        m.on_train_step_end((step + 1) / steps)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05 * abs(first), losses


@pytest.mark.parametrize("name", list_methods())
def test_momentum_update(name: str) -> None:
    m = tiny(name)
    views, ids = make_views(N)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    train_loss(m, views, ids).backward()
    opt.step()  # online parameters move away from their targets
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.on_train_step_end(0.0)
    now = dict(m.named_parameters())
    changed = {n for n, v in before.items() if not torch.equal(now[n], v)}
    # frozen parameters are momentum targets, or the DINO weight-norm gain (fixed at 1)
    targets = {
        n
        for n, p in now.items()
        if not p.requires_grad and not n.endswith("parametrizations.weight.original0")
    }
    # the step-end hook moves targets only, never what the optimiser trains
    assert changed <= targets
    if targets:
        assert len(changed) > len(targets) // 2
    else:
        assert not changed


def test_cosine_momentum_and_ema() -> None:
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    target, online = nn.Linear(3, 2), nn.Linear(3, 2)
    expect = [
        0.9 * t.detach() + 0.1 * o.detach()
        for t, o in zip(target.parameters(), online.parameters(), strict=True)
    ]
    ema_update(target, online, 0.9)
    for t, e in zip(target.parameters(), expect, strict=True):
        torch.testing.assert_close(t.detach(), e)


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("use", ["attract", "cancel"])
def test_mined_ids_change_loss_or_are_refused(name: str, use: str) -> None:
    m = tiny(name)
    views, ids = make_views(N)
    train_loss(m, views, ids)  # one step fills queues, so they hold ids too
    state = {k: v.clone() for k, v in m.state_dict().items()}

    def loss(mined: torch.Tensor | None) -> torch.Tensor:
        pos, cancel = (mined, None) if use == "attract" else (None, mined)
        return loss_from(m, state, views, ids, pos, cancel_ids=cancel)

    if use not in m.pair_uses:
        with pytest.raises(SeppError, match=f"{name}.*cannot use"):
            loss(linked_pos_ids(N))
        return
    base = loss(None)
    assert not torch.allclose(base, loss(linked_pos_ids(N)))
    if use == "attract":  # -1 padding alone changes nothing
        torch.testing.assert_close(base, loss(torch.full((N, 2), -1)))


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("use", PAIR_USES)
def test_check_pair_use_names_the_methods_that_can(name: str, use: str) -> None:
    able = sorted(n for n in list_methods() if use in method_class(n).pair_uses)
    if use in method_class(name).pair_uses:
        check_pair_use(name, use)
        return
    with pytest.raises(SeppError, match="cannot use") as err:
        check_pair_use(name, use)
    assert str(able) in str(err.value) and name in str(err.value)


def test_check_pair_use_rejects_unknown_names() -> None:
    with pytest.raises(SeppError, match="pair use must be one of"):
        check_pair_use("simclr", "multi_positive")
    with pytest.raises(SeppError, match="unknown method"):
        check_pair_use("simclrr", "none")


def hand_pos(
    q_ids: list[int],
    key_ids: list[int],
    pos: torch.Tensor | None,
    same_id: list[bool] | None = None,
) -> list[list[bool]]:
    """Positives by plain loops: same id (only for keys j with same_id[j], default all), or a
    listed id; id -1 never matches."""
    out = []
    for i, qi in enumerate(q_ids):
        extra = set() if pos is None else {int(p) for p in pos[i] if p >= 0}
        out.append(
            [
                kj >= 0 and ((kj == qi and (same_id is None or same_id[j])) or kj in extra)
                for j, kj in enumerate(key_ids)
            ]
        )
    return out


def hand_valid(
    q_ids: list[int],
    key_ids: list[int],
    pos: list[list[bool]],
    cancel: torch.Tensor | None,
    valid: list[list[bool]],
    same: list[list[bool]] | None = None,
) -> list[list[bool]]:
    """`valid` less each query's removed keys that are not its positives, by plain loops: keys
    of a cancel id (false-negative cancellation) and keys of its own image (`same`, default:
    the same id, as when each item is its own image), in every arm."""
    if same is None:
        same = [[kj >= 0 and kj == qi for kj in key_ids] for qi in q_ids]
    c = hand_pos(q_ids, key_ids, cancel, [False] * len(key_ids))
    return [
        [valid[i][j] and (pos[i][j] or not (c[i][j] or same[i][j])) for j in range(len(key_ids))]
        for i in range(len(q_ids))
    ]


def hand_nce(
    q: torch.Tensor, k: torch.Tensor, pos: list[list[bool]], valid: list[list[bool]], t: float
) -> torch.Tensor:
    """Reference multi-positive InfoNCE, one anchor at a time."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    per_anchor = []
    for i in range(q.shape[0]):
        cols = [j for j in range(k.shape[0]) if valid[i][j]]
        logits = torch.stack([q[i] @ k[j] / t for j in cols])
        log_prob = logits - torch.logsumexp(logits, 0)
        p = [c for c, j in enumerate(cols) if pos[i][j]]
        if p:
            per_anchor.append(-log_prob[p].mean())
    return torch.stack(per_anchor).mean()


Mined = torch.Tensor | None


def ref_simclr(
    m: Any, views: list[torch.Tensor], ids: torch.Tensor, pos: Mined, cancel: Mined, labels: Mined
) -> torch.Tensor:
    z = m.projector(m.backbone(torch.cat(views)))
    q_ids = ids.tolist() * 2
    n = len(q_ids)
    p = hand_pos(q_ids, q_ids, None if pos is None else pos.repeat(2, 1))
    if labels is not None:  # SupCon: the same class is a positive too
        lab = labels.tolist() * 2
        p = [[p[i][j] or lab[i] >= 0 and lab[j] == lab[i] for j in range(n)] for i in range(n)]
    base = [[i != j for j in range(n)] for i in range(n)]
    valid = hand_valid(q_ids, q_ids, p, None if cancel is None else cancel.repeat(2, 1), base)
    return hand_nce(z, z, p, valid, m.hp.temperature)


def ref_moco(
    m: Any, views: list[torch.Tensor], ids: torch.Tensor, pos: Mined, cancel: Mined, labels: Mined
) -> torch.Tensor:
    q1, q2 = (m.projector(m.backbone(v)) for v in views)
    k1, k2 = (F.normalize(m.momentum_projector(m.momentum_backbone(v)), dim=1) for v in views)
    key_ids = ids.tolist() + m.queue_ids.tolist()
    # same id is a positive in the batch; in the queue only with queue_id_positives
    same = [True] * len(ids) + [m.hp.queue_id_positives] * len(m.queue_ids)
    p = hand_pos(ids.tolist(), key_ids, pos, same)
    base = [[kid >= 0 for kid in key_ids] for _ in range(len(ids))]
    valid = hand_valid(ids.tolist(), key_ids, p, cancel, base)
    t = m.hp.temperature
    l1 = hand_nce(q1, torch.cat([k2, m.queue]), p, valid, t)
    l2 = hand_nce(q2, torch.cat([k1, m.queue]), p, valid, t)
    return (l1 + l2) / 2


def ref_nnclr(
    m: Any, views: list[torch.Tensor], ids: torch.Tensor, pos: Mined, cancel: Mined, labels: Mined
) -> torch.Tensor:
    z1, z2 = (m.projector(m.backbone(v)) for v in views)
    p1, p2 = m.predictor(z1), m.predictor(z2)
    filled = [i for i, kid in enumerate(m.queue_ids.tolist()) if kid >= 0]
    support = m.queue[filled]

    def nearest(z: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Neighbours, and the image each is of (each item its own image: its id)."""
        j = (F.normalize(z, dim=1) @ support.T).argmax(1)
        return support[j], [int(m.queue_ids[filled[k]]) for k in j]

    q_ids = ids.tolist()
    p = hand_pos(q_ids, q_ids, pos)
    base = [[True] * len(ids) for _ in range(len(ids))]
    t = m.hp.temperature
    terms = []
    for z, pred in ((z1, p2), (z2, p1)):
        nn_z, nn_img = nearest(z)
        # a key of the query's image or of its neighbour's image is no negative
        same = [[kj in (qi, nn_img[i]) for kj in q_ids] for i, qi in enumerate(q_ids)]
        valid = hand_valid(q_ids, q_ids, p, cancel, base, same)
        terms.append(hand_nce(nn_z, pred, p, valid, t))
    return (terms[0] + terms[1]) / 2


REFERENCES: dict[str, Callable[..., torch.Tensor]] = {
    "simclr": ref_simclr,
    "supcon": ref_simclr,
    "mocov2": ref_moco,
    "nnclr": ref_nnclr,
}
MASK_CASES = [
    pytest.param(name, use, extra, id=f"{name}-{use}{'-queue_id_positives' if extra else ''}")
    for name in sorted(REFERENCES)
    for use in PAIR_USES
    if use in method_class(name).pair_uses
    for extra in ([{}, {"queue_id_positives": True}] if name == "mocov2" else [{}])
]


@pytest.mark.parametrize("name,use,extra", MASK_CASES)
def test_masks_match_hand_built_loss(name: str, use: str, extra: dict[str, Any]) -> None:
    m = tiny(name, **extra)
    views, ids = make_views(N)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 3, -1]) if m.needs_labels else None
    # a first step with other ids fills the queue / support set: ids 0..3 overlap this batch,
    # so the queue holds older keys of the same images (negatives, positives or cancelled)
    m.training_loss(make_views(N, seed=3)[0], torch.arange(N) - 4, labels=labels)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    mined = linked_pos_ids(N) if use != "none" else None
    pos, cancel = (mined, None) if use == "attract" else (None, mined)
    got = loss_from(m, state, views, ids, pos, cancel_ids=cancel, labels=labels)
    m.load_state_dict(state)
    with torch.no_grad():
        want = REFERENCES[name](m, views, ids, pos, cancel, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_moco_plain_has_one_positive_per_query(monkeypatch: pytest.MonkeyPatch) -> None:
    import sepp_ray.methods.moco as moco

    seen: list[torch.Tensor] = []
    real = moco.info_nce_loss

    def spy(
        q: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, *a: Any, **kw: Any
    ) -> torch.Tensor:
        seen.append(pos & (a[1] if len(a) > 1 else torch.ones_like(pos)))
        return real(q, keys, pos, *a, **kw)

    monkeypatch.setattr(moco, "info_nce_loss", spy)
    views, ids = make_views(N)
    for queue_id_positives, per_query in ((False, 1), (True, 3)):
        m = tiny("mocov2", queue_id_positives=queue_id_positives)
        for _ in range(2):  # step 2 finds step 1's two keys of each image in the queue
            seen.clear()
            m.training_loss(views, ids)
        assert all((s.sum(dim=1) == per_query).all() for s in seen), queue_id_positives


def test_supcon_positives_are_labels() -> None:
    m = tiny("supcon")
    views, ids = make_views(N)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    a = loss_from(m, state, views, ids, None, labels=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    b = loss_from(m, state, views, ids, None, labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert not torch.allclose(a, b)  # same images, same ids: only the labels differ
    for bad in (None, torch.full((N,), -1), torch.zeros(N + 1, dtype=torch.long)):
        with pytest.raises(SeppError, match="supcon"):
            m.training_loss(views, ids, labels=bad)


def test_fit_hparams_caps_queues_at_the_dataset() -> None:
    assert fit_hparams("mocov2", {}, 1000) == {"queue_size": 1000}
    assert fit_hparams("mocov2", {"queue_size": 64, "momentum": 0.99}, 1000) == {
        "queue_size": 64,
        "momentum": 0.99,
    }
    assert fit_hparams("nnclr", {}, 50_000) == {"queue_size": 50_000}
    assert fit_hparams("simclr", {"temperature": 0.5}, 10) == {"temperature": 0.5}
    m = create_method("mocov2", backbone="test_resnet", **fit_hparams("mocov2", {}, 100))
    assert m.queue.shape[0] == 100


def test_dino_head_logits_are_fp32_under_autocast() -> None:
    m = tiny("dino")
    x = torch.randn(8, m.feat_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.head(x)
        h = m.head.mlp(x)  # the MLP may run in bf16; the last layer must not
    with torch.no_grad():
        w = m.head.last_layer.weight.float()  # out_dim x bottleneck, weight-normalised
        want = F.normalize(h.float(), dim=-1) @ w.T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_nnclr_neighbour_search_is_fp32_under_autocast() -> None:
    m = tiny("nnclr")
    g = torch.Generator().manual_seed(0)
    m.queue.copy_(F.normalize(torch.randn(m.queue.shape, generator=g), dim=1))
    m.queue_ids.copy_(torch.arange(m.queue.shape[0]))
    z = torch.randn(8, m.queue.shape[1], generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.support_similarity(z)
        nn_z = m.nearest_neighbour(z)
    want = F.normalize(z, dim=1) @ m.queue.T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(nn_z, m.queue[want.argmax(dim=1)])


def test_moco_queue_is_fifo_with_ids() -> None:
    m = tiny("mocov2", queue_size=20)
    views, ids = make_views(N)
    for step in range(3):  # 16 keys per symmetric step into 20 slots: wraps around
        m.training_loss(views, ids + 100 * step)
    assert int(m.queue_ptr) == (3 * 2 * N) % 20
    # newest 20 keys, oldest first from the pointer: step 1's last 4 then step 2's 16
    order = torch.roll(m.queue_ids, -int(m.queue_ptr)).tolist()
    assert order == (ids + 100).tolist()[-4:] + (ids + 200).tolist() * 2
    torch.testing.assert_close(m.queue.norm(dim=1), torch.ones(20))


@pytest.mark.parametrize("name", list_methods())
def test_bad_hparam_raises(name: str) -> None:
    with pytest.raises(SeppError, match="not_a_field") as err:
        make_hparams(name, not_a_field=1)
    valid = [f.name for f in dataclasses.fields(method_hparams(name))]
    assert all(v in str(err.value) for v in valid)


def test_bad_hparam_value_and_unknown_method() -> None:
    with pytest.raises(SeppError, match="temperature"):
        create_method("simclr", backbone="test_resnet", temperature=-1.0)
    with pytest.raises(SeppError, match="warmup_teacher_temp_epochs"):
        create_method("dino", backbone="test_resnet", epochs=10, warmup_teacher_temp_epochs=30)
    with pytest.raises(SeppError, match="simclr"):
        create_method("not_a_method")
    with pytest.raises(SeppError, match="unknown hyperparameter"):
        create_method("byol", backbone="test_resnet", temprature=0.1)


def test_dino_multi_crop_and_freeze_last_layer() -> None:
    m = tiny("dino")
    views, ids = make_views(4)
    local = [torch.randn(4, 3, 4, 4) for _ in range(2)]  # smaller local crops
    loss, metrics = m.training_loss(views + local, ids, epoch=0)
    assert torch.isfinite(loss) and metrics["teacher_temp"] == pytest.approx(0.04)
    loss.backward()
    last = list(m.head.last_layer.parameters())
    assert any(p.grad is not None for p in last)
    m.on_before_optimizer_step(epoch=0)  # first epoch: last layer frozen
    assert all(p.grad is None for p in last)
    assert not math.isnan(m.current_momentum)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_accepts_view_ids(name: str) -> None:
    """Image ids behind the views: renumbered distinct images change nothing; two items of one
    image change exactly the contrastive methods (their negatives); every method reports the
    pair counts."""
    views, ids = make_views(N)
    distinct = torch.stack([ids + 100, ids + 100], 1)
    shared = distinct.clone()
    shared[1] = torch.tensor([100, 107])  # item 1 is a pair item of images 0 and 7

    def second_step(view_ids: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        m = tiny(name)  # a first step with the same ids fills the queues
        labels = labels_for(m, N)
        m.training_loss(views, ids, labels=labels, view_ids=view_ids)
        with torch.no_grad():
            return m.training_loss(views, ids, labels=labels, view_ids=view_ids)

    base = second_step(None)[0]
    torch.testing.assert_close(second_step(distinct)[0], base)
    loss, metrics = second_step(shared)
    assert (not torch.allclose(loss, base)) is (name in ATTRACT)
    assert float(metrics["same_image_negatives"]) == 0 and float(metrics["pairs_used"]) == 0
    m = tiny(name)
    with pytest.raises(ValueError, match="view_ids"):  # N, not N x 2
        m.training_loss(views, ids, labels=labels_for(m, N), view_ids=ids)


@pytest.mark.parametrize("name", ATTRACT)
def test_aug_weight_is_an_option_of_the_multi_positive_loss(name: str) -> None:
    with pytest.raises(SeppError, match="aug_weight"):
        make_hparams(name, aug_weight=1.5)
    views, ids = make_views(N)
    losses = []
    for w in (None, 0.9):
        m = tiny(name, aug_weight=w)
        train_loss(m, views, ids)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        losses.append(loss_from(m, state, views, ids, linked_pos_ids(N)))
    assert not torch.allclose(losses[0], losses[1])
