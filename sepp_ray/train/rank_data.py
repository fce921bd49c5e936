"""What a rank trains from each epoch: its batches on its device (gathered from the split held
in memory, or streamed through the decode tasks, JPEG bytes decoded on the device), and the
re-mining rounds that replace the items (and on the streaming plane the read pipeline) as the
run goes (`sepp_ray.train.remine_round`). The worker's epoch loop (`sepp_ray.train.worker`)
asks for them in turn.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sepp_ray.methods.base import Method
    from sepp_ray.train.config import WorkerConfig
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.feed import RankFeed
    from sepp_ray.train.remine_round import Rounds
    from sepp_ray.train.remine_targets import StreamTarget
    from sepp_ray.train.resident import ResidentFeed, ResidentPlan

log = logging.getLogger(__name__)


def _pinned(batches: Any) -> Any:
    """numpy batches -> tensors in pinned (page-locked) host memory, so the copy to the GPU can
    run asynchronously (`non_blocking=True`); JPEG-byte batches pass through."""
    for b in batches:
        if "image_bytes" in b:
            yield b
        else:
            yield {k: torch.from_numpy(v).pin_memory() for k, v in b.items()}


def _on_device(
    batches: Any,
    device: torch.device,
    pin_ahead: int = 2,
    spec: Any = None,
    crop_seed: tuple[int, ...] = (0,),
) -> Any:
    """numpy batches -> tensors on `device`. On CUDA the pinning copy runs `pin_ahead` batches
    ahead in a thread (a host memcpy of the whole batch, tens of ms at 224 px, kept off the
    step's thread) and the host-to-device copy is asynchronous. Batches of JPEG bytes
    (``decode_on=gpu``) are decoded on the device, and cropped there when ``spec`` carries view
    crops (boxes from a generator seeded by ``crop_seed``)."""
    from sepp_ray.train.device_decode import crop_generator
    from sepp_ray.train.feed import decode_on_device, prefetched

    gen = None
    if device.type == "cuda":
        batches = prefetched(_pinned(batches), pin_ahead)
    for b in batches:
        if "image_bytes" in b:
            gen = gen or crop_generator(device, *crop_seed)
            out = decode_on_device(b, device, spec, gen)
            if out.cpu_decoded:
                log.info(
                    "%d JPEG(s) of a batch decoded on the CPU (refused by the device's decoder)",
                    out.cpu_decoded,
                )
            yield out
            continue
        if device.type == "cuda":
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}
        else:
            yield {k: torch.from_numpy(v) for k, v in b.items()}


def epoch_batches(
    data: DataPlan | ResidentPlan,
    resident: ResidentFeed | None,
    epoch: int,
    world: int,
    rank: int,
    device: torch.device,
    stream: RankFeed | None = None,
) -> Any:
    """This rank's batches of ``epoch`` on ``device``: gathered from the split held in memory
    (resident), or streamed through the decode tasks (``stream``: one read pipeline across
    epochs) and copied over."""
    from sepp_ray.train.dataplane import DataPlan

    if resident is not None:
        return resident.batches(epoch, world, rank)
    assert isinstance(data, DataPlan)
    seed = (data.seed, epoch, rank)
    batches = stream.epoch(epoch) if stream is not None else data.batches(epoch, world, rank)
    return _on_device(batches, device, spec=data.spec, crop_seed=seed)


def rounds_of(
    cfg: WorkerConfig,
    device: torch.device,
    method: Method,
    norm: tuple[torch.Tensor, torch.Tensor],
    resident: ResidentFeed | None,
) -> tuple[Rounds | None, StreamTarget | None]:
    """This rank's re-mining rounds (None when the run mines once), and on the streaming plane
    the plan and read pipeline each round replaces."""
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.remine_round import Rounds
    from sepp_ray.train.remine_targets import ResidentTarget, StreamTarget

    if cfg.remine is None:
        return None, None
    streamed = None
    if resident is not None:
        target: ResidentTarget | StreamTarget = ResidentTarget(resident, cfg.remine)
    else:
        assert isinstance(cfg.data, DataPlan)
        target = streamed = StreamTarget(cfg.data, cfg.remine, cfg.out, device)
    rounds = Rounds(cfg.remine, cfg.out, target, method, norm, cfg.image_size)
    return rounds, streamed


def round_stream(
    streamed: StreamTarget, rounds: Rounds, epoch: int, world: int, rank: int
) -> tuple[DataPlan, RankFeed]:
    """The streaming plan of ``epoch``'s round and its read pipeline: one per round, reading
    ahead up to the round's last epoch (the next round's items are not known yet)."""
    if streamed.stream is None:
        stop = rounds.spec.start_of(rounds.current + 1)
        data = streamed.data
        streamed.stream = data.stream(world, rank, epoch, stop_epoch=stop)
    return streamed.data, streamed.stream
