"""Embedding throughput: `sepp embed` on Ray Data versus a bare PyTorch forward loop.

Both sides use the same encoder (a timm model by name, random weights: throughput does not
depend on them), the same batch size and the same real images, in one run. The bare loop is
the ceiling: images already decoded and on the device, forward only (bf16 autocast and
channels_last on a GPU, fp32 on CPU). The Ray side does the whole job: read the Parquet shards,
decode and resize, forward, L2-normalise, write Parquet.

    python benchmarks/embed.py --data ../shared/data/cifar10-jpeg.tar.gz \
        [--dataset runs/cifar10] [--model resnet18 --cifar-stem] [--batch 256] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.decode import decode_blobs
from sepp_ray.data.ingest import ImageOptions, ingest
from sepp_ray.data.sources import open_source
from sepp_ray.mining.embed import embed
from sepp_ray.mining.encoder import EncoderConfig, load_encoder
from sepp_ray.ray_utils import init_ray
from sepp_ray.storage import read_manifest


def dataset_uri(args: argparse.Namespace) -> str:
    if args.dataset:
        return str(args.dataset)
    uri = os.path.join(args.workdir, "cifar10")
    try:
        read_manifest(uri)
    except Exception:
        from benchmarks.ingest import unpack

        root = unpack(Path(args.data), Path(args.workdir) / "raw")
        ingest(open_source(str(root)), uri, ImageOptions(), overwrite=True)
    return uri


@torch.inference_mode()
def bare(enc: EncoderConfig, images: torch.Tensor, batch: int, device: torch.device) -> float:
    """images/s of forward passes over ``images`` (uint8 N x 3 x S x S) already on the device."""
    model, meta, _ = load_encoder(enc)
    model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    x_all = images.to(device)
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1)

    def run(n: int) -> None:
        for s in range(0, n, batch):
            x = (x_all[s : s + batch].float().div_(255.0) - mean) / std
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    f = model(x)
            else:
                f = model(x)
            torch.nn.functional.normalize(f.float(), dim=1)
        if cuda:
            torch.cuda.synchronize()

    run(min(len(x_all), 3 * batch))  # warm-up
    t = time.perf_counter()
    run(len(x_all))
    return len(x_all) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--dataset", default=None, help="an ingested dataset URI (skips ingest)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sepp-bench-embed"))
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="images for the bare loop")
    args = ap.parse_args()
    uri = dataset_uri(args)
    enc = EncoderConfig(
        name=args.model, cifar_stem=args.cifar_stem, image_size=args.size, batch_size=args.batch
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, meta, _ = load_encoder(enc)
    table = ImageDataset.open(uri).read_table(["image"])
    n_bare = min(table.num_rows, args.limit or 20 * args.batch)
    images = decode_blobs(table["image"].to_pylist()[:n_bare], meta.image_size)
    bare_ips = bare(enc, images, args.batch, device)
    init_ray()  # cluster start-up is not part of the embedding time
    out = os.path.join(tempfile.mkdtemp(prefix="sepp-bench-embed-"), "emb")
    t = time.perf_counter()
    m = embed(uri, out, enc, overwrite=True)
    ray_ips = m["num_embeddings"] / (time.perf_counter() - t)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, GPU {gpu}, torch {torch.__version__}"
        f"; {args.model} cifar_stem={args.cifar_stem} {meta.image_size}px batch {args.batch}"
    )
    print("| path | images | images/s | ratio to bare |")
    print("|---|---|---|---|")
    print(f"| bare forward loop | {n_bare} | {bare_ips:,.0f} | 1.00 |")
    print(
        f"| sepp embed (Ray Data, {m['actors']} actor(s)) | {m['num_embeddings']} | "
        f"{ray_ips:,.0f} | {ray_ips / bare_ips:.2f} |"
    )
    assert np.isfinite(ray_ips)


if __name__ == "__main__":
    main()
