"""sepp_ray.dist on a real 2-process gloo group, and its no-op fallbacks without one.

The property that matters: a loss computed on tensors gathered across W ranks, back-propagated
on every rank and averaged the way DDP averages gradients, gives the gradient one process gets
on the whole batch. The workers record what they see; the references are computed here, in a
process without a process group.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import Tensor

from sepp_ray import dist
from sepp_ray.losses import (
    DINOLoss,
    barlow_twins_loss,
    info_nce_loss,
    positive_mask,
    self_mask,
    vicreg_loss,
)

WORLD, N_LOCAL, D_IN, D_OUT, DINO_DIM = 2, 4, 5, 3, 6


def _full_batch() -> dict[str, Tensor]:
    """The whole batch, identical in every process (fixed seed); rank r holds rows r*N..(r+1)*N."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * N_LOCAL
    ids = torch.arange(100, 100 + n)
    pos_ids = torch.full((n, 2), -1)
    pos_ids[0, 0], pos_ids[5, 0] = ids[5], ids[0]  # a semantic pair across ranks
    pos_ids[2, 1] = ids[3]  # and one within rank 0, one-sided
    return {
        "x0": torch.randn(n, D_IN, generator=g),
        "x1": torch.randn(n, D_IN, generator=g),
        "ids": ids,
        "pos_ids": pos_ids,
        "weight": torch.randn(D_OUT, D_IN, generator=g),
        "teacher": torch.randn(2, n, DINO_DIM, generator=g),
        "student": torch.randn(3, n, DINO_DIM, generator=g),
        "coeff": torch.randn(WORLD, n, D_IN, generator=g),
    }


def _contrastive(w: Tensor, x0: Tensor, x1: Tensor, ids: Tensor, pos_ids: Tensor) -> Tensor:
    """SimCLR with semantic positives as a method would write it: local queries, gathered keys."""
    z = torch.cat([x0 @ w.T, x1 @ w.T])  # 2n x D_OUT
    q_ids, q_pos = torch.cat([ids, ids]), torch.cat([pos_ids, pos_ids])
    keys, key_ids = dist.gather(z), dist.gather(q_ids)  # (W * 2n) x D_OUT, W * 2n
    valid = self_mask(z.shape[0], keys.shape[0], dist.global_offset(z.shape[0]))
    return info_nce_loss(z, keys, positive_mask(q_ids, key_ids, q_pos), 0.2, valid)


def _vicreg(w: Tensor, x0: Tensor, x1: Tensor, ids: Tensor, pos_ids: Tensor) -> Tensor:
    return vicreg_loss(x0 @ w.T, x1 @ w.T)


def _barlow(w: Tensor, x0: Tensor, x1: Tensor, ids: Tensor, pos_ids: Tensor) -> Tensor:
    return barlow_twins_loss(x0 @ w.T, x1 @ w.T, lambda_offdiag=0.1)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "contrastive": _contrastive,
    "vicreg": _vicreg,
    "barlow": _barlow,
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # this child process only: 2 workers on 2 cores
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        data = _full_batch()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        res: dict[str, Any] = {
            "meta": (dist.is_dist(), dist.world_size(), dist.rank(), dist.global_offset(N_LOCAL)),
            "gathered": dist.gather(data["x0"][rows]),
            "gathered_ids": dist.gather(data["ids"][rows]),
            "sum": dist.all_reduce_sum(torch.tensor([rank + 1.0])),
            "mean": dist.all_reduce_mean(torch.tensor([rank + 1.0])),
            "max": dist.all_reduce_max(torch.tensor([rank + 1.0, -rank])),
        }
        with dist.host_checks(False):  # no shape-check collective: only the gather itself
            calls: list[str] = []
            real = torch_dist.all_gather
            torch_dist.all_gather = lambda *a, **k: calls.append("g") or real(*a, **k)  # type: ignore[assignment,func-returns-value]
            try:
                res["unchecked"] = (dist.gather(data["ids"][rows]), len(calls))
            finally:
                torch_dist.all_gather = real
        # backward of gather alone: rank r's loss weighs the gathered rows with coeff[r]
        t = data["x0"][rows].clone().requires_grad_()
        (dist.gather(t) * data["coeff"][rank]).sum().backward()
        res["gather_grad"] = t.grad
        for name, fn in LOSSES.items():
            w = data["weight"].clone().requires_grad_()
            loss = fn(w, *(data[k][rows] for k in ("x0", "x1", "ids", "pos_ids")))
            loss.backward()
            assert w.grad is not None
            # DDP averages parameter gradients over ranks; so does this
            res[name] = (dist.all_reduce_mean(loss), dist.all_reduce_mean(w.grad))
        dino = DINOLoss(DINO_DIM, center_momentum=0.5)
        loss = dino(list(data["student"][:, rows]), list(data["teacher"][:, rows]), 0)
        res["dino"] = (dist.all_reduce_mean(loss), dino.center.clone())
        # a re-mining round's helpers: rows of unequal counts, objects, a module from rank 0
        res["rows"] = dist.all_gather_rows(torch.full((rank + 1, 2), float(rank)))
        res["objects"] = dist.all_gather_objects({"rank": rank})
        module = torch.nn.BatchNorm1d(2)
        module.running_mean.fill_(rank + 5.0)
        module.weight.data.fill_(rank + 1.0)
        dist.broadcast_module(module)
        res["module"] = (module.running_mean.clone(), module.weight.detach().clone())
        try:  # unequal sizes must fail on every rank, not hang
            dist.gather(torch.zeros(N_LOCAL + rank, 2))
            res["unequal"] = "no error"
        except ValueError as e:
            res["unequal"] = str(e)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_rank_queries(ranks: list[dict[str, Any]]) -> None:
    for r, res in enumerate(ranks):
        assert res["meta"] == (True, WORLD, r, r * N_LOCAL)
        torch.testing.assert_close(res["sum"], torch.tensor([3.0]))
        torch.testing.assert_close(res["mean"], torch.tensor([1.5]))


