"""Parts on the sampler's side: pair mining (exact cosine search) and embedding through Ray Data,
each against a bare PyTorch loop on the same device.

Embedding is timed in steady state: a Ray Data pipeline first starts its actors, loads the model
into each and fills its queues, which says nothing about throughput. The pipeline (sepp's own
`inference_stages`: CPU decode tasks ahead of an actor pool of `Embedder`s) reads the dataset's
shards over and over; the clock starts a while after its first batch is out (output that piled
up while the consumer waited is drained by then), then runs over ``work_s`` seconds of output (30
at full size; the tiny mode scales it down and says so).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.gpu_check.common import PartContext, sync, synthetic_dataset

FULL_WORK_S = 30.0  # seconds of timed embedding work at full size
REPEATS = 200  # reads of the shards (the plan grows with them): 800k images at full size


def mining(ctx: PartContext) -> None:
    """sepp's torch search of K = 5% anchors over N keys against a bare fp16 matmul + top-k."""
    from sepp_ray.mining import Vectors, build_searcher, choose_anchors

    device = ctx.device
    n, d, m = (8192, 64, 20) if ctx.tiny else (1_280_000, 2048, 20)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(n, d, device=device)
    for s in range(0, n, 131072):
        c = torch.randn(min(131072, n - s), d, generator=g, device=device)
        x[s : s + c.shape[0]] = F.normalize(c, dim=1)
    ids = np.arange(n, dtype=np.int64)
    anchors = choose_anchors(ids, 0.05, 0)
    q = x[torch.from_numpy(anchors).to(device)]
    sync(device)
    t0 = time.perf_counter()
    searcher = build_searcher(Vectors(ids, x), "torch")
    searcher.search(Vectors(anchors, q), 0.96, 0.99, m)
    sync(device)
    ours = time.perf_counter() - t0
    ctx.add(f"mining {n} x {d}, K = {len(anchors)}: sepp", round(ours, 3), "s")
    del searcher
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    k16, q16 = x.to(dtype), q.to(dtype)
    (q16[:64] @ k16[:1024].T).sum()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, q16.shape[0], 4096):
        (q16[s : s + 4096] @ k16.T).topk(m + 1, dim=1)
    sync(device)
    bare = time.perf_counter() - t0
    ctx.add("mining: bare matmul + top-k", round(bare, 3), "s")
    ctx.add("mining sepp / bare", round(ours / bare, 2), "x", "<= 2", ours <= 2 * bare)


@torch.inference_mode()
def bare_embed(
    enc: Any, images: torch.Tensor, batch: int, device: torch.device, work_s: float
) -> float:
    """images/s of the encoder's forward over ``images`` (uint8 N x 3 x S x S) already on the
    device, after a warm-up, over at least ``work_s`` seconds."""
    from sepp_ray.mining.encoder import Embedder

    emb = Embedder(enc, device=str(device))
    x = images.to(device)
    batches = [x[s : s + batch] for s in range(0, len(x) - batch + 1, batch)]

    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format

    def run(k: int) -> None:
        for i in range(k):
            x = (batches[i % len(batches)].float().div_(255.0) - emb.mean) / emb.std
            F.normalize(emb.model(x.contiguous(memory_format=fmt)).float(), dim=1)
        sync(device)

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        run(3)  # warm-up (cuDNN picks its algorithms)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < work_s:
            run(len(batches))
            done += len(batches)
    return done * batch / (time.perf_counter() - t0)


