"""Cluster manifests: the shipped files pass Ray's own validators and the project's rules, and
mutated copies (negative controls) fail for the reason they were mutated for. Offline; no cloud."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from cluster import validate as cv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aws():
    return cv.load_yaml(cv.CLUSTER_DIR / "aws.yaml")


@pytest.fixture(scope="module")
def gcp():
    return cv.load_yaml(cv.CLUSTER_DIR / "gcp.yaml")


@pytest.fixture(scope="module")
def raycluster():
    return cv.load_yaml(cv.RAYCLUSTER_FILE)


@pytest.fixture(scope="module")
def rayjob():
    return cv.load_yaml(cv.RAYJOB_FILE)


def _worker(doc, name):
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


# ------------------------------------------------------------------------------ shipped files pass


def test_all_shipped_manifests_validate():
    lines = cv.validate_all()
    assert len(lines) == 4 and all(line.startswith("ok") for line in lines)


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_launcher_layout(name, request):
    cfg = cv.validate_launcher(request.getfixturevalue(name), name)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    classes = {k for nt in types.values() for k in nt["resources"] if k.startswith("accelerator_type:")}
    wanted = {"A10G", "A100", "H100"} if name == "aws" else {"L4", "A100", "H100"}
    assert classes == {f"accelerator_type:{c}" for c in wanted}
    for n, nt in types.items():
        if n != cfg["head_node_type"]:
            assert 0 <= nt["min_workers"] <= nt["max_workers"]
            assert n.endswith(("-spot", "-ondemand"))
    assert cfg["docker"]["image"] == "${RLR_DIST_IMAGE}"
    assert cfg["idle_timeout_minutes"] > 0 and cfg["setup_commands"]


def test_kuberay_derived_groups(raycluster):
    derived = cv.validate_raycluster(raycluster)
    types = derived["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0 and "GPU" not in types["headgroup"]["resources"]
    assert types["gpu-a10g"]["resources"]["GPU"] == 1
    assert types["gpu-a10g"]["resources"]["accelerator_type:A10G"] == 1
    assert types["gpu-a100"]["resources"]["GPU"] == 8 and types["gpu-h100"]["resources"]["GPU"] == 8
    assert derived["max_workers"] == sum(g["maxReplicas"] for g in raycluster["spec"]["workerGroupSpecs"])
    assert derived["idle_timeout_minutes"] == 10


def test_rayjob_matches_raycluster_and_cli(rayjob, raycluster):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    assert rayjob["spec"]["entrypoint"] == "rlr-dist train jobs/configs/digits.yaml"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    configs = REPO / "jobs" / "configs"
    if configs.is_dir():  # written by the jobs work; check the entrypoint names a real config once it lands
        assert (configs / "digits.yaml").is_file()


def test_every_quantity_checked(raycluster):
    # 3 workers x (3 limits + 3 requests + sizeLimit) + head 4 + autoscaler 4
    assert cv.check_quantities(raycluster["spec"]) == 3 * 7 + 4 + 4


def test_render_fills_and_refuses_unset():
    text = (cv.CLUSTER_DIR / "aws.yaml").read_text()
    env = {n: f"value-{n.lower()}" for n in cv.PLACEHOLDERS}
    out = cv.render(text, env)
    assert "${" not in out.replace("${...}", "")
    assert yaml.safe_load(out)["docker"]["image"] == "value-rlr_dist_image"
    env.pop("RLR_DIST_SUBNET_ID")
    with pytest.raises(cv.ManifestError, match="RLR_DIST_SUBNET_ID"):
        cv.render(text, env)


def test_cli_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((cv.CLUSTER_DIR / "aws.yaml").read_text() + "\nbogus_key: 1\n")
    assert cv.main([str(cv.RAYJOB_FILE)]) == 0
    assert cv.main([str(bad)]) == 1
    assert "bogus_key" in capsys.readouterr().err
    assert cv.main(["render"]) == 2


# ------------------------------------------------------------------------------ negative controls


def test_launcher_unknown_top_level_key(aws):
    bad = copy.deepcopy(aws)
    bad["bogus_key"] = True
    with pytest.raises(cv.ManifestError, match="bogus_key"):
        cv.validate_launcher(bad)


def test_launcher_misspelled_node_type_key(gcp):
    bad = copy.deepcopy(gcp)
    nt = bad["available_node_types"]["gpu-l4-spot"]
    nt["max_worker"] = nt.pop("max_workers")
    with pytest.raises(cv.ManifestError, match="max_worker"):
        cv.validate_launcher(bad)


@pytest.mark.parametrize("mutation, message", [
    (lambda c: c["available_node_types"]["head"].update(resources={"CPU": 8}), "CPU: 0"),
    (lambda c: c["available_node_types"]["gpu-a10g-spot"].update(min_workers=9), "min_workers 9 > max_workers 8"),
    (lambda c: c["available_node_types"]["gpu-a100-spot"]["resources"].update(GPU=4), "p4d.24xlarge has 8 GPUs"),
    (lambda c: c["available_node_types"].pop("gpu-h100-ondemand"), "accelerator_type:H100: needs a spot group"),
    (lambda c: c["available_node_types"]["gpu-a10g-ondemand"].update(priority=50), "higher priority"),
    (lambda c: c["available_node_types"]["gpu-a10g-spot"]["resources"].pop("GPU"), "without GPU"),
    (lambda c: c["docker"].update(run_options=[]), "RAY_USAGE_STATS_ENABLED"),
])
def test_launcher_project_rules(aws, mutation, message):
    bad = copy.deepcopy(aws)
    mutation(bad)
    with pytest.raises(cv.ManifestError, match=message):
        cv.validate_launcher(bad)


def test_gcp_accelerator_count_mismatch(gcp):
    bad = copy.deepcopy(gcp)
    bad["available_node_types"]["gpu-h100-spot"]["node_config"]["guestAccelerators"][0]["acceleratorCount"] = 4
    with pytest.raises(cv.ManifestError, match="guestAccelerators count 4"):
        cv.validate_launcher(bad)


@pytest.mark.parametrize("key, value", [("cpu", "lots"), ("memory", "12XB"), ("cpu", ""), ("memory", "1.5 Gi")])
def test_malformed_quantity(raycluster, key, value):
    bad = copy.deepcopy(raycluster)
    _worker(bad, "gpu-a10g")["template"]["spec"]["containers"][0]["resources"]["limits"][key] = value
    with pytest.raises(cv.ManifestError, match="quantity"):
        cv.validate_raycluster(bad)


def test_ray_parser_itself_rejects_bad_cpu(raycluster):
    """The Ray layer (not just the project's regex) rejects a malformed CPU quantity."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    bad = copy.deepcopy(raycluster)
    _worker(bad, "gpu-h100")["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "lots"
    with pytest.raises(ValueError, match="Invalid number format"):
        _derive_autoscaling_config_from_ray_cr(bad)


def test_requests_above_limits(raycluster):
    bad = copy.deepcopy(raycluster)
    _worker(bad, "gpu-a100")["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "2000Gi"
    with pytest.raises(cv.ManifestError, match="requests.memory"):
        cv.validate_raycluster(bad)


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_min_replicas_above_max(request, which):
    bad = copy.deepcopy(request.getfixturevalue(which))
    g = _worker(bad, "gpu-a100")
    g["minReplicas"], g["maxReplicas"], g["replicas"] = 3, 2, 3
    check = cv.validate_raycluster if which == "raycluster" else cv.validate_rayjob
    with pytest.raises(cv.ManifestError, match="minReplicas 3 > maxReplicas 2"):
        check(bad)


@pytest.mark.parametrize("path, typo", [
    (("spec",), ("shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
    (("spec",), ("entrypoint", "entrypont")),
    (("spec", "rayClusterSpec", "headGroupSpec"), ("rayStartParams", "rayStartParam")),
    (("spec", "rayClusterSpec", "autoscalerOptions"), ("idleTimeoutSeconds", "idleTimeoutSecond")),
])
def test_rayjob_misspelled_field(rayjob, path, typo):
    bad = copy.deepcopy(rayjob)
    node = bad
    for p in path:
        node = node[p]
    right, wrong = typo
    node[wrong] = node.pop(right)
    with pytest.raises(cv.ManifestError, match=wrong):
        cv.validate_rayjob(bad)


@pytest.mark.parametrize("mutation", [
    lambda d: d.update(apiVersion="ray.io/v1alpha1"),
    lambda d: d["spec"].update(entrypoint="python train.py"),
    lambda d: _worker(d, "gpu-a10g").update(maxReplicas="8"),
    lambda d: d["metadata"].update(name="RLR_Dist"),
])
def test_rayjob_schema_rejects(rayjob, mutation):
    bad = copy.deepcopy(rayjob)
    mutation(bad)
    with pytest.raises(cv.ManifestError):
        cv.validate_rayjob(bad)


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_worker_group_without_gpu_limit(request, which):
    bad = copy.deepcopy(request.getfixturevalue(which))
    res = _worker(bad, "gpu-h100")["template"]["spec"]["containers"][0]["resources"]
    res["limits"].pop("nvidia.com/gpu")
    res["requests"].pop("nvidia.com/gpu")
    check = cv.validate_raycluster if which == "raycluster" else cv.validate_rayjob
    with pytest.raises(cv.ManifestError, match="nvidia.com/gpu"):
        check(bad)


def test_rayjob_schema_is_valid_2020_12():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(json.loads(cv.RAYJOB_SCHEMA_FILE.read_text()))


def test_unknown_placeholder_rejected(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text((cv.RAYCLUSTER_FILE).read_text().replace("${RLR_DIST_IMAGE}", "${RLR_DIST_IMAG}", 1))
    with pytest.raises(cv.ManifestError, match="RLR_DIST_IMAG"):
        cv.validate_file(p)
