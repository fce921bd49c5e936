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
from sepp_ray.methods import create_method, list_methods, make_hparams, method_hparams
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


MULTI_POSITIVE = ["simclr", "supcon", "mocov2", "nnclr"]
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


def loss_from(
    method: Method,
    state: dict[str, torch.Tensor],
    views: list[torch.Tensor],
    ids: torch.Tensor,
    pos_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Loss from a fixed state (training_loss mutates queues and DINO's centre)."""
    method.load_state_dict(state)
    with torch.no_grad():
        return method.training_loss(views, ids, pos_ids)[0]


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
    assert m.supports_multi_positive is (name in MULTI_POSITIVE)


@pytest.mark.parametrize("name", list_methods())
def test_loss_finite_and_grad_reaches_backbone(name: str) -> None:
    m = tiny(name)
    views, ids = make_views(N)
    loss, metrics = m.training_loss(views, ids)
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
        loss, _ = m.training_loss(views, ids, epoch=step // 10)
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
    m.training_loss(views, ids)[0].backward()
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
def test_pos_ids_change_loss_only_where_supported(name: str) -> None:
    m = tiny(name)
    views, ids = make_views(N)
    m.training_loss(views, ids)  # one step fills queues, so they hold ids too
    state = {k: v.clone() for k, v in m.state_dict().items()}
    base = loss_from(m, state, views, ids, None)
    linked = loss_from(m, state, views, ids, linked_pos_ids(N))
    if m.supports_multi_positive:
        assert not torch.allclose(base, linked)
    else:
        torch.testing.assert_close(base, linked)


def hand_pos(q_ids: list[int], key_ids: list[int], pos: torch.Tensor | None) -> list[list[bool]]:
    """Positives by plain loops: same id, or a listed semantic positive; id -1 never matches."""
    out = []
    for i, qi in enumerate(q_ids):
        extra = set() if pos is None else {int(p) for p in pos[i] if p >= 0}
        out.append([kj >= 0 and (kj == qi or kj in extra) for kj in key_ids])
    return out


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


def ref_simclr(
    m: Any, views: list[torch.Tensor], ids: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    z = m.projector(m.backbone(torch.cat(views)))
    q_ids = ids.tolist() * 2
    q_pos = None if pos is None else pos.repeat(2, 1)
    n = len(q_ids)
    valid = [[i != j for j in range(n)] for i in range(n)]
    return hand_nce(z, z, hand_pos(q_ids, q_ids, q_pos), valid, m.hp.temperature)


def ref_moco(
    m: Any, views: list[torch.Tensor], ids: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    q1, q2 = (m.projector(m.backbone(v)) for v in views)
    k1, k2 = (F.normalize(m.momentum_projector(m.momentum_backbone(v)), dim=1) for v in views)
    key_ids = ids.tolist() + m.queue_ids.tolist()
    p = hand_pos(ids.tolist(), key_ids, pos)
    valid = [[kid >= 0 for kid in key_ids] for _ in range(len(ids))]
    t = m.hp.temperature
    l1 = hand_nce(q1, torch.cat([k2, m.queue]), p, valid, t)
    l2 = hand_nce(q2, torch.cat([k1, m.queue]), p, valid, t)
    return (l1 + l2) / 2


def ref_nnclr(
    m: Any, views: list[torch.Tensor], ids: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    z1, z2 = (m.projector(m.backbone(v)) for v in views)
    p1, p2 = m.predictor(z1), m.predictor(z2)
    filled = [i for i, kid in enumerate(m.queue_ids.tolist()) if kid >= 0]
    support = m.queue[filled]

    def nearest(z: torch.Tensor) -> torch.Tensor:
        return support[(F.normalize(z, dim=1) @ support.T).argmax(1)]

    p = hand_pos(ids.tolist(), ids.tolist(), pos)
    valid = [[True] * len(ids) for _ in range(len(ids))]
    t = m.hp.temperature
    return (hand_nce(nearest(z1), p2, p, valid, t) + hand_nce(nearest(z2), p1, p, valid, t)) / 2


REFERENCES: dict[str, Callable[..., torch.Tensor]] = {
    "simclr": ref_simclr,
    "supcon": ref_simclr,
    "mocov2": ref_moco,
    "nnclr": ref_nnclr,
}


@pytest.mark.parametrize("name", MULTI_POSITIVE)
@pytest.mark.parametrize("with_pos", [False, True])
def test_multi_positive_matches_hand_built_mask(name: str, with_pos: bool) -> None:
    m = tiny(name)
    views, ids = make_views(N)
    if name == "supcon":
        ids = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0])  # labels: same label, positive
    # a first step with other ids fills the queue / support set: ids 0..3 overlap this batch,
    # so queue entries of the same image count as positives too
    m.training_loss(make_views(N, seed=3)[0], torch.arange(N) - 4)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    pos = linked_pos_ids(N) if with_pos else None
    got = loss_from(m, state, views, ids, pos)
    m.load_state_dict(state)
    with torch.no_grad():
        want = REFERENCES[name](m, views, ids, pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
