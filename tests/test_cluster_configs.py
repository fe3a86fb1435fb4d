"""cluster/: the launcher configs pass Ray's own cluster-config validation (schema + defaults), have
autoscaled GPU workers and install this project; the KubeRay manifest has the fields the operator
requires; the README's commands name files that exist. No cloud account or cluster is touched."""

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]


def pinned_ray() -> str:
    return re.search(r'"ray\[default,tune\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation(name):
    raw = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults, as `ray up` does
    validate_config(config)

    types = config["available_node_types"]
    gpu_types = [t for t, spec in types.items() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_types and config["head_node_type"] not in gpu_types
    for t in gpu_types:  # autoscaled from zero
        assert raw["available_node_types"][t]["min_workers"] == 0 < types[t]["max_workers"] <= config["max_workers"]
    assert raw["idle_timeout_minutes"] > 0
    assert raw["file_mounts"] == {"~/meerkat-ray": "."}
    assert any(re.search(r"pip install .*-e ~/meerkat-ray", c) for c in raw["setup_commands"])
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{pinned_ray()}-")
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])


def test_kuberay_manifest_has_the_required_fields():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned_ray() == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] and 8265 in [p["containerPort"] for p in head_container["ports"]]

    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == head_container["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} <= claims


def test_readme_commands_start_submit_watch_and_tear_down():
    text = (CLUSTER / "README.md").read_text()
    for command in ("ray up", "ray job submit", "ray dashboard", "ray down", "kubectl apply", "kubectl port-forward",
                    "kubectl delete", "meerkat-ray tune", "--resume"):
        assert command in text, command
    for path in set(re.findall(r"\b((?:cluster|tune_configs)/[\w.-]+\.(?:yaml|md))", text)):
        assert (ROOT / path).is_file(), path
    for path in ("Dockerfile", "Dockerfile.dockerignore"):
        assert (CLUSTER / path).is_file()


IS_SPOT = {  # how each provider's node_config asks for an interruptible instance
    "aws.yaml": lambda nc: nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot",
    "gcp.yaml": lambda nc: (nc.get("scheduling") or {}).get("provisioningModel") == "SPOT"
    or (nc.get("scheduling") or {}).get("preemptible") is True,
}


@pytest.mark.parametrize("name", LAUNCHER)
def test_launchers_offer_spot_gpu_workers_beside_on_demand_ones(name):
    """Interruptible GPU workers are safe here (recovery is exact): each launcher config has spot /
    preemptible worker types and on-demand ones of the same shape, all passing Ray's validation,
    and cluster/README.md says what happens when one is reclaimed."""
    raw = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = raw["available_node_types"]
    gpu = {t: spec for t, spec in types.items() if spec["resources"].get("GPU", 0) > 0}
    spot = {t for t, spec in gpu.items() if IS_SPOT[name](spec["node_config"])}
    on_demand = set(gpu) - spot
    assert spot and on_demand
    shapes = {(gpu[t]["resources"]["GPU"], gpu[t]["resources"]["CPU"]) for t in on_demand}
    readme = (CLUSTER / "README.md").read_text()
    for t in spot:
        assert "spot" in t or "preemptible" in t, t
        assert (gpu[t]["resources"]["GPU"], gpu[t]["resources"]["CPU"]) in shapes  # an on-demand twin
        assert gpu[t]["min_workers"] == 0 and f"`{t}`" in readme, t
        if name == "gcp.yaml":  # a reclaimed VM is deleted, not restarted into a stale state
            assert gpu[t]["node_config"]["scheduling"]["automaticRestart"] is False
    if name == "aws.yaml":  # spot instances cannot be stopped and started again
        assert raw["provider"]["cache_stopped_nodes"] is False
    assert "reclaimed" in readme and "tests/test_multinode.py" in readme
