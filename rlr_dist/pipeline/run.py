"""The driver: validate, start (or join) Ray, create the actor pools, run the learners, report.

It holds actor handles and small metrics only; every tensor moves between actors as object refs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rlr_dist.config import ConfigError, to_dict
from rlr_dist.train.config import TrainConfig, dump

RUN_FILE = "run.json"


def preflight(cfg: TrainConfig) -> None:
    """Checks that need files, done before any Ray resource is taken (errors name the field)."""
    from rlr_dist.models import ModelError, build_schedule, detect_layout, read_scheduler_config, resolve_model_folder

    cfg.data.load_prompts()
    try:
        folder = resolve_model_folder(cfg.model.path)
        detect_layout(folder)
        schedule = build_schedule(read_scheduler_config(folder), cfg.model)
    except ModelError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("model.") else f"model.path: {msg}") from None
    cfg.check_schedule(schedule)
    if cfg.train.eval_every and cfg.eval_reward is None:
        print("[rlr-dist] note: no eval_reward configured; evaluation reports the training reward only", flush=True)


FORWARDED_ENV = ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "RLR_DIST_CACHE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI",
                 "RLR_DIST_CRASH_SAMPLER")


def _env() -> dict[str, str]:
    """Environment the actors need from the driver's (S3 endpoint and keys are passed, never logged)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # progress lines once, not twice
    return env


def init_ray(cfg: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    c = cfg.cluster
    if c.address is not None:
        ray.init(address=c.address, runtime_env={"env_vars": _env()})
        return
    if os.environ.get("RAY_ADDRESS"):  # inside a `ray job submit` job: join, keeping the job's runtime env
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    need = sum(r.count * r.num_cpus for r in (c.samplers, c.rewards, c.learners))
    # The dashboard also serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(num_cpus=c.num_cpus or max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=True,
             dashboard_host="127.0.0.1", runtime_env={"env_vars": _env()})


def _pool(cls, cfg_dict: dict, res, *args) -> list:
    import ray

    actor = ray.remote(cls)
    return [actor.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=res.max_restarts,
                          max_task_retries=0, runtime_env={"env_vars": _env()}).remote(cfg_dict, i, *args)
            for i in range(res.count)]


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or, with ``resume``, continue) the training run ``cfg`` describes; returns final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rlr_dist import storage
    from rlr_dist.pipeline.learner import learner_loop
    from rlr_dist.pipeline.tracking import Tracker, flatten, headline, start_run, tracking_uri
    from rlr_dist.pipeline.workers import RewardWorker, SamplerWorker, WeightStore

    preflight(cfg)
    out = Path(cfg.output_dir).resolve()
    run_file = out / RUN_FILE
    uri = tracking_uri(cfg.tracking.uri, out)
    if resume:
        if not run_file.is_file():
            raise ConfigError(f"output_dir: --resume needs {run_file}, written by an earlier run")
        run = json.loads(run_file.read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        name = cfg.tracking.run_name or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags, description = headline(cfg)
        run_id = start_run(uri, cfg.tracking.experiment, name, out / "mlartifacts", flatten(to_dict(cfg)), tags,
                           description)
        run = {"name": name, "run_id": run_id, "tracking_uri": uri}
        run_file.write_text(json.dumps(run, indent=1))
    (out / "config.yaml").write_text(dump(cfg))
    ckpt_root = cfg.checkpoint.dir or str(out / "checkpoints")
    if not storage.is_s3(ckpt_root):
        ckpt_root = str(Path(ckpt_root).resolve())

    init_ray(cfg)
    cfg_dict = to_dict(cfg)
    t0 = time.perf_counter()
    store = ray.remote(WeightStore).options(num_cpus=0, max_restarts=-1).remote()
    samplers = _pool(SamplerWorker, cfg_dict, cfg.cluster.samplers, store)
    rewards = _pool(RewardWorker, cfg_dict, cfg.cluster.rewards)
    ray.get([a.get_version.remote() for a in samplers] + [r.__ray_ready__.remote() for r in rewards])
    L = cfg.cluster.learners
    resources = {"CPU": L.num_cpus, **({"GPU": L.num_gpus} if L.num_gpus else {})}
    trainer = TorchTrainer(
        learner_loop,
        train_loop_config={"cfg": cfg_dict, "samplers": samplers, "rewards": rewards, "store": store, "run_id": run["run_id"],
                           "tracking_uri": run["tracking_uri"], "output_dir": str(out)},
        scaling_config=ScalingConfig(num_workers=L.count, use_gpu=L.num_gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=run["name"], storage_path=ckpt_root,
                             failure_config=FailureConfig(max_failures=L.max_restarts),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
    )
    tracker = Tracker(run["tracking_uri"], run["run_id"])
    try:
        result = trainer.fit()
    except Exception:
        tracker.close("FAILED")
        raise
    finally:
        for a in samplers + rewards + [store]:
            ray.kill(a)
    tracker.artifact(out / "config.yaml")
    curve = _reward_curve(tracker, out)
    if curve is not None:
        tracker.artifact(curve)
    tracker.close()
    metrics = dict(result.metrics or {})
    before = {}
    for key in ("eval/reward", "eval/heldout"):
        pts = [m for m in tracker.client.get_metric_history(run["run_id"], key) if m.step == 0]
        if pts:
            before[key] = pts[0].value
    return {"metrics": metrics, "before": before, "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "run_id": run["run_id"], "tracking_uri": run["tracking_uri"], "seconds": time.perf_counter() - t0,
            "output_dir": str(out)}


def _reward_curve(tracker, out: Path) -> Path | None:
    from rlr_dist.pipeline.pictures import reward_curve

    hist = {}
    for key in ("reward/mean", "eval/reward", "eval/heldout"):
        pts = tracker.client.get_metric_history(tracker.run_id, key)
        if pts:
            hist[key] = sorted((m.step, m.value) for m in pts)
    return reward_curve(hist, out / "reward_curve.png", out.name) if hist else None
