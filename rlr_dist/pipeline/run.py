"""The driver: validate, start (or join) Ray, create the actor pools, run the learners, report.

It holds actor handles and small metrics only; every tensor moves between actors as object refs.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from rlr_dist.config import ConfigError, to_dict
from rlr_dist.train.config import TrainConfig, dump

RUN_FILE = "run.json"


class ClusterError(ConfigError):
    """The run asks for more than the Ray cluster has (or can get in time); the message says what is missing."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM ended the run; the MLflow run is marked KILLED and ``--resume`` continues it."""


def preflight(cfg: TrainConfig, resume: bool = False) -> dict:
    """Every check that can be made before anything is written or any Ray resource is taken (errors name the
    field): prompts, the model folder and its schedule against the estimator (every window a flow run can
    draw), every component's parameters (already checked when the config was read), and that the outputs can
    be written — local folders, or an ``s3://`` bucket that answers within seconds. Returns the estimator's
    coverage on the chain (:meth:`TrainConfig.coverage`: fixed steps and the bias statement)."""
    from rlr_dist import storage
    from rlr_dist.models import ModelError, detect_layout, folder_schedule, resolve_model_folder

    cfg.data.load_prompts()
    try:
        folder = resolve_model_folder(cfg.model.path)
        detect_layout(folder)
        schedule = folder_schedule(folder, cfg.model)
    except (ModelError, storage.StorageError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("model.") else f"model.path: {msg}") from None
    coverage = cfg.check_schedule(schedule)
    for spec in (cfg.reward, cfg.eval_reward):  # the files rewards read: there, or their bucket answers
        for field, value in ([] if spec is None else spec.path_params()):
            try:
                storage.check_readable(value, field)
            except storage.StorageError as e:
                raise ConfigError(str(e)) from None
    outputs = [("output_dir", cfg.output_dir), ("checkpoint.dir", cfg.checkpoint.dir)]
    if cfg.export and storage.is_s3(cfg.export):
        outputs.append(("export", cfg.export))
    elif cfg.export:
        outputs.append(("export", str(Path(cfg.export).parent)))
    for field, where in outputs:
        if where is None:
            continue
        try:
            storage.check_writable(where, field)
        except storage.StorageError as e:
            raise ConfigError(str(e)) from None
    out = Path(cfg.output_dir)
    if resume and not (out / RUN_FILE).is_file():
        raise ConfigError(f"output_dir: --resume needs {out / RUN_FILE}, written by an earlier run")
    if cfg.train.eval_every and cfg.eval_reward is None:
        print("[rlr-dist] note: no eval_reward configured; evaluation reports the training reward only", flush=True)
    if coverage["fixed_steps"]:
        print(f"[rlr-dist] note: estimator bias: {coverage['bias']}", flush=True)
    return coverage


# What actors need from the driver's environment. Secrets are not in it: Ray writes runtime_env values to its
# logs, so credentials reach actors through the environment the nodes start with (a local cluster started
# by rlr-dist inherits the driver's; cloud nodes use instance roles / AWS_SHARED_CREDENTIALS_FILE).
FORWARDED_ENV = ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "RLR_DIST_CACHE", "AWS_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                 "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION", "MLFLOW_TRACKING_URI",
                 "RLR_DIST_CRASH", "RLR_DIST_CRASH_DIR")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def _env() -> dict[str, str]:
    """Environment the actors need from the driver's (no credentials: see FORWARDED_ENV)."""
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
    need = sum(r.count * r.num_cpus for r in (c.samplers, c.rewards, c.learners))
    start_or_join(c.num_cpus or max(os.cpu_count() or 1, int(need + 0.999)))


def start_or_join(num_cpus: int, dashboard: bool = True) -> None:
    """Join the cluster of the ``ray job submit`` job this runs in (``RAY_ADDRESS``, keeping the job's runtime
    env), else start a local cluster of this process's own with ``num_cpus``: ``address="local"``, since Ray's
    default joins a ``ray start`` cluster running on this machine (and then refuses ``num_cpus``). The dashboard
    also serves the state API that Ray Train's placement-group cleaner polls."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": _env()})


def demand(cfg: TrainConfig) -> list[tuple[str, dict[str, float]]]:
    """The resource bundles the run takes, one per actor and per learner (the learners' placement group)."""
    c = cfg.cluster
    out = []
    for role, r in (("sampler", c.samplers), ("reward", c.rewards), ("learner", c.learners)):
        need = {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {}), **r.resources}
        out += [(f"{role} {i}", need) for i in range(r.count)]
    return out


def _place(bundles: list[tuple[str, dict]], nodes: list[dict[str, float]]) -> list[str]:
    """First-fit-decreasing placement of ``bundles`` on the nodes' resources; the bundles that do not fit."""
    free = [dict(n) for n in nodes]
    left = []
    for name, need in sorted(bundles, key=lambda b: -sum(b[1].values())):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            left.append(name)
    return left


