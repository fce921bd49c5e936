"""Run by test_multinode.py in a subprocess: pretraining on a simulated 2-node Ray cluster.

usage: python -m tests.multinode_train CONFIG_JSON  (a PretrainConfig as JSON, pairs nested)
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from sepp_ray.train.driver import PretrainConfig, pretrain
from sepp_ray.train.items import PairsConfig


def main(cfg: dict) -> None:
    # one CPU per node and one CPU per training worker: the two ranks cannot share a node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
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
