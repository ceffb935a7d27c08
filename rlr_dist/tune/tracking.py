"""MLflow for a sweep: one parent run, one nested run per trial (tag ``mlflow.parentRunId``).

The driver's callback creates a trial's run when Tune starts it, with the trial's resolved config as params
(logged once). What a trial reports goes in as metrics at its iteration; the space's numeric values too
(``config.<key>``), so PBT's perturbations show as curves instead of "param already logged" errors. The
pipeline runner's trials log their own metrics into that run (``rlr-dist train`` does).
"""
from __future__ import annotations

import time

from ray.tune import Callback

from rlr_dist.config import to_dict
from rlr_dist.pipeline.tracking import Tracker, flatten
from rlr_dist.tune.space import NUMERIC, point_overrides

TRIAL_TAG = "rlr.trial_id"


def find_run(client, parent_id: str, trial_id: str, wait_s: float = 0.0) -> str | None:
    """The nested run of ``trial_id`` under ``parent_id`` (waiting up to ``wait_s`` for it to appear)."""
    exp_id = client.get_run(parent_id).info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    deadline = time.time() + wait_s
    while True:
        runs = client.search_runs([exp_id], filter_string=flt, max_results=1)
        if runs or time.time() >= deadline:
            return runs[0].info.run_id if runs else None
        time.sleep(1.0)


def trial_status(result: dict) -> str:
    """completed, or stopped early (by the scheduler) when it ran fewer iterations than its config's."""
    done = result.get("training_iteration", 0)
    return "completed" if done >= result.get("target_iterations", done) else "stopped early"


class TrialRuns(Callback):
    """Nested MLflow runs of the trials (``log_results``: log what trials report; off for the pipeline
    runner, whose trials log themselves)."""

    def __init__(self, uri: str, parent_id: str, config: str, overrides: list[str], log_results: bool):
        self.uri, self.parent_id, self.config, self.overrides = uri, parent_id, config, overrides
        self.log_results, self.trackers = log_results, {}

    def _tracker(self, trial) -> Tracker:
        if trial.trial_id not in self.trackers:
            from mlflow.tracking import MlflowClient

            from rlr_dist.train.config import load_config

            client = MlflowClient(self.uri)
            run_id = find_run(client, self.parent_id, trial.trial_id)  # a resumed sweep's trial has one
            if run_id is None:
                exp_id = client.get_run(self.parent_id).info.experiment_id
                run_id = client.create_run(exp_id, run_name=str(trial), tags={
                    "mlflow.parentRunId": self.parent_id, TRIAL_TAG: trial.trial_id}).info.run_id
                cfg = load_config(self.config, self.overrides + point_overrides(trial.config))
                from mlflow.entities import Param

                items = [Param(k, v) for k, v in flatten(to_dict(cfg)).items()]
                for i in range(0, len(items), 100):
                    client.log_batch(run_id, params=items[i:i + 100])
            self.trackers[trial.trial_id] = Tracker(self.uri, run_id)
        return self.trackers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._tracker(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        values = {f"config/{k}": v for k, v in trial.config.items() if isinstance(v, NUMERIC)}
        if self.log_results:
            values.update({k: v for k, v in result.items() if "/" in k})
        self._tracker(trial).metrics(values, result["training_iteration"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        tracker = self._tracker(trial)
        tracker.client.set_tag(tracker.run_id, "rlr.status", trial_status(trial.last_result or {}))
        tracker.close("FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        tracker = self._tracker(trial)
        tracker.client.set_tag(tracker.run_id, "rlr.status", "error")
        tracker.close("FAILED")