def test_gather_concatenates_in_rank_order(ranks: list[dict[str, Any]]) -> None:
    data = _full_batch()
    for res in ranks:
        torch.testing.assert_close(res["gathered"], data["x0"])
        torch.testing.assert_close(res["gathered_ids"], data["ids"])


def test_gather_backward_sums_over_ranks(ranks: list[dict[str, Any]]) -> None:
    coeff = _full_batch()["coeff"].sum(0)  # d(sum of all ranks' losses) / d(gathered rows)
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gather_grad"], coeff[r * N_LOCAL : (r + 1) * N_LOCAL])


@pytest.mark.parametrize("name", list(LOSSES))
def test_ddp_gradient_equals_full_batch(ranks: list[dict[str, Any]], name: str) -> None:
    data = _full_batch()
    w = data["weight"].clone().requires_grad_()
    loss = LOSSES[name](w, data["x0"], data["x1"], data["ids"], data["pos_ids"])
    loss.backward()
    for res in ranks:
        got_loss, got_grad = res[name]
        torch.testing.assert_close(got_loss, loss.detach())
        torch.testing.assert_close(got_grad, w.grad)


def test_dino_center_is_averaged_over_ranks(ranks: list[dict[str, Any]]) -> None:
    data = _full_batch()
    dino = DINOLoss(DINO_DIM, center_momentum=0.5)
    loss = dino(list(data["student"]), list(data["teacher"]), 0)
    assert dino.center.abs().sum() > 0
    for res in ranks:
        torch.testing.assert_close(res["dino"][0], loss)
        torch.testing.assert_close(res["dino"][1], dino.center)


def test_max_and_unchecked_gather(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        torch.testing.assert_close(res["max"], torch.tensor([2.0, 0.0]))
        gathered, calls = res["unchecked"]
        assert torch.equal(gathered, res["gathered_ids"]) and calls == 1
    assert dist.checks_enabled()
    with dist.host_checks(False):
        assert not dist.checks_enabled()
        with dist.host_checks(True):
            assert dist.checks_enabled()
        assert not dist.checks_enabled()
    assert dist.checks_enabled()


def test_gather_refuses_unequal_sizes(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        assert "same tensor shape on every rank" in res["unequal"]
        assert "drop_last" in res["unequal"]


def test_round_helpers_gather_rows_objects_and_rank_0_s_module(
    ranks: list[dict[str, Any]],
) -> None:
    for r in ranks:
        assert torch.equal(r["rows"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        mean, weight = r["module"]  # BatchNorm statistics too, not just parameters
        assert torch.equal(mean, torch.full((2,), 5.0)) and torch.equal(weight, torch.ones(2))


def test_no_process_group_is_a_no_op() -> None:
    assert not torch_dist.is_initialized()
    assert (dist.is_dist(), dist.world_size(), dist.rank(), dist.global_offset(7)) == (
        False,
        1,
        0,
        0,
    )
    t = torch.randn(3, 2, requires_grad=True)
    assert dist.gather(t) is t
    (dist.gather(t) * 2).sum().backward()
    torch.testing.assert_close(t.grad, torch.full((3, 2), 2.0))
    for reduce in (dist.all_reduce_sum, dist.all_reduce_mean, dist.all_reduce_max):
        out = reduce(t)
        torch.testing.assert_close(out, t.detach())
        assert not out.requires_grad
        out.add_(1.0)  # a copy: the input is untouched
        assert not torch.equal(out, t.detach())
    assert dist.all_gather_rows(t) is t and dist.all_gather_objects(5) == [5]
    module = torch.nn.Linear(2, 2)
    before = module.weight.detach().clone()
    dist.broadcast_module(module)
    dist.barrier()
    assert torch.equal(module.weight, before)
