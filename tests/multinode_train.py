"""Run by test_multinode.py in a subprocess: pretraining on a simulated 2-node Ray cluster.

usage: python -m tests.multinode_train CONFIG_JSON  (a PretrainConfig as JSON, pairs nested)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import ray
from ray.cluster_utils import Cluster

from sepp_ray.train.driver import PretrainConfig, pretrain
from sepp_ray.train.items import PairsConfig


def main(cfg: dict) -> None:
    # the simulated nodes share this machine's disk: declare it shared (sepp_ray.shared_storage)
    os.environ["SEPP_SHARED_FS"] = tempfile.gettempdir()
    # two CPUs a node, 1.5 a training worker: one rank a node, half a CPU left for decoding
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    cfg["pairs"] = PairsConfig(**cfg["pairs"])
    m = pretrain(PretrainConfig(**cfg))
    print("MANIFEST", json.dumps({"history": m["history"], "worker_nodes": m["worker_nodes"]}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
