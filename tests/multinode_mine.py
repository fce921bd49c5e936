"""Run by test_multinode.py in a subprocess: mining on a simulated 3-node Ray cluster.

usage: python -m tests.multinode_mine IMAGES_URI OUT_URI
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import ray
from ray.cluster_utils import Cluster

from sepp_ray.mining.command import mine_command
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig


def main(images: str, out: str, enc: dict, mining: dict) -> None:
    # the simulated nodes share this machine's disk: declare it shared (sepp_ray.shared_storage)
    os.environ["SEPP_SHARED_FS"] = tempfile.gettempdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    m = mine_command(
        images,
        out,
        EncoderConfig(**enc),
        MineConfig(**mining),
        splits=["train"],
        actors=None,
        overwrite=False,
        config={},
        rows_per_file=50,
    )
    print("NODES", json.dumps(sorted({w["node"] for w in m["workers"]})))
    print("ALIVE", len([n for n in ray.nodes() if n["Alive"]]))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))