def ray_data_embed(
    uri: str, enc: Any, work_s: float, warm_s: float, block_bytes: int | None = None
) -> dict[str, float]:
    """Steady images/s of sepp's embedding pipeline on Ray Data: the clock starts ``warm_s``
    after the first output batch (actors up, model loaded, and any output buffered meanwhile
    drained) and runs ``work_s``, over the shards read REPEATS times (the pipeline streams:
    what is not consumed by then is never read). ``block_bytes``: Ray Data's target block size
    (its default when None, as `sepp embed` runs; the tiny mode's few small images would
    otherwise make one block, out all at once)."""
    import ray
    from ray.data import DataContext

    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.data.infer import inference_stages
    from sepp_ray.mining.encoder import Embedder

    ds = ImageDataset.open(uri)
    if block_bytes:
        DataContext.get_current().target_max_block_size = block_bytes
    rds = ray.data.read_parquet(_repeated(ds.file_paths(), REPEATS))
    rds = rds.select_columns(["id", "image", "label", "split"])
    rds, _, _ = inference_stages(rds, Embedder, (enc,), enc.batch_size, None, enc.image_size)
    start, rows = time.perf_counter(), 0
    first: float | None = None
    t0: float | None = None
    for b in rds.iter_batches(batch_size=enc.batch_size, batch_format="pyarrow"):
        now = time.perf_counter()
        first = now if first is None else first
        if t0 is None:
            t0 = now if now - first >= warm_s else None  # this batch is not counted
        else:
            rows += b.num_rows
            if now - t0 >= work_s:
                break
    if t0 is None or first is None or not rows:
        raise RuntimeError("the pipeline ended before its warm-up did: raise REPEATS")
    timed = time.perf_counter() - t0
    return {"images_per_s": rows / timed, "timed_s": timed, "warm_s": t0 - start, "rows": rows}


def _repeated(paths: list[str], repeats: int) -> list[str]:
    """``paths`` ``repeats`` times over, as links of distinct names (Ray Data reads a path
    given twice once). Local shards only: the check writes its datasets to a local folder."""
    folder = Path(tempfile.mkdtemp(prefix="sepp-gpu-check-links-"))
    out = []
    for r in range(repeats):
        for i, p in enumerate(paths):
            link = folder / f"{r:04d}-{i:04d}.parquet"
            link.symlink_to(p)
            out.append(str(link))
    return out


def embed(ctx: PartContext) -> None:
    """images/s of ResNet-50 224 px embedding through Ray Data and in a bare loop, both warm."""
    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.data.decode import decode_blobs
    from sepp_ray.mining.encoder import EncoderConfig
    from sepp_ray.ray_utils import init_ray

    if ctx.tiny:
        model, size, n, batch, work_s, files = "test_resnet", 16, 256, 32, 2.0, 1
    else:
        model, size, n, batch, work_s, files = "resnet50", 224, 4096, 256, FULL_WORK_S, 4
    scaled = f" (tiny: {work_s:g} s, scaled down from {FULL_WORK_S:g})" if ctx.tiny else ""
    uri = synthetic_dataset(n, size, tempfile.mkdtemp(prefix="sepp-gpu-check-"), chunk=n // files)
    enc = EncoderConfig(name=model, image_size=size, batch_size=batch)
    table = ImageDataset.open(uri).read_table(["image"])
    images = decode_blobs(table["image"].to_pylist()[: min(n, 20 * batch)], size)
    bare = bare_embed(enc, images, batch, ctx.device, work_s / 6)
    ctx.add(f"embedding {model} {size} px: bare loop", round(bare, 1), "img/s")
    init_ray()
    warm_s = work_s / 6  # after the first batch, before the clock starts
    r = ray_data_embed(uri, enc, work_s, warm_s, 256 * 1024 if ctx.tiny else None)
    ctx.add(f"embedding: timed work after warm-up{scaled}", round(r["timed_s"], 1), "s",
            f">= {work_s:g}", r["timed_s"] >= work_s)  # fmt: skip
    ctx.add("embedding: warm-up (to the first batch, and then some)", round(r["warm_s"], 1), "s")
    ours = r["images_per_s"]
    ctx.add("embedding through Ray Data", round(ours, 1), "img/s")
    ctx.add("embedding Ray Data / bare", round(ours / bare, 3), "x", ">= 0.8", ours >= 0.8 * bare)
