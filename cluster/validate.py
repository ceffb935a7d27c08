"""Offline validation of the cluster manifests, and placeholder rendering.

    python -m cluster.validate                  # validate every shipped manifest
    python -m cluster.validate FILE [FILE ...]  # validate the given manifests (kind is detected)
    python -m cluster.validate render FILE      # print FILE with ${NAME} filled from the environment

Nothing here talks to a cloud or a Kubernetes API server. What is checked:

* launcher YAML (cluster/aws.yaml, cluster/gcp.yaml): Ray's own ``prepare_config`` (fills the
  provider defaults) then ``validate_config`` (jsonschema against ray/autoscaler/ray-schema.json, so an
  unknown key fails), plus project rules: a CPU head with ``CPU: 0``, GPU workers whose GPU count
  matches the instance / machine type, ``min_workers <= max_workers``, and for every GPU class a spot
  group with a higher ``priority`` than its on-demand fallback group.
* RayCluster (cluster/kuberay/raycluster.yaml) and the RayJob's embedded ``rayClusterSpec``: Ray's
  KubeRay parser ``_derive_autoscaling_config_from_ray_cr`` (the code the in-cluster autoscaler runs,
  which also calls ``validate_config``), plus: every resource quantity parses (Kubernetes quantity
  syntax and Ray's ``parse_quantity``), requests <= limits, ``minReplicas <= replicas <= maxReplicas``,
  every worker group's Ray container has an ``nvidia.com/gpu`` limit >= 1, the head asks for none.
* RayJob (cluster/kuberay/rayjob.yaml): the project's JSON Schema (cluster/kuberay/rayjob.schema.json),
  then the rules above on its ``rayClusterSpec``.

The Ray functions used are private APIs of Ray 2.60 (pinned in constraints.txt); see
docs in ../shared/docs/stack.md section 7.
"""

from __future__ import annotations

import copy
import decimal
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
LAUNCHER_FILES = (CLUSTER_DIR / "aws.yaml", CLUSTER_DIR / "gcp.yaml")
RAYCLUSTER_FILE = KUBERAY_DIR / "raycluster.yaml"
RAYJOB_FILE = KUBERAY_DIR / "rayjob.yaml"
RAYJOB_SCHEMA_FILE = KUBERAY_DIR / "rayjob.schema.json"

# Placeholders the manifests may use; `render` fills them from the environment.
PLACEHOLDERS = frozenset({
    "RLR_DIST_IMAGE",
    "RLR_DIST_INSTANCE_PROFILE_ARN",
    "RLR_DIST_SUBNET_ID",
    "RLR_DIST_SECURITY_GROUP_ID",
    "GCP_PROJECT_ID",
})
_PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Kubernetes resource.Quantity serialisation (decimal / binary SI suffix or decimal exponent).
K8S_QUANTITY_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[mkMGTPE]|[eE][+-]?[0-9]+)?$")

# GPUs per instance / machine type for the types the launcher configs use.
GPUS_PER_INSTANCE = {
    # AWS
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
    # GCP
    "g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-24": 2, "g2-standard-48": 4,
    "a2-highgpu-1g": 1, "a2-highgpu-8g": 8, "a3-highgpu-8g": 8,
}

GPU_LIMIT_KEY = "nvidia.com/gpu"


class ManifestError(ValueError):
    """A manifest failed validation; the message says which file / field and why."""


# ---------------------------------------------------------------------------------------- loading


def load_yaml(path: str | os.PathLike) -> dict:
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a YAML mapping, got {type(doc).__name__}")
    return doc


def placeholders_in(text: str) -> set[str]:
    return set(_PLACEHOLDER_RE.findall(text))


