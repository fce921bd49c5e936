"""cluster.yaml, checked the way `ray up` checks it before its first cloud call (Ray's schema
and defaults, and its step that reads subnets and groups from network interfaces), its node
configs against the EC2 RunInstances request model that boto3 sends them in, and its promises:
a CPU head that runs no work, autoscaled 8x A100 workers with EFA on every network card in a
cluster placement group, NCCL's EFA plugin and devices inside the container, Ray spilling to
the NVMe RAID, drivers that wait for autoscaled GPUs, the project installed by the setup
commands, S3 through instance roles and no secrets. No network.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster.yaml"
# files that go to a cluster or a job: none may hold a credential
SHIPPED = [CLUSTER, *sorted((REPO / "jobs").glob("*.yaml")), REPO / "jobs" / "README.md"]

SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"aws_secret_access_key|aws_session_token", re.IGNORECASE),
    re.compile(r"AWS_ACCESS_KEY_ID\s*[=:]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),  # secret-key shaped
]


def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def ray_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before it talks to the cloud (commands._bootstrap_config):
    merge with the provider's defaults, then validate against Ray's schema and rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ec2_report(node_config: dict[str, Any]) -> str:
    """botocore's validation of the RunInstances request Ray's AWS provider makes from a node
    config (it adds the counts, and resolves Ray's own SubnetIds to one SubnetId)."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ec2")
    params = {k: v for k, v in node_config.items() if k != "SubnetIds"}
    params.update(MinCount=1, MaxCount=1)
    report = ParamValidator().validate(params, model.operation_model("RunInstances").input_shape)
    return str(report.generate_report())


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def test_ray_accepts_the_cluster_config() -> None:
    prepared = ray_checks(cluster())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "where, key",
    [((), "max_worker"), (("available_node_types", "gpu.a100x8"), "min_worker")],
)
def test_ray_rejects_a_misspelt_key(where: tuple[str, ...], key: str) -> None:
    """The validation above is not a formality: a typo in the file fails it."""
    config = cluster()
    node = config
    for k in where:
        node = node[k]
    node[key] = 1
    with pytest.raises(jsonschema.ValidationError, match=key):
        ray_checks(config)


def test_node_configs_are_valid_ec2_requests() -> None:
    types = cluster()["available_node_types"]
    for name, node_type in types.items():
        assert ec2_report(node_type["node_config"]) == "", name
    typo = dict(types["gpu.a100x8"]["node_config"], IamInstanceProfil={"Name": "x"})
    assert "Unknown parameter" in ec2_report(typo)


def test_cpu_head_and_autoscaled_a100_workers() -> None:
    config = ray_checks(cluster())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))  # a CPU instance
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["node_config"]["InstanceType"] == "p4d.24xlarge"]
    assert len(gpu) == 1, "one A100 x8 worker type"
    (a100,) = gpu
    assert a100["resources"]["GPU"] == 8
    assert 0 <= a100["min_workers"] < a100["max_workers"]  # room to autoscale
    assert config["max_workers"] >= a100["max_workers"]


def test_setup_installs_the_synced_project() -> None:
    config = ray_checks(cluster())
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert len(remote) == 1, "the checkout is synced to the nodes"
    for excluded in (".venv", "runs", ".git"):
        assert excluded in config["rsync_exclude"]
    install = re.compile(rf"pip install .*-e {re.escape(remote[0])}(\s|$)")
    for kind in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(c) for c in config[kind]), kind


def test_images_run_the_ray_version_the_tests_ran() -> None:
    import ray

    docker = cluster()["docker"]
    for key in ("image", "head_image"):
        assert f":{ray.__version__}-" in docker[key], key


def test_s3_through_instance_roles_and_no_secrets() -> None:
    config = cluster()
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), name
    assert "ssh_private_key" not in config["auth"]
    for path in SHIPPED:
        assert path.exists(), path
        assert secrets_in(path.read_text()) == [], path
    # the scan finds what it looks for
    fake_id = "AKIA" + "Q" * 16
    fake_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    assert secrets_in(f"key: {fake_id}\nsecret: {fake_key}\n") == [fake_id, fake_key]


