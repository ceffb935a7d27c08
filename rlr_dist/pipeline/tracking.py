"""MLflow: the resolved config as params, metrics per iteration, pictures and the config as artifacts.

The default store is a sqlite file in the run's output folder (MLflow 3.17 refuses a plain file store);
``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` point elsewhere (e.g. an MLflow server on the cluster).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def tracking_uri(configured: str | None, output_dir: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """``{"model.lora.rank": "8", ...}`` (MLflow params are strings of at most 6000 characters)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(d)[:6000]
    return out


def start_run(uri: str, experiment: str, run_name: str, artifact_dir: Path, params: dict[str, str]) -> str:
    """Create the experiment (artifacts under ``artifact_dir`` unless it exists) and a run; returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=Path(artifact_dir).resolve().as_uri())
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name)
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


class Tracker:
    """Logs to one existing run (used by learner rank 0 and the driver)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k.replace("/", "."), float(v), now, step) for k, v in values.items()
              if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
