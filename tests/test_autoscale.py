"""The autoscaler, for real on this machine: Ray's fake multi-node provider with the node types of
cluster/aws.yaml and autoscaler v2. A training job submitted through the Job Submission API (`ray job submit`)
to a cluster with no worker node makes the autoscaler start exactly the node types its roles ask for (spot
before on-demand), runs to the end, and once it is over the idle nodes go away after the idle timeout.

Opt-in (`make test-multinode`): ~4 minutes on 2 cores."""
import json
from pathlib import Path

import pytest

from rlr_dist.bench import autoscale as A
from rlr_dist.bench import node_faults as NF
from rlr_dist.config import build
from rlr_dist.models.tiny import build_tiny
from rlr_dist.train.config import TrainConfig, dump

pytestmark = pytest.mark.multinode
ROOT = Path(__file__).resolve().parents[1]
IDLE_MIN = 0.25


def test_autoscaler_config_keeps_the_launcher_node_types():
    cfg = A.launcher_config(ROOT / "cluster" / "aws.yaml", 6379, IDLE_MIN)
    types = cfg["available_node_types"]
    assert types["ray.head.default"]["resources"] == {"CPU": 0}
    assert types["gpu-a10g-spot"]["priority"] > types["gpu-a10g-ondemand"]["priority"]
    assert types["gpu-a100-spot"]["max_workers"] == 2 and types["gpu-a10g-spot"]["resources"]["GPU"] == 1
    assert cfg["idle_timeout_minutes"] == IDLE_MIN


def test_a_submitted_job_brings_up_the_nodes_its_roles_need_and_they_go_when_idle(tmp_path):
    model = build_tiny("pixel", tmp_path / "pixel")
    cfg = build(TrainConfig, {
        "model": {"path": str(model), "num_inference_steps": 4}, "estimator": {"name": "rlr", "h": 1},
        "reward": {"name": "brightness"}, "data": {"prompts": ["zero", "one"]},
        "train": {"iterations": 3, "prompts_per_iteration": 2, "samples_per_prompt": 2, "eval_every": 0},
        "cluster": {"samplers": {"count": 2, "num_cpus": 0.5}, "rewards": {"count": 1, "num_cpus": 0.5},
                    "learners": {"count": 1, "num_cpus": 0.5}},
        "optim": {"lr": 3e-3}, "checkpoint": {"every": 3}, "output_dir": "unused"})
    (tmp_path / "tiny.yaml").write_text(dump(cfg))
    r = A.main(launcher=str(ROOT / "cluster" / "aws.yaml"), config=str(tmp_path / "tiny.yaml"), out=None,
               idle_timeout_minutes=IDLE_MIN, workdir=str(tmp_path / "w"), overrides=[])
    assert r["status"] == "SUCCEEDED", r["logs"][-3000:]
    assert r["points"][0][1] == {}, "no worker node before the job"
    # two samplers and the reward actor take one A10G each, the learner one A100: spot types (priority 10)
    assert r["peak"] == {"gpu-a10g-spot": 3, "gpu-a100-spot": 1}, r["peak"]
    during = [p[1] for p in r["points"] if r["first_up"] <= p[0] <= r["done"]]
    assert during[-1] == {"gpu-a10g-spot": 3, "gpu-a100-spot": 1}, "nodes were up until the run finished"
    # every role ran on a node of the type it asked for (the run's own placement record)
    placement = json.loads((Path(r["output_dir"]) / "placement.json").read_text())
    kinds = {a["actor"]: r["node_types"].get(a["node"]) for a in placement["actors"]}
    assert kinds == {"sampler/0": "gpu-a10g-spot", "sampler/1": "gpu-a10g-spot", "reward/0": "gpu-a10g-spot"}
    assert [r["node_types"].get(n) for n in placement["learners"][0]["nodes"]] == ["gpu-a100-spot"]
    # after the run: all idle, then gone after the idle timeout (not before it, not much after)
    assert r["all_idle"] is not None and r["gone"] is not None, r["points"][-5:]
    assert IDLE_MIN * 60 - 3 <= r["gone"] - r["all_idle"] <= IDLE_MIN * 60 + 45
    assert NF.ROLE_RESOURCES["samplers"] == {"accelerator_type:A10G": 1}
