"""A multi-node Ray cluster on this machine (node types of cluster/aws.yaml, each node its own raylet): roles
placed by resources across nodes and the placement recorded; whole nodes lost mid-run (sampler, reward,
learner) with the run finishing with every iteration exactly once and the undisturbed run's numbers.

Opt-in (`make test-multinode`): ~6 minutes on 2 cores."""
from pathlib import Path

import pytest

from rlr_dist.bench import faults as F
from rlr_dist.bench import node_faults as NF
from rlr_dist.config import build
from rlr_dist.pipeline.local_cluster import LocalCluster, node_types
from rlr_dist.models.tiny import build_tiny
from rlr_dist.train.config import TrainConfig

pytestmark = pytest.mark.multinode
ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws.yaml"


@pytest.fixture(scope="module")
def cluster():
    import ray

    with LocalCluster(AWS, NF.NODES) as c:
        ray.init(address=c.address)
        yield c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = build_tiny("pixel", tmp_path_factory.mktemp("multinode-model") / "pixel")
    return NF.place(build(TrainConfig, {
        "model": {"path": str(model), "num_inference_steps": 4}, "estimator": {"name": "rlr", "h": 1},
        "reward": {"name": "brightness"}, "data": {"prompts": ["zero", "one"]},
        "train": {"iterations": 6, "prompts_per_iteration": 2, "samples_per_prompt": 2, "eval_every": 0},
        "cluster": {"samplers": {"count": 2, "num_cpus": 0.5}, "rewards": {"count": 1, "num_cpus": 0.5},
                    "learners": {"count": 1, "num_cpus": 0.5}},
        "optim": {"lr": 3e-3}, "checkpoint": {"every": 2, "keep": 3}, "output_dir": "unused"}))


@pytest.fixture(scope="module")
def reference(base):
    """The undisturbed run's numbers from the single-process loop (tests/test_pipeline.py checks that the Ray
    pipeline reproduces them metric for metric)."""
    from rlr_dist.train.local import train_local

    _, hist = train_local(base)
    return {k: [(i + 1, h[k]) for i, h in enumerate(hist) if k in h] for k in F.SERIES}


def test_node_types_mirror_the_launcher_yaml():
    types, idle = node_types(AWS, cpus=1)
    assert idle == 10 and "head" not in types
    a100 = types["gpu-a100-spot"]
    assert a100.resources == {"CPU": 1.0, "GPU": 8.0, "accelerator_type:A100": 8.0} and a100.max_workers == 2
    with pytest.raises(ValueError, match="no worker node type 'gpu-v100'"):
        LocalCluster(AWS, {"gpu-v100": 1})


def test_roles_run_on_the_nodes_their_resources_name_and_the_run_records_them(cluster, base, reference, tmp_path):
    out, _, err = F.run(F.with_overrides(base, [f"--output_dir={tmp_path / 'run'}"]))
    assert out is not None, err
    doc = NF.nodes_of(out["output_dir"])
    by_actor = {a["actor"]: a["node"] for a in doc["actors"]}
    assert set(by_actor) == {"sampler/0", "sampler/1", "reward/0"}
    kinds = {a: cluster.node_type(n) for a, n in by_actor.items()}
    assert set(kinds.values()) == {"gpu-a10g-spot"}, kinds
    assert len(set(by_actor.values())) == 3, "one A10G unit each: three different nodes"
    (learner_nodes,) = [s["nodes"] for s in doc["learners"]]
    assert [cluster.node_type(n) for n in learner_nodes] == ["gpu-a100-spot"]
    assert doc["nodes"][learner_nodes[0]]["resources"]["accelerator_type:A100"] == 8
    assert cluster.node_type(doc["weight_store"]) == "head", "the fault record lives beside the driver"
    assert F.same_series(F.history(out), reference) and F.duplicates(F.history(out)) == 0


@pytest.mark.parametrize("name, spec, at", NF.CASES, ids=["sampler-node", "reward-node", "learner-node"])
def test_a_lost_node_loses_nothing_and_repeats_nothing(cluster, base, reference, tmp_path, name, spec, at):
    cfg = F.with_overrides(base, [f"--output_dir={tmp_path / 'run'}"])
    out, seconds, err, events = NF.run_case(cluster, cfg, spec, tmp_path)
    assert out is not None, err
    assert len(events) == 1, "the node was really killed"
    killed = events[0]["node"]
    hist = F.history(out)
    assert [s for s, _ in hist["reward/mean"]] == [1, 2, 3, 4, 5, 6] and F.duplicates(hist) == 0
    assert F.same_series(hist, reference), "a sample was lost, doubled or drawn differently"
    row = NF.record(name, spec, at, cluster, out, seconds, err, events, None, None)
    assert cluster.node_type(NF.nodes_of(out["output_dir"])["weight_store"]) == "head"
    assert row["moved"], f"the lost role did not come back on another node: {NF.nodes_of(out['output_dir'])}"
    if spec.startswith("node@learner"):
        starts = F.lineage(out["output_dir"])
        assert [s for _, s, _ in starts] == [0, 4], "restored from the iteration-4 checkpoint"
        assert out["metrics"]["restarts/learners"] == 1
    else:
        assert out["metrics"]["restarts/actors"] >= 1 and out["metrics"]["restarts/learners"] == 0
        assert killed not in {a["node"] for a in NF.nodes_of(out["output_dir"])["actors"][-1:]}
