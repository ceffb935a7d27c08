"""A flow-matching transformer adapter (tiny SD3) through the Ray pipeline: sampler and reward actors, a
DeepSpeed learner, a random SDE window per iteration drawn by the learner with the plans — the same metrics as
the single-process loop, and the estimator's coverage (fixed steps, bias) in the MLflow run's params and tags."""
import pytest
import torch

from rlr_dist.config import build
from rlr_dist.models.tiny import build_tiny
from rlr_dist.train.config import TrainConfig

TRANSPORT = ("time/", "samples_per_s", "weights_version", "restarts/")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from rlr_dist.pipeline.run import _env

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": _env()})
    yield
    ray.shutdown()


def _cfg(model_path, out) -> TrainConfig:
    return build(TrainConfig, {
        "model": {"path": str(model_path), "sampler": "flow", "num_inference_steps": 6, "eta": 0.7, "resolution": 32,
                  "guidance_scale": 2.0, "flow": {"window": {"kind": "random", "length": 2}}},
        "estimator": {"name": "rlr", "h": 1, "deterministic": "absorb"},
        "regulariser": {"name": "kl_exact", "beta": 0.1},
        "reward": {"name": "brightness"},
        "data": {"prompts": ["a cat", "a red dog"]},
        "train": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 2, "eval_every": 2,
                  "eval_samples": 4},
        "cluster": {r: {"count": 1, "num_cpus": 0.5} for r in ("samplers", "rewards", "learners")},
        "deepspeed": {"zero_stage": 1}, "optim": {"lr": 3e-3}, "checkpoint": {"every": 2},
        "output_dir": str(out)})


@pytest.mark.e2e
def test_flow_adapter_trains_through_the_ray_pipeline_as_the_local_loop(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from rlr_dist.models import load_model
    from rlr_dist.pipeline.run import train
    from rlr_dist.train.learner import Learner
    from rlr_dist.train.local import train_local

    folder = build_tiny("sd3", tmp_path / "sd3")
    out = train(_cfg(folder, tmp_path / "ray"))
    assert out["metrics"]["weights_version"] == 2

    local_cfg = _cfg(folder, tmp_path / "local")
    torch.manual_seed(local_cfg.train.seed)
    model = load_model(local_cfg.model)
    _, history = train_local(local_cfg, model=model, learner=Learner(local_cfg, model.schedule()))
    client = MlflowClient(out["tracking_uri"])
    run = client.get_run(out["run_id"])
    keys = {k for h in history for k in h if not k.startswith(TRANSPORT)}
    assert {"plan/window_start", "plan/fixed_steps", "kl/sampled", "eval/reward"} <= keys
    for key in sorted(keys):
        ray_pts = {m.step: m.value for m in client.get_metric_history(out["run_id"], key) if m.step > 0}
        local_pts = {i + 1: h[key] for i, h in enumerate(history) if key in h}
        assert ray_pts.keys() == local_pts.keys(), key
        assert [ray_pts[i] for i in sorted(ray_pts)] == pytest.approx(
            [local_pts[i] for i in sorted(local_pts)], rel=1e-4, abs=1e-6), key
    p, t = run.data.params, run.data.tags
    assert p["coverage.fixed_steps"] == "[]" and p["coverage.windows"] == "5" and p["model.sampler"] == "flow"
    assert t["rlr.fixed_steps"] == "[]" and t["rlr.bias"].startswith("none")
    assert "flow_sde" in t["rlr.model"] and "window random" in t["rlr.model"]
