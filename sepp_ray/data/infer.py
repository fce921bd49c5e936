"""Batch inference over an image dataset on Ray Data: a callable class on an actor pool (one GPU
per actor where GPUs exist, CPU actors otherwise), written as Parquet. Shared by `sepp embed`
(the sampler's embeddings) and `sepp eval` (frozen features), which differ only in the class.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.images import DecodeImages
from sepp_ray.storage import Location, filesystem


def actor_count(actors: int | None = None) -> tuple[int, int]:
    """(actors, cluster GPUs): one actor per GPU; on CPU clusters one CPU is left to the read
    tasks that feed the actors, or the pipeline starves."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return actors or (gpus if gpus else max(1, min(cpus - 1, 4))), gpus


def inference_stages(
    rds: Any,
    fn_cls: type,
    ctor_args: tuple[Any, ...],
    batch_size: int,
    actors: int | None = None,
    decode_size: int | None = None,
) -> tuple[Any, int, int]:
    """``rds`` (rows with encoded ``image``) -> (the Ray Dataset of ``fn_cls``'s outputs,
    actors, cluster GPUs): CPU decode tasks ahead of an actor pool of ``fn_cls``. Also what
    the GPU check times (`benchmarks.gpu_check`), so it measures this pipeline and no copy."""
    import ray

    n_actors, gpus = actor_count(actors)
    if decode_size:
        rds = rds.map_batches(DecodeImages(decode_size), batch_format="pyarrow", num_cpus=1)
    rds = rds.map_batches(
        fn_cls,
        fn_constructor_args=ctor_args,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if gpus else 0,
        num_cpus=1 if not gpus else 2,
    )
    return rds, n_actors, gpus


def infer_to_parquet(
    ds: ImageDataset,
    splits: list[str],
    fn_cls: type,
    ctor_args: tuple[Any, ...],
    batch_size: int,
    loc: Location,
    subdir: str,
    *,
    actors: int | None = None,
    rows_per_file: int | None = None,
    decode_size: int | None = None,
) -> tuple[list[str], list[int], int, int]:
    """Run ``fn_cls(*ctor_args)`` over the images of ``splits`` into ``loc/subdir``; returns
    (Parquet files, rows per file, actors, GPUs). Batch order is preserved, so the output is
    the same on every run and cluster shape. With ``decode_size``, images are decoded in
    parallel CPU tasks ahead of the actors (one core per GPU actor could not keep up)."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    rds = ds.to_ray(columns=["id", "image", "label", "split"])
    if set(splits) != set(ds.manifest["splits"]):
        wanted = pa.array(splits, pa.string())
        rds = rds.map_batches(
            lambda t: t.filter(pc.is_in(t["split"], value_set=wanted)), batch_format="pyarrow"
        )
    rds, n_actors, gpus = inference_stages(rds, fn_cls, ctor_args, batch_size, actors, decode_size)
    fs, _ = filesystem(loc.uri)
    extra = {"max_rows_per_file": rows_per_file} if rows_per_file else {}
    rds.write_parquet(loc.join(subdir), filesystem=fs, **extra)
    files = sorted(p for p in fs.ls(loc.join(subdir), detail=False) if p.endswith(".parquet"))
    rows = [pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in files]
    return files, rows, n_actors, gpus
