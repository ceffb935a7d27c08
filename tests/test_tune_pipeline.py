"""`rlr-dist tune` with the pipeline trial runner: each trial a full `rlr-dist train` (actor pools and a
DeepSpeed learner under Ray Train) nested in the Tune trial. Run through the CLI in its own process, so the
sweep starts (and stops) its own Ray cluster with the dashboard Ray Train needs."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train.iterations=2", "--train.samples_per_prompt=4", "--model.num_inference_steps=5",
        "--train.eval_every=2", "--train.eval_samples=8", "--cluster.samplers.count=1",
        "--cluster.learners.count=1", "--checkpoint.every=0"]


@pytest.mark.e2e
def test_pipeline_trials_nest_ray_train_in_tune(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "space": {"regulariser.beta": {"grid": [0.1]}}, "scheduler": {"name": "fifo"},
        "trial_runner": "pipeline", "cpus_per_trial": 0.5, "num_cpus": 3, "output_dir": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "rlr_dist.cli", "tune", str(ROOT / "jobs/configs/digits.yaml"),
                           "--sweep", str(sweep), *TINY], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[iter 2/2]" in proc.stdout + proc.stderr  # the nested pipeline's own progress lines

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["iterations"] == "2"
    assert 0.0 <= float(rows[0]["eval/heldout"]) <= 1.0 and float(rows[0]["kl/sampled"]) > 0
    trial = out / "trials" / rows[0]["trial"]
    assert (trial / "model").is_dir() and (trial / "config.yaml").is_file()  # the nested run's export and config
    assert yaml.safe_load((trial / "config.yaml").read_text())["regulariser"]["beta"] == 0.1

    # the nested training run logged into the trial's MLflow run, under the sweep's parent run
    import json

    parent = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(parent["tracking_uri"])
    exp = client.get_run(parent["run_id"]).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward/mean")] == [1, 2]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval/heldout")] == [0, 2]