def render(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace every ``${NAME}`` with ``env[NAME]``; fail listing the names that are unset or empty."""
    env = os.environ if env is None else env
    missing = sorted(n for n in placeholders_in(text) if not env.get(n))
    if missing:
        raise ManifestError("unset placeholder(s): " + ", ".join(missing))
    return _PLACEHOLDER_RE.sub(lambda m: env[m.group(1)], text)


def check_placeholders(text: str, where: str = "") -> None:
    unknown = sorted(placeholders_in(text) - PLACEHOLDERS)
    if unknown:
        raise ManifestError(f"{where}: unknown placeholder(s) {unknown}; known: {sorted(PLACEHOLDERS)}")


# ---------------------------------------------------------------------------------- launcher YAML


def validate_launcher(config: dict, where: str = "launcher config") -> dict:
    """Ray's prepare_config + validate_config, then the project rules. Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as e:  # jsonschema.ValidationError, KeyError, RuntimeError, ...
        raise ManifestError(f"{where}: rejected by Ray's launcher schema: {e}") from e

    provider = prepared["provider"]["type"]
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    errors: list[str] = []

    if not prepared.get("docker", {}).get("image"):
        errors.append("docker.image is not set")
    run_options = " ".join(prepared.get("docker", {}).get("run_options", []))
    if "RAY_USAGE_STATS_ENABLED=0" not in run_options:
        errors.append("docker.run_options must set RAY_USAGE_STATS_ENABLED=0")
    if "idle_timeout_minutes" not in config:
        errors.append("idle_timeout_minutes must be set explicitly")

    head_res = types[head].get("resources", {})
    if head_res.get("CPU") != 0 or head_res.get("GPU", 0) != 0:
        errors.append(f"head node type {head!r} must advertise CPU: 0 and no GPU, has {head_res}")

    classes: dict[str, dict[str, list[tuple[str, int]]]] = {}
    for name, nt in types.items():
        if name == head:
            continue
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers", 0)
        if lo > hi:
            errors.append(f"{name}: min_workers {lo} > max_workers {hi}")
        gpus = nt["resources"].get("GPU", 0)
        if gpus < 1:
            errors.append(f"{name}: worker node type without GPU resources")
            continue
        itype, declared, spot = _node_gpu_facts(provider, nt["node_config"])
        if itype in GPUS_PER_INSTANCE and GPUS_PER_INSTANCE[itype] != gpus:
            errors.append(f"{name}: {itype} has {GPUS_PER_INSTANCE[itype]} GPUs, resources say {gpus}")
        if declared is not None and declared != gpus:
            errors.append(f"{name}: guestAccelerators count {declared} != resources.GPU {gpus}")
        accel = [k for k in nt["resources"] if k.startswith("accelerator_type:")]
        if len(accel) != 1:
            errors.append(f"{name}: needs exactly one accelerator_type:* resource, has {accel}")
            continue
        bucket = classes.setdefault(accel[0], {"spot": [], "ondemand": []})
        bucket["spot" if spot else "ondemand"].append((name, nt.get("priority", 0)))

    if not classes:
        errors.append("no GPU worker node types")
    for accel, groups in sorted(classes.items()):
        if not groups["spot"] or not groups["ondemand"]:
            errors.append(f"{accel}: needs a spot group and an on-demand fallback group, has {groups}")
            continue
        if min(p for _, p in groups["spot"]) <= max(p for _, p in groups["ondemand"]):
            errors.append(f"{accel}: spot groups must have a higher priority than on-demand ones: {groups}")

    if errors:
        raise ManifestError(f"{where}: " + "; ".join(errors))
    return prepared


def _node_gpu_facts(provider: str, node_config: dict) -> tuple[str | None, int | None, bool]:
    """(instance type, GPU count declared in node_config or None, is spot) for AWS / GCP node configs."""
    if provider == "aws":
        spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        return node_config.get("InstanceType"), None, spot
    if provider == "gcp":
        sched = node_config.get("scheduling", {})
        if isinstance(sched, list):  # Ray's legacy list form
            sched = {k: v for item in sched for k, v in item.items()}
        spot = sched.get("provisioningModel") == "SPOT" or bool(sched.get("preemptible"))
        accels = node_config.get("guestAccelerators")
        declared = sum(int(a.get("acceleratorCount", 0)) for a in accels) if accels else None
        return node_config.get("machineType"), declared, spot
    return None, None, False


# ----------------------------------------------------------------------------------------- KubeRay


def parse_k8s_quantity(value: Any, where: str = "") -> decimal.Decimal:
    """Parse a Kubernetes quantity strictly (syntax regex, then Ray's parse_quantity)."""
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ManifestError(f"{where}: quantity {value!r} must be a string or an integer")
    text = str(value)
    if not K8S_QUANTITY_RE.match(text):
        raise ManifestError(f"{where}: {text!r} is not a Kubernetes resource quantity")
    try:
        return decimal.Decimal(parse_quantity(text))
    except Exception as e:
        raise ManifestError(f"{where}: {text!r} does not parse as a quantity: {e}") from e


def check_quantities(obj: Any, path: str = "") -> int:
    """Every resources.limits/requests value and emptyDir.sizeLimit parses; requests <= limits.

    Returns how many quantities were checked."""
    count = 0
    if isinstance(obj, dict):
        for key, val in obj.items():
            sub = f"{path}.{key}" if path else key
            if key == "resources" and isinstance(val, dict) and ({"limits", "requests"} & val.keys()):
                parsed: dict[str, dict[str, decimal.Decimal]] = {}
                for kind in ("limits", "requests"):
                    items = val.get(kind) or {}
                    if not isinstance(items, dict):
                        raise ManifestError(f"{sub}.{kind}: must be a mapping")
                    parsed[kind] = {r: parse_k8s_quantity(q, f"{sub}.{kind}.{r}") for r, q in items.items()}
                    count += len(items)
                for r, req in parsed["requests"].items():
                    lim = parsed["limits"].get(r)
                    if lim is not None and req > lim:
                        raise ManifestError(f"{sub}: requests.{r} {req} > limits.{r} {lim}")
            elif key == "sizeLimit":
                parse_k8s_quantity(val, sub)
                count += 1
            else:
                count += check_quantities(val, sub)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            count += check_quantities(item, f"{path}[{i}]")
    return count


def validate_raycluster_spec(spec: dict, name: str = "rlr-dist", namespace: str = "rlr-dist",
                             where: str = "RayCluster spec") -> dict:
    """Project rules + Ray's KubeRay parser on a RayCluster spec. Returns the derived autoscaling config."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: spec must be a mapping")
    if spec.get("enableInTreeAutoscaling") is not True:
        raise ManifestError(f"{where}: enableInTreeAutoscaling must be true")
    check_quantities(spec, where)

    head_limits = _first_container(spec.get("headGroupSpec", {}), f"{where}.headGroupSpec") \
        .get("resources", {}).get("limits", {})
    if GPU_LIMIT_KEY in head_limits:
        raise ManifestError(f"{where}.headGroupSpec: the head must not ask for GPUs")

    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        raise ManifestError(f"{where}: no workerGroupSpecs")
    seen = set()
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]({g.get('groupName')})"
        if g.get("groupName") in seen:
            raise ManifestError(f"{gw}: duplicate groupName")
        seen.add(g.get("groupName"))
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        reps = g.get("replicas", lo)
        for label, v in (("minReplicas", lo), ("maxReplicas", hi), ("replicas", reps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ManifestError(f"{gw}: {label} must be a non-negative integer, got {v!r}")
        if not lo <= hi:
            raise ManifestError(f"{gw}: minReplicas {lo} > maxReplicas {hi}")
        if not lo <= reps <= hi:
            raise ManifestError(f"{gw}: replicas {reps} outside [minReplicas {lo}, maxReplicas {hi}]")
        limits = _first_container(g, gw).get("resources", {}).get("limits", {})
        if GPU_LIMIT_KEY not in limits:
            raise ManifestError(f"{gw}: the Ray container has no {GPU_LIMIT_KEY} limit (GPU worker group)")
        if parse_k8s_quantity(limits[GPU_LIMIT_KEY], f"{gw}.limits.{GPU_LIMIT_KEY}") < 1:
            raise ManifestError(f"{gw}: {GPU_LIMIT_KEY} limit must be >= 1")
        tolerations = g.get("template", {}).get("spec", {}).get("tolerations") or []
        if not any(t.get("key") == GPU_LIMIT_KEY for t in tolerations):
            raise ManifestError(f"{gw}: needs a toleration for the {GPU_LIMIT_KEY} taint of GPU nodes")

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": name, "namespace": namespace}, "spec": copy.deepcopy(spec)}
    try:
        derived = _derive_autoscaling_config_from_ray_cr(cr)
    except Exception as e:
        raise ManifestError(f"{where}: rejected by Ray's KubeRay parser: {type(e).__name__}: {e}") from e
    for gname, nt in derived["available_node_types"].items():
        if gname != "headgroup" and nt["resources"].get("GPU", 0) < 1:
            raise ManifestError(f"{where}: Ray derives no GPU for worker group {gname}")
    return derived


def _first_container(group: dict, where: str) -> dict:
    try:
        return group["template"]["spec"]["containers"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise ManifestError(f"{where}: template.spec.containers[0] is missing") from e


def validate_raycluster(doc: dict, where: str = "RayCluster") -> dict:
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayCluster":
        raise ManifestError(f"{where}: expected apiVersion ray.io/v1, kind RayCluster")
    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        raise ManifestError(f"{where}: metadata.name is required")
    return validate_raycluster_spec(doc.get("spec"), meta["name"], meta.get("namespace", "default"), where)


def rayjob_schema() -> dict:
    with open(RAYJOB_SCHEMA_FILE) as f:
        return json.load(f)


def validate_rayjob(doc: dict, where: str = "RayJob", schema: dict | None = None) -> dict:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema or rayjob_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise ManifestError(f"{where}: " + "; ".join(
            f"{e.json_path}: {e.message}" for e in errors[:5]))
    meta = doc["metadata"]
    return validate_raycluster_spec(doc["spec"]["rayClusterSpec"], meta["name"],
                                    meta.get("namespace", "default"), f"{where}.spec.rayClusterSpec")


# ------------------------------------------------------------------------------------------ driver


def validate_file(path: str | os.PathLike) -> dict:
    """Validate one manifest, detecting its kind. Returns the Ray-derived / prepared config."""
    text = Path(path).read_text()
    check_placeholders(text, str(path))
    doc = load_yaml(path)
    kind = doc.get("kind")
    if kind == "RayJob":
        return validate_rayjob(doc, str(path))
    if kind == "RayCluster":
        return validate_raycluster(doc, str(path))
    if "provider" in doc:
        return validate_launcher(doc, str(path))
    raise ManifestError(f"{path}: neither a launcher config (provider:) nor a RayCluster / RayJob")


def validate_all() -> list[str]:
    """Validate every shipped manifest and their consistency. Returns a line per file."""
    out = []
    for p in (*LAUNCHER_FILES, RAYCLUSTER_FILE, RAYJOB_FILE):
        cfg = validate_file(p)
        groups = [n for n in cfg["available_node_types"] if n not in (cfg["head_node_type"],)]
        out.append(f"ok  {p.relative_to(CLUSTER_DIR.parent)}  ({len(groups)} worker groups)")
    job_spec = load_yaml(RAYJOB_FILE)["spec"]["rayClusterSpec"]
    if job_spec != load_yaml(RAYCLUSTER_FILE)["spec"]:
        raise ManifestError(f"{RAYJOB_FILE}: spec.rayClusterSpec differs from {RAYCLUSTER_FILE} spec")
    return out


def main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["render"]:
            if len(args) != 2:
                print("usage: python -m cluster.validate render FILE", file=sys.stderr)
                return 2
            sys.stdout.write(render(Path(args[1]).read_text()))
            return 0
        if args:
            for p in args:
                validate_file(p)
                print(f"ok  {p}")
        else:
            print("\n".join(validate_all()))
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
