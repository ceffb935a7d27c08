"""`ray job submit` against a real head: start it, submit the digits job with the Job Submission API, wait for
SUCCEEDED, check its MLflow run, stop the head."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlr_dist.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")



@pytest.fixture
def ray_head(request):
    """A `ray start --head` cluster with 4 CPUs; its dashboard URL. In its own temp folder, unless the test is
    parametrised with ``default_temp=True`` (Ray's /tmp/ray, where `ray start` leaves the address that a plain
    ``ray.init()`` on this machine then joins)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    default_temp = getattr(request, "param", {}).get("default_temp", False)
    temp = None if default_temp else tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths <= 107 bytes
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=4", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--disable-usage-stats", *([f"--temp-dir={temp}"] if temp else [])],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.e2e
def test_digits_job_succeeds_and_is_tracked(ray_head, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    client = JobSubmissionClient(ray_head)
    out = tmp_path / "job"
    entry = (f"{sys.executable} -m rlr_dist.cli train {ROOT / 'jobs/configs/digits.yaml'} --train.iterations=2 "
             f"--train.eval_every=2 --train.eval_samples=8 --train.samples_per_prompt=4 --model.num_inference_steps=6 "
             f"--checkpoint.every=2 --output_dir={out} --export=null")
    job = client.submit_job(entrypoint=entry, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    deadline = time.time() + 600
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(3)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "[iter 2/2]" in logs and "[rlr-dist] done" in logs
    import json

    run = json.loads((out / "run.json").read_text())
    mlflow = MlflowClient(run["tracking_uri"])
    assert mlflow.get_run(run["run_id"]).info.status == "FINISHED"
    assert [m.step for m in mlflow.get_metric_history(run["run_id"], "reward/mean")] == [1, 2]
    assert [m.step for m in mlflow.get_metric_history(run["run_id"], "eval/heldout")] == [0, 2]
    # what a person sees first: description and headline tags, model-training experiment, no broken Default
    info = mlflow.get_run(run["run_id"])
    tags = info.data.tags
    assert tags["rlr.estimator"].startswith("rlr (h=2") and tags["rlr.reward"] == "digit_logprob (target=3)"
    assert tags["rlr.regulariser"] == "kl_exact (beta=0.2)" and tags["rlr.model"].startswith("toy:digits (full")
    assert "Fine-tuning toy:digits" in tags["mlflow.note.content"]
    exp = mlflow.get_experiment(info.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert [e.name for e in mlflow.search_experiments()] == ["rlr-dist"]  # the empty "Default" is gone
    metrics = info.data.metrics
    assert {"loss/total", "loss/zo", "loss/fo", "loss/ho", "step_loss/zo_03"} <= set(metrics)  # padded to 2 digits
    assert not any(k.startswith("loss/zo:") for k in metrics)

    _ui_prints_the_run_link_and_stops_its_server(out, run)


def _ui_prints_the_run_link_and_stops_its_server(out: Path, run: dict) -> None:
    """``rlr-dist ui``: prints the direct link to the run (model-training view); SIGTERM stops its server too."""
    import signal
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rlr_dist.cli", "ui", "--output-dir", str(out), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        link = None
        deadline = time.time() + 120
        while time.time() < deadline and link is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if "/runs/" in line:
                link = line.split(": ", 1)[1].strip()
        assert link == (f"http://127.0.0.1:{port}/#/experiments/{MlflowClientExp(run)}/runs/{run['run_id']}"
                        "?workflowType=machine_learning"), link
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).status == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        with pytest.raises(OSError):  # nothing listens any more: the server went with it
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()


def MlflowClientExp(run: dict) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).info.experiment_id


@pytest.mark.parametrize("ray_head", [{"default_temp": True}], indirect=True)
def test_a_run_without_an_address_starts_its_own_cluster_beside_a_running_one(ray_head):
    """``cluster.address`` unset means a local cluster of the run's own, also while a ``ray start`` cluster runs
    on this machine (Ray's own default joins that one, and then refuses the run's ``num_cpus``); inside a job
    (``RAY_ADDRESS`` set, as ``ray job submit`` does) the run joins the job's cluster."""
    code = ("import ray\nfrom rlr_dist.pipeline.run import init_ray\nfrom rlr_dist.train.config import load_config\n"
            "init_ray(load_config(None, ['--cluster.num_cpus=3']))\n"
            "print('CPUS', int(ray.cluster_resources()['CPU']))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "CPUS 3" in alone.stdout, alone.stdout  # the head started by the fixture has 4
    joined = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, "RAY_ADDRESS": "auto"})
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "CPUS 4" in joined.stdout, joined.stdout