def gpu_workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        n: t for n, t in config["available_node_types"].items() if t.get("resources", {}).get("GPU")
    }


def test_gpu_workers_get_efa_on_every_card_and_a_placement_group() -> None:
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    config = ray_checks(cluster())
    for name, t in gpu_workers(config).items():
        nc = t["node_config"]
        assert nc["Placement"]["GroupName"], name
        nics = nc["NetworkInterfaces"]
        assert {n["InterfaceType"] for n in nics} == {"efa"}, name
        assert sorted(n["NetworkCardIndex"] for n in nics) == [0, 1, 2, 3]  # p4d: 4 cards
        assert [n["DeviceIndex"] for n in nics if n["NetworkCardIndex"] == 0] == [0]
        assert "SubnetIds" not in nc and "SecurityGroupIds" not in nc  # Ray refuses both
    # Ray's own step for interfaces (no cloud call) takes subnets and groups from them ...
    prepared = _configure_from_network_interfaces(copy.deepcopy(config))
    for name in gpu_workers(config):
        nc = prepared["available_node_types"][name]["node_config"]
        assert nc["SubnetIds"] and nc["SecurityGroupIds"], name
    # ... and refuses an interface without a subnet: the check bites
    broken = copy.deepcopy(config)
    name = next(iter(gpu_workers(broken)))
    del broken["available_node_types"][name]["node_config"]["NetworkInterfaces"][1]["SubnetId"]
    with pytest.raises(ValueError, match="missing a subnet"):
        _configure_from_network_interfaces(broken)
    # botocore knows every interface field (a typo is reported)
    nc = copy.deepcopy(cluster()["available_node_types"][name]["node_config"])
    nc["NetworkInterfaces"][0]["InterfaceTyp"] = "efa"
    assert "Unknown parameter" in ec2_report(nc)


def test_head_and_workers_share_one_security_group() -> None:
    """EFA needs all traffic between members of its group; the head must reach the workers."""
    types = cluster()["available_node_types"]
    head = types["head.cpu"]["node_config"]
    for name, t in gpu_workers(cluster()).items():
        groups = {g for n in t["node_config"]["NetworkInterfaces"] for g in n["Groups"]}
        assert groups == set(head["SecurityGroupIds"]), name


def test_nccl_uses_efa_inside_the_container() -> None:
    for name, t in gpu_workers(cluster()).items():
        opts = " ".join(t["docker"]["worker_run_options"])
        for uverbs in range(4):
            assert f"--device=/dev/infiniband/uverbs{uverbs}" in opts, name
        assert "--ulimit memlock=-1:-1" in opts
        assert "-v /opt/amazon:/opt/amazon:ro" in opts  # libfabric + aws-ofi-nccl of the AMI
        env = dict(
            o.removeprefix("--env ").split("=", 1)
            for o in t["docker"]["worker_run_options"]
            if o.startswith("--env ")
        )
        assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
        assert "/opt/amazon/ofi-nccl/lib" in env["LD_LIBRARY_PATH"].split(":")


def test_ray_spills_to_the_nvme_raid() -> None:
    for name, t in gpu_workers(cluster()).items():
        init = t["initialization_commands"]
        assert any("mdadm --create /dev/md0" in c and "/mnt/nvme" in c for c in init), name
        for c in init:  # the shell commands parse
            r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
            assert r.returncode == 0, (c, r.stderr)
        # Ray's temp dir (object spilling goes under it) is the NVMe RAID
        assert "-v /mnt/nvme/ray:/tmp/ray" in t["docker"]["worker_run_options"]


def test_head_drivers_wait_for_autoscaled_gpus() -> None:
    from sepp_ray.resources import WAIT_ENV

    opts = cluster()["docker"]["head_run_options"]
    waits = [o.split("=", 1)[1] for o in opts if o.startswith(f"--env {WAIT_ENV}=")]
    assert len(waits) == 1 and float(waits[0]) >= 600  # a p4d boots, pulls and joins
