"""The sweep driver: validate, MLflow parent run, Ray Tune (or its restore), then table, plot, best config."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ray.tune import Callback

from rlr_dist.config import ConfigError, to_dict
from rlr_dist.tune.space import SweepConfig, load_sweep, mutations, tune_space
from rlr_dist.tune.tracking import TrialRuns, trial_status

SWEEP_FILE = "sweep.json"


class Progress(Callback):
    """A line per finished trial: how it ended, its metric, the best so far, trials done, ETA."""

    def __init__(self, total: int, metric: str, mode: str):
        self.total, self.metric, self.sign = total, metric, 1 if mode == "max" else -1

    def setup(self, **info):
        self.t0 = time.time()

    def _line(self, trials, trial, how: str) -> None:
        done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id}
        scored = [t for t in trials if t.trial_id in done and self.metric in (t.last_result or {})]
        best = max(scored, key=lambda t: self.sign * t.last_result[self.metric], default=None)
        last = trial.last_result or {}
        eta = (time.time() - self.t0) / len(done) * max(self.total - len(done), 0)
        value = f"{self.metric} {last[self.metric]:.4g}" if self.metric in last else f"no {self.metric}"
        best_s = f"best {best.last_result[self.metric]:.4g} ({best.trial_id})" if best else "no best yet"
        print(f"[tune] trial {trial.trial_id} {how} after {last.get('training_iteration', 0)} iterations: {value} "
              f"| {len(done)}/{self.total} done | {best_s} | ETA {eta:.0f} s", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, trial, trial_status(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, "failed")


def _scheduler(sweep: SweepConfig, iterations: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=s.max_t or iterations,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations(sweep), quantile_fraction=s.quantile_fraction)
    return FIFOScheduler()


def _search(sweep: SweepConfig):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed)


def tune(config: str, sweep_path: str, overrides: list[str], resume: bool = False) -> dict:
    """Run (or, with ``resume``, continue) the sweep; returns the table, best point and output paths."""
    import ray
    from ray import tune as rt

    from rlr_dist.pipeline.run import start_or_join
    from rlr_dist.pipeline.tracking import Tracker, flatten, start_run, tracking_uri
    from rlr_dist.tune import report
    from rlr_dist.tune.trial import local_trial, pipeline_trial

    config = str(Path(config).resolve())
    sweep, base = load_sweep(config, sweep_path, overrides)  # every error before Ray starts
    out = Path(sweep.output_dir or f"{base.output_dir}-tune").resolve()
    uri = tracking_uri(base.tracking.uri, out)
    state_file, tune_dir = out / SWEEP_FILE, out / "ray" / "tune"
    if resume:
        if not state_file.is_file():
            raise ConfigError(f"sweep.output_dir: --resume needs {state_file}, written by an earlier sweep")
        parent = json.loads(state_file.read_text())["run_id"]
    else:
        if state_file.is_file():
            raise ConfigError(f"sweep.output_dir: {out} holds a sweep already; --resume continues it")
        out.mkdir(parents=True, exist_ok=True)
        parent = start_run(uri, base.tracking.experiment, f"tune-{out.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                           out / "mlartifacts", flatten({"sweep": to_dict(sweep), "config": config,
                                                         "overrides": " ".join(overrides)}))
        state_file.write_text(json.dumps({"run_id": parent, "tracking_uri": uri}, indent=1))
        shutil.copy(sweep_path, out / "sweep.yaml")

    started = not ray.is_initialized()
    if started:
        pipeline = sweep.trial_runner == "pipeline"  # Ray Train's placement-group cleaner needs the dashboard
        start_or_join(sweep.num_cpus or os.cpu_count(), dashboard=pipeline)
    if sweep.trial_runner == "local":
        fn = rt.with_parameters(local_trial, config=config, overrides=overrides,
                                checkpoint_every=sweep.checkpoint_every)
    else:
        fn = rt.with_parameters(pipeline_trial, config=config, overrides=overrides, uri=uri, parent_id=parent,
                                root=str(out))
    resources = {"cpu": sweep.cpus_per_trial}
    if sweep.trial_runner == "pipeline":  # Tune places the nested run's actors in the trial's placement group
        c = base.cluster  # (the learners get their own, from Ray Train)
        actors = [r for r in (c.samplers, c.rewards) for _ in range(r.count)]
        resources = rt.PlacementGroupFactory([{"CPU": sweep.cpus_per_trial}] + [
            {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})} for r in actors])
    trainable = rt.with_resources(fn, resources)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # small, frequent
    t0 = time.perf_counter()
    try:
        if resume and rt.Tuner.can_restore(str(tune_dir)):
            tuner = rt.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            keep = None if sweep.scheduler.name == "pbt" else 2  # PBT copies other trials' older checkpoints
            callbacks = [TrialRuns(uri, parent, config, overrides, log_results=sweep.trial_runner == "local"),
                         Progress(sweep.n_trials(), sweep.metric, sweep.mode)]
            tuner = rt.Tuner(trainable, param_space=tune_space(sweep), tune_config=rt.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples, search_alg=_search(sweep),
                scheduler=_scheduler(sweep, base.train.iterations), max_concurrent_trials=sweep.max_concurrent or None),
                run_config=rt.RunConfig(name=tune_dir.name, storage_path=str(tune_dir.parent), callbacks=callbacks,
                                        checkpoint_config=rt.CheckpointConfig(num_to_keep=keep), verbose=0))
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    table = report.rows(grid, sweep)
    csv_path, md_path = report.write_table(table, out)
    plot = report.pareto_plot(table, out / "pareto.png", f"{out.name}: held-out reward vs KL")
    best = report.best_config(grid, sweep, config, overrides, out / "best.yaml")
    tracker = Tracker(uri, parent)
    for path in (csv_path, md_path, plot) + ((best[1],) if best else ()):
        tracker.artifact(path)
    done = [r for r in table if r["status"] != "error"]
    tracker.metrics({"trials": len(table), "trials_failed": len(table) - len(done),
                     "trials_stopped_early": sum(r["status"] == "stopped early" for r in table)}, 0)
    tracker.close("FINISHED" if done else "FAILED")
    return {"table": table, "best": best[0] if best else None, "best_config": best[1] if best else None,
            "results": (csv_path, md_path), "plot": plot, "run_id": parent, "tracking_uri": uri,
            "output_dir": str(out), "seconds": seconds}
