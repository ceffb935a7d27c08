"""A multi-node Ray cluster on one machine whose node types are those of a cluster-launcher YAML.

Each node is a separate raylet (its own object store and worker processes) started by
``ray.cluster_utils.Cluster``; a node type keeps the launcher's name, its logical ``GPU`` count and its custom
resources (``accelerator_type:A10G`` ...), with its ``CPU`` count scaled down to what one machine can carry.
The head takes no tasks (``CPU: 0``, as in ``cluster/aws.yaml``): drivers, the Train controller and the
weight store live there, and it is the one node that is never lost. Used by the multi-node tests and the
node-loss rows of ``rlr-dist bench faults``; ``kill`` loses a node the way a reclaimed spot instance does
(every process on it killed at once, no goodbye to the GCS).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The GCS notices a silent node in ~3 s instead of Ray's default ~30 s, so node-loss tests take seconds.
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]      # what a node of this type advertises to Ray (CPU scaled, GPU logical)
    min_workers: int = 0
    max_workers: int = 1
    priority: int = 0                # the autoscaler's tie-break between types that fit alike (spot: higher)


def node_types(launcher: str | Path, cpus: float = 1) -> tuple[dict[str, NodeType], float]:
    """The worker node types of a cluster-launcher YAML with ``CPU`` set to ``cpus`` (logical), and the
    launcher's idle timeout in minutes."""
    path = Path(launcher)
    try:
        doc = yaml.safe_load(path.read_text())
        head, kinds = doc["head_node_type"], doc["available_node_types"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Ray cluster-launcher YAML ({type(e).__name__}: {e})") from None
    out = {}
    for name, t in kinds.items():
        if name == head:
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        res["CPU"] = float(cpus)
        out[name] = NodeType(name, res, int(t.get("min_workers", 0)), int(t.get("max_workers", 1)),
                             int(t.get("priority", 0)))
    return out, float(doc.get("idle_timeout_minutes", 5))


def ray_node_args(resources: dict[str, float]) -> dict:
    """``Cluster.add_node`` / ``ray start`` arguments for a node advertising ``resources``."""
    res = dict(resources)
    args = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0)}
    if res:
        args["resources"] = res
    return args


@dataclass
class LocalCluster:
    """``with LocalCluster("cluster/aws.yaml", {"gpu-a10g-spot": 3, "gpu-a100-spot": 1}) as c:`` starts the head
    and those nodes; ``c.address`` is for ``ray.init`` / ``--cluster.address``, ``c.dashboard`` for
    ``ray job submit``."""

    launcher: str | Path
    start_nodes: dict[str, int] = field(default_factory=dict)
    cpus: float = 1
    object_store_mb: int = 300
    types: dict[str, NodeType] = field(init=False)
    nodes: list[tuple[str, object]] = field(init=False, default_factory=list)   # (type, ray Node), live ones

    def __post_init__(self) -> None:
        self.types, _ = node_types(self.launcher, self.cpus)
        for name in self.start_nodes:
            if name not in self.types:
                raise ValueError(f"{self.launcher}: no worker node type {name!r} (it has {sorted(self.types)})")

    def __enter__(self) -> "LocalCluster":
        from ray.cluster_utils import Cluster

        t0 = time.time()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": None,
            "object_store_memory": self.object_store_mb << 20, "_system_config": FAST_FAILURE_DETECTION})
        try:
            for name, n in self.start_nodes.items():
                for _ in range(n):
                    self.add(name)
        except BaseException:
            self.cluster.shutdown()
            raise
        print(f"[local-cluster] head + {len(self.nodes)} nodes ({', '.join(f'{n}x {t}' for t, n in self.start_nodes.items())}) "
              f"up in {time.time() - t0:.0f} s", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return "http://" + self.cluster.head_node.address_info["webui_url"]

    def add(self, type_name: str):
        node = self.cluster.add_node(object_store_memory=self.object_store_mb << 20,
                                     **ray_node_args(self.types[type_name].resources))
        self.nodes.append((type_name, node))
        return node

    def node_type(self, node_id: str) -> str:
        """The type of the node with Ray id ``node_id`` (``head`` for the head)."""
        if node_id == self.cluster.head_node.node_id:
            return "head"
        return next((t for t, n in self.nodes if n.node_id == node_id), "?")

    def kill(self, node_id: str) -> str:
        """Lose the node ``node_id`` at once (raylet, object store and every worker on it SIGKILLed); returns
        its type."""
        for i, (t, n) in enumerate(self.nodes):
            if n.node_id == node_id:
                self.cluster.remove_node(n, allow_graceful=False)
                del self.nodes[i]
                return t
        raise ValueError(f"no live worker node {node_id}")