def _shortfall(bundles, nodes) -> str:
    total: dict[str, float] = {}
    for _, need in bundles:
        for k, v in need.items():
            total[k] = total.get(k, 0.0) + v
    have: dict[str, float] = {}
    for n in nodes:
        for k in total:
            have[k] = have.get(k, 0.0) + n.get(k, 0.0)
    return ", ".join(f"{k} {total[k]:g} needed, {have.get(k, 0):g} in the cluster" for k in sorted(total))


def check_fits(cfg: TrainConfig) -> bool:
    """Before any actor is created: the run's bundles must fit the cluster's nodes. If they never can, fail
    with one line saying what is missing — unless ``cluster.autoscale_timeout_s`` > 0, when the autoscaler is
    asked for them and awaited (visibly, up to that long). If they fit but other work holds the resources,
    wait up to ``cluster.wait_for_free_s``. Returns whether the autoscaler was asked (the request stands until
    :func:`release_request` withdraws it)."""
    import ray

    bundles = demand(cfg)
    c = cfg.cluster

    def nodes(kind: str) -> list[dict]:
        if kind == "total":
            return [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        from ray._private.state import available_resources_per_node

        return list(available_resources_per_node().values())

    t0, asked, last = time.time(), False, 0.0
    while _place(bundles, nodes("total")):
        missing = _place(bundles, nodes("total"))
        if c.autoscale_timeout_s <= 0:
            raise ClusterError(f"cluster: the run does not fit this Ray cluster ({_shortfall(bundles, nodes('total'))}; "
                               f"{len(missing)} of {len(bundles)} actors/learners have no node: {', '.join(missing[:4])}). "
                               "Lower cluster.*.count / num_cpus / num_gpus, add nodes, or for an autoscaling cluster "
                               "set cluster.autoscale_timeout_s")
        if not asked:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[b for _, b in bundles])
            asked = True
        if time.time() - t0 > c.autoscale_timeout_s:
            release_request()
            raise ClusterError(f"cluster: the autoscaler did not provide the run's resources within "
                               f"cluster.autoscale_timeout_s={c.autoscale_timeout_s:g} s ({_shortfall(bundles, nodes('total'))})")
        if time.time() - last > 10:
            print(f"[rlr-dist] waiting for the autoscaler ({time.time() - t0:.0f}/{c.autoscale_timeout_s:g} s): "
                  f"{_shortfall(bundles, nodes('total'))}", flush=True)
            last = time.time()
        time.sleep(2)
    if ray.get_runtime_context().get_placement_group_id() is not None:
        return asked  # inside a Tune trial: the actors take the trial's own placement group, reserved already
    t0 = time.time()
    while _place(bundles, nodes("available")):
        if time.time() - t0 > c.wait_for_free_s:
            raise ClusterError(f"cluster: the run fits this cluster but its resources stayed taken by other work for "
                               f"cluster.wait_for_free_s={c.wait_for_free_s:g} s ({_shortfall(bundles, nodes('available'))} free)")
        if time.time() - last > 10:
            print(f"[rlr-dist] waiting for resources other work holds ({time.time() - t0:.0f}/{c.wait_for_free_s:g} s)",
                  flush=True)
            last = time.time()
        time.sleep(2)
    return asked


