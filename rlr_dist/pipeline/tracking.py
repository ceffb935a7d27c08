"""MLflow: the resolved config as params, metrics per iteration, pictures and the config as artifacts.

The default store is a sqlite file in the run's output folder (MLflow 3.17 refuses a plain file store);
``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` point elsewhere (e.g. an MLflow server on the cluster).

What a person sees first: a run description and headline tags (estimator, regulariser, reward, model, git
commit) on the run page; metric names grouped by prefix (``reward/``, ``eval/``, ``loss/``, ``time/``; the
per-step series under ``step_loss/`` and ``step_gnorm/``), which MLflow shows as collapsible chart sections.
Experiments are marked as model training, so MLflow 3 opens their runs, not its GenAI traces page.
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


def headline(cfg, coverage: dict | None = None) -> tuple[dict[str, str], str]:
    """Tags and a one-paragraph description of a training config: what a person looks for first (with the
    estimator's ``coverage`` on the chain: fixed steps and the bias statement, ``TrainConfig.coverage``)."""
    def short(spec) -> str:
        d = spec.to_dict()
        name = d.pop("name")
        d.pop("on_nonfinite", None)
        return name + (" (" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")" if d else "")

    tags = {"estimator": short(cfg.estimator), "regulariser": short(cfg.regulariser), "reward": short(cfg.reward),
            "model": f"{cfg.model.path} ({cfg.model.finetune}, {cfg.model.num_inference_steps} {cfg.model.sampler} steps"
                     + (f", {cfg.model.flow.transition} eta {cfg.model.eta:g}, window {cfg.model.flow.window.kind}"
                        if cfg.model.sampler == "flow" else "") + ")"}
    if cfg.eval_reward is not None:
        tags["eval_reward"] = short(cfg.eval_reward)
    if coverage is not None:
        tags["fixed_steps"] = str(coverage["fixed_steps"])
        tags["bias"] = coverage["bias"]
    t = cfg.train
    text = (f"Fine-tuning {tags['model']} with estimator {tags['estimator']} and regulariser {tags['regulariser']} "
            f"toward reward {tags['reward']}" + (f"; evaluated by {tags['eval_reward']}" if "eval_reward" in tags else "")
            + f". {t.iterations} iterations of {t.batch_size} samples, lr {cfg.optim.lr:g}; "
            f"{cfg.cluster.samplers.count} sampler(s), {cfg.cluster.rewards.count} reward actor(s), "
            f"{cfg.cluster.learners.count} learner(s)." + (f" Estimator bias: {coverage['bias']}." if coverage else ""))
    return {f"rlr.{k}": v for k, v in tags.items()}, text


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3: open the runs view


def start_run(uri: str, experiment: str, run_name: str, artifact_dir: Path, params: dict[str, str],
              tags: dict[str, str] | None = None, description: str | None = None) -> str:
    """Create the experiment (artifacts under ``artifact_dir`` unless it exists) and a run with ``params``,
    headline ``tags`` and a ``description``; returns its id."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    _drop_empty_default(client)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=Path(artifact_dir).resolve().as_uri(),
                                          tags=EXPERIMENT_KIND)
    else:
        exp_id = exp.experiment_id
    all_tags = {**(tags or {}), **({"mlflow.note.content": description} if description else {})}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def _drop_empty_default(client) -> None:
    """A new store's "Default" experiment points at ``./mlruns`` of wherever it was created — usually a
    folder that does not exist. Delete it while it holds no run, so the UI does not list an empty, broken one."""
    from urllib.parse import urlparse

    try:
        default = client.get_experiment("0")
    except Exception:  # noqa: BLE001 - no default experiment in this store
        return
    if default is None or default.lifecycle_stage != "active" or client.search_runs(["0"], max_results=1):
        return
    loc = urlparse(default.artifact_location)
    if loc.scheme in ("", "file") and not Path(loc.path).exists():
        client.delete_experiment("0")


def git_commit() -> str | None:
    """The commit of the code being run (of the current folder's repository), if it is one."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_link(ui: str, uri: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ``ui`` (model-training view)."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{ui.rstrip('/')}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


class Tracker:
    """Logs to one existing run (used by learner rank 0 and the driver).

    ``once``: one point per (metric, step) however often the learners restart or the run resumes — the
    points the run already holds are read at start and never logged again (MLflow cannot overwrite a point;
    the first one stands, and after a restart from a checkpoint the iterations are redone identically)."""

    def __init__(self, uri: str, run_id: str, once: bool = False):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id
        self.logged: set[tuple[str, int]] | None = None
        if once:
            self.logged = {(key, m.step) for key in self.client.get_run(run_id).data.metrics
                           for m in self.client.get_metric_history(run_id, key)}

    def metrics(self, values: dict[str, float], step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in values.items()
              if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if self.logged is not None:
            ms = [m for m in ms if (m.key, step) not in self.logged]
            self.logged |= {(m.key, step) for m in ms}
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
