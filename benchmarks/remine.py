"""Pair precision per re-mining round on real CIFAR-10, from a short bootstrap.

A sampler bootstrapped as the pipeline does (a short plain SimCLR run) mines round 1's pairs at
the papers' thresholds [0.96, 0.99]; a SimCLR run then trains on them and re-mines every epoch
with its own encoder (`pairs.remine_every=1`). For every round: its pairs, their precision
(share of pairs whose two images share a label; labels never choose pairs) and the kNN
accuracy of the encoder that mined them, on the validation split.

Then the other place a round could run, measured on the same encoder: `sepp mine` from round
2's checkpoint (a Ray Data actor pool decoding the split from Parquet, search actors), against
the round the training workers ran on the split they hold decoded.

    python -m benchmarks.remine --per-class 1000 --bootstrap-epochs 1 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sepp_ray.data.ingest import ImageOptions, ingest
from sepp_ray.data.sources import open_source
from sepp_ray.mining.command import mine_command
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.storage import read_manifest
from sepp_ray.train.driver import PretrainConfig, pretrain
from sepp_ray.train.items import PairsConfig
from sepp_ray.train.remine import round_uri
from sepp_ray.train.state import checkpoint_uri


def class_subset(root: Path, per_class: dict[str, int], dest: Path) -> Path:
    """The first ``per_class[split]`` images (sorted) of every class of each split."""
    if (dest / ".done").exists():
        return dest
    for split, n in per_class.items():
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(cls.glob("*.jpg"))[:n]:
                target = dest / split / cls.name / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    (dest / ".done").touch()
    return dest


def _train(images: str, out: str, args: argparse.Namespace, epochs: int, **kw: Any) -> dict:
    return pretrain(
        PretrainConfig(
            dataset=images,
            out=out,
            backbone=args.backbone,
            cifar_stem=False,  # the ImageNet stem: 16x cheaper at 32 px on a CPU
            epochs=epochs,
            batch_size=args.batch,
            warmup_epochs=1,  # the recipe's 10 would outlast these short runs
            checkpoint_every=1,
            keep_checkpoints=0,
            knn_every=1,
            seed=args.seed,
            **kw,
        )
    )


def _round_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    history = {int(h["epoch"]): h for h in run["history"]}
    for r in run["rounds"]:
        m = read_manifest(r["pairs"])
        start = r["start_epoch"]
        knn = history.get(start, {}).get("knn_top1") if start else None
        rows.append(
            {
                "round": r["round"],
                "encoder": r["encoder"],
                "encoder_epochs": start,
                "pairs": r["num_pairs"],
                "precision": r["precision"],
                "encoder_knn_top1": knn,
                "embed_s": m.get("embed_seconds"),
                "search_s": m.get("search_seconds"),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sepp-remine"))
    ap.add_argument("--per-class", type=int, default=1000, help="train images per class")
    ap.add_argument("--bootstrap-epochs", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--k", type=float, default=0.2, help="anchor fraction")
    ap.add_argument("--m", type=int, default=4, help="positives per anchor (the bootstrap cap)")
    ap.add_argument("--lo", type=float, default=0.96, help="lower threshold (the papers')")
    ap.add_argument("--hi", type=float, default=0.99, help="upper threshold (the papers')")
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.workdir)
    from benchmarks.ingest import unpack

    t: dict[str, float] = {}
    images = str(work / f"cifar10-{args.per_class}")
    try:
        read_manifest(images)
    except Exception:  # noqa: BLE001 - not ingested yet
        root = unpack(Path(args.data), work / "raw")
        sub = class_subset(
            root, {"train": args.per_class, "test": args.test_per_class}, work / "subset"
        )
        t0 = time.perf_counter()
        ingest(open_source(str(sub)), images, ImageOptions(val_fraction=0.1), overwrite=True)
        t["ingest_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    boot = _train(images, str(work / "bootstrap"), args, args.bootstrap_epochs, overwrite=True)
    t["bootstrap_s"] = time.perf_counter() - t0
    mining = MineConfig(lo=args.lo, hi=args.hi, k=args.k, m=args.m, seed=args.seed)
    t0 = time.perf_counter()
    first = str(work / "pairs-round1")
    mine_command(
        images,
        first,
        EncoderConfig(checkpoint=boot["final_checkpoint"]),
        mining,
        splits=["train"],
        actors=None,
        overwrite=True,
        config={},
    )
    t["mine_round1_s"] = time.perf_counter() - t0
    out = str(work / "remine")
    t0 = time.perf_counter()
    run = _train(
        images,
        out,
        args,
        args.epochs,
        pairs=PairsConfig(pairs=first, remine_every=1),
        overwrite=True,
    )
    t["remine_run_s"] = time.perf_counter() - t0
    rows = _round_rows(run)
    rows[0]["encoder_knn_top1"] = (boot.get("final_metrics") or {}).get("knn_top1")
    # the same round as a Ray Data job between training segments: `sepp mine` from round 2's
    # encoder (the checkpoint the round was mined from)
    t0 = time.perf_counter()
    seg = mine_command(
        images,
        str(work / "pairs-round2-by-sepp-mine"),
        EncoderConfig(checkpoint=checkpoint_uri(out, 1)),
        mining,
        splits=["train"],
        actors=None,
        overwrite=True,
        config={},
    )
    segment_s = time.perf_counter() - t0
    r2 = read_manifest(round_uri(out, 2))
    same = seg["num_pairs"] == r2["num_pairs"] and seg.get("precision") == r2.get("precision")
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": os.getloadavg(),
        "images": read_manifest(images)["splits"]["train"]["total"],
        "timings_s": {k: round(v, 1) for k, v in t.items()},
        "rounds": rows,
        "in_worker_round_s": round(float(r2["embed_seconds"]) + float(r2["search_seconds"]), 2),
        "sepp_mine_round_s": round(segment_s, 2),
        "sepp_mine_same_pairs_and_precision": same,
        "knn_top1_by_epoch": [h.get("knn_top1") for h in run["history"]],
    }
    print(json.dumps(result, indent=2))
    print(
        "| round | encoder (epochs trained) | pairs | precision | encoder kNN top-1 | "
        "embed + search s |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        enc = f"{r['encoder']} ({r['encoder_epochs']})" if r["round"] > 1 else "bootstrap sampler"
        secs = "—" if r["embed_s"] is None else f"{r['embed_s'] + r['search_s']:.1f}"
        print(
            f"| {r['round']} | {enc} | {r['pairs']} | {r['precision']} | "
            f"{r['encoder_knn_top1']} | {secs} |"
        )


if __name__ == "__main__":
    main()