def release_request() -> None:
    """Withdraw the run's standing request to the autoscaler, so its nodes can go once idle (a request made
    with ``request_resources`` otherwise keeps them up after the run)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def _pool(cls, cfg_dict: dict, res, *args) -> list:
    import ray

    actor = ray.remote(cls)
    return [actor.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.resources or None,
                          max_restarts=res.max_restarts, max_task_retries=0,
                          runtime_env={"env_vars": _env()}).remote(cfg_dict, i, *args)
            for i in range(res.count)]


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or, with ``resume``, continue) the training run ``cfg`` describes; returns final metrics.

    Relative paths in ``cfg`` are resolved against the current directory first (actors run elsewhere).
    Ctrl-C (or SIGTERM) raises :class:`Interrupted` after marking the MLflow run KILLED."""
    from rlr_dist import storage
    from rlr_dist.pipeline.tracking import flatten, headline, start_run, tracking_uri

    cfg = cfg.resolved(Path.cwd())
    coverage = preflight(cfg, resume)
    out = Path(cfg.output_dir)
    run_file = out / RUN_FILE
    uri = tracking_uri(cfg.tracking.uri, out)
    if resume:
        run = json.loads(run_file.read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        name = cfg.tracking.run_name or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags, description = headline(cfg, coverage)
        params = {**flatten(to_dict(cfg)), **flatten(coverage, "coverage.")}
        run_id = start_run(uri, cfg.tracking.experiment, name, out / "mlartifacts", params, tags, description)
        run = {"name": name, "run_id": run_id, "tracking_uri": uri}
        run_file.write_text(json.dumps(run, indent=1))
    (out / "config.yaml").write_text(dump(cfg))
    ckpt_root = cfg.checkpoint.dir or str(out / "checkpoints")
    if not storage.is_s3(ckpt_root):
        ckpt_root = str(Path(ckpt_root).resolve())

    init_ray(cfg)
    asked = check_fits(cfg)
    try:
        return _run(cfg, run, out, ckpt_root)
    finally:
        if asked:
            release_request()


def _run(cfg: TrainConfig, run: dict, out: Path, ckpt_root: str) -> dict:
    """Create the actor pools, run the learners under Ray Train, report (the part of :func:`train` that holds
    cluster resources)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rlr_dist.pipeline.learner import learner_loop
    from rlr_dist.pipeline.tracking import Tracker
    from rlr_dist.pipeline.workers import RewardWorker, SamplerWorker, WeightStore

    cfg_dict = to_dict(cfg)
    t0 = time.perf_counter()
    # The weight store (and the fault record it keeps) lives on the driver's node: a run never loses that one.
    # (hard: a soft affinity was seen to land it on a worker node, which a node loss then took with the record)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    store = ray.remote(WeightStore).options(num_cpus=0, max_restarts=-1, scheduling_strategy=here).remote()
    samplers = _pool(SamplerWorker, cfg_dict, cfg.cluster.samplers, store)
    rewards = _pool(RewardWorker, cfg_dict, cfg.cluster.rewards)
    ray.get([a.get_version.remote() for a in samplers] + [r.__ray_ready__.remote() for r in rewards])
    L = cfg.cluster.learners
    resources = {"CPU": L.num_cpus, **({"GPU": L.num_gpus} if L.num_gpus else {}), **L.resources}
    trainer = TorchTrainer(
        learner_loop,
        train_loop_config={"cfg": cfg_dict, "samplers": samplers, "rewards": rewards, "store": store, "run_id": run["run_id"],
                           "tracking_uri": run["tracking_uri"], "output_dir": str(out), "attempt": uuid.uuid4().hex,
                           "checkpoints": f"{ckpt_root.rstrip('/')}/{run['name']}",
                           "env": {k: os.environ[k] for k in ("RLR_DIST_CRASH", "RLR_DIST_CRASH_DIR") if k in os.environ}},
        scaling_config=ScalingConfig(num_workers=L.count, use_gpu=L.num_gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=run["name"], storage_path=ckpt_root,
                             failure_config=FailureConfig(max_failures=L.max_restarts),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
    )
    tracker = Tracker(run["tracking_uri"], run["run_id"])
    box: dict = {}

    def fit() -> None:  # off the main thread, so Ctrl-C reaches this driver (Ray Train would swallow it)
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
            box["error"] = e

    worker = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
        if "error" in box:
            raise box["error"]
        result = box["result"]
    except KeyboardInterrupt:
        tracker.close("KILLED")
        raise Interrupted(f"interrupted; the MLflow run {run['run_id']} is marked KILLED") from None
    except Exception:
        tracker.close("FAILED")
        raise
    finally:
        placement = _placement(store, out)
        for a in samplers + rewards + [store]:
            ray.kill(a)
    tracker.artifact(out / "config.yaml")
    if placement is not None:
        tracker.artifact(placement)
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
            "output_dir": str(out), "export": cfg.export}


PLACEMENT_FILE = "placement.json"


def _placement(store, out: Path) -> Path | None:
    """Write which node every role ran on (each actor incarnation, each learner-group start) with the nodes'
    resources to ``placement.json``; None if the record could not be read."""
    import ray

    from rlr_dist.pipeline.learner import STARTS_FILE

    try:
        actors, store_node = ray.get([store.record.remote(), store.node.remote()], timeout=30)
    except Exception as e:  # noqa: BLE001 - the record is a report; the run's own outcome is what matters
        print(f"[rlr-dist] note: no placement record ({type(e).__name__})", flush=True)
        return None
    starts = (out / STARTS_FILE).read_text().splitlines() if (out / STARTS_FILE).is_file() else []
    learners = [{"start": int(p[1]), "restored": p[2], "nodes": p[4].split(",")}
                for p in (line.split() for line in starts) if len(p) > 4]
    used = {inc.partition("@")[2] for _, inc in actors} | {n for s in learners for n in s["nodes"]}
    nodes = {n["NodeID"]: {"alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes() if n["NodeID"] in used}
    doc = {"actors": [{"actor": a, "incarnation": inc.partition("@")[0], "node": inc.partition("@")[2]}
                      for a, inc in actors], "learners": learners, "weight_store": store_node, "nodes": nodes}
    path = out / PLACEMENT_FILE
    path.write_text(json.dumps(doc, indent=1))
    return path


def _reward_curve(tracker, out: Path) -> Path | None:
    from rlr_dist.pipeline.pictures import reward_curve

    hist = {}
    for key in ("reward/mean", "eval/reward", "eval/heldout"):
        pts = tracker.client.get_metric_history(tracker.run_id, key)
        if pts:
            hist[key] = sorted((m.step, m.value) for m in pts)
    return reward_curve(hist, out / "reward_curve.png", out.name) if hist else None
