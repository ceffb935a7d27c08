"""`rlr-dist tune`: sweep-file validation before Ray, and a real 4-trial ASHA sweep of the tiny digits model
(local trial runner) with nested MLflow runs, results table, Pareto plot, best config and resume."""
import json
from pathlib import Path

import pytest
import yaml

from rlr_dist.config import ConfigError

CONFIG = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits.yaml")
TINY = ["--train.iterations=4", "--train.samples_per_prompt=4", "--model.num_inference_steps=5",
        "--train.eval_every=2", "--train.eval_samples=8"]


def _sweep(tmp_path, **data) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **data}))
    return str(path)


@pytest.mark.parametrize("space, extra, message", [
    ({"estimator.hh": {"grid": [1, 2]}}, {}, r"sweep\.space\.estimator\.hh: unknown parameter"),
    ({"train.iterationz": {"choice": [2]}}, {}, r"sweep\.space\.train\.iterationz: unknown field"),
    ({"regulariser.beta": {"loguniform": [0, 0.1]}}, {}, r"sweep\.space\.regulariser\.beta: loguniform low must be > 0"),
    ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, {}, r"sweep\.space\.optim\.lr: uniform low must be < high"),
    ({"optim.lr": {"choice": [-1.0]}}, {}, r"sweep\.space\.optim\.lr: must be > 0"),
    ({"estimator.h": {"between": [1, 4]}}, {}, r"sweep\.space\.estimator\.h: expected one search form"),
    ({"regulariser": {"choice": [{"name": "nope"}]}}, {}, r"sweep\.space\.regulariser: .*name"),
    ({"estimator.h": {"grid": [1, 2]}}, {"metric": "eval/nothing"}, r"sweep\.metric"),
    ({"regulariser": {"choice": [{"name": "none"}]}}, {"scheduler": {"name": "pbt"}}, r"pbt needs a numeric key"),
])
def test_bad_sweep_file_fails_naming_the_key_before_ray(tmp_path, monkeypatch, space, extra, message):
    import ray

    from rlr_dist.tune.runner import tune

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(ConfigError, match=message):
        tune(CONFIG, _sweep(tmp_path, space=space, **extra), TINY)
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the sweeps (the runner leaves a running Ray alone; two inits in one process do not
    shut down cleanly)."""
    import ray

    from rlr_dist.pipeline.run import _env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": _env()})
    yield
    ray.shutdown()


@pytest.mark.e2e
def test_asha_sweep_tracks_nested_runs_reports_and_resumes(ray_cluster, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from rlr_dist.train.config import load_config
    from rlr_dist.tune.runner import tune

    lrs = [1e-7, 1e-6, 1e-2, 3e-2]  # KL to the reference grows with lr: ASHA (min KL) must stop the last ones
    sweep = _sweep(tmp_path, space={"optim.lr": {"grid": lrs}, "regulariser.beta": {"loguniform": [1e-3, 1e-1]}},
                   metric="kl/sampled", mode="min",
                   scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    out = tune(CONFIG, sweep, TINY)
    table = out["table"]
    assert len(table) == 4 and sorted(r["optim.lr"] for r in table) == lrs
    status = {r["trial"]: r["status"] for r in table}
    assert "error" not in status.values()
    early = [r for r in table if r["status"] == "stopped early"]
    assert early and all(r["iterations"] < 4 for r in early)
    assert any(r["status"] == "completed" and r["iterations"] == 4 for r in table)
    lr_status = {r["optim.lr"]: r["status"] for r in table}
    assert lr_status[1e-7] == "completed"  # the lowest KL at every rung
    assert lr_status[1e-2] == lr_status[3e-2] == "stopped early"  # far above the trials that reached the rungs
    for r in table:  # every objective reported
        for key in ("eval/heldout", "kl/sampled", "eval/pairwise_l2", "eval/class_entropy", "time/trial",
                    "memory/peak_rss_mb", "memory/peak_activation_mb"):
            assert isinstance(r[key], float), (key, r)
        assert r["memory/peak_rss_mb"] > 50 and r["eval/pairwise_l2"] > 0

    # MLflow: a parent run, one nested run per trial with its metric curves and how it ended
    client = MlflowClient(out["tracking_uri"])
    parent = client.get_run(out["run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{out['run_id']}'")
    assert len(runs) == 4
    for run in runs:
        trial = run.data.tags["rlr.trial_id"]
        assert run.info.status == "FINISHED" and run.data.tags["rlr.status"] == status[trial]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "kl/sampled")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == next(
            r["iterations"] for r in table if r["trial"] == trial)
        assert client.get_metric_history(run.info.run_id, "eval/heldout")
        assert float(run.data.params["optim.lr"]) in lrs
    assert {a.path for a in client.list_artifacts(out["run_id"])} >= {"results.csv", "results.md", "pareto.png",
                                                                       "best.yaml"}
    assert parent.info.status == "FINISHED"

    # outputs: table, plot, best config ready for `rlr-dist train`
    csv_text, md_text = (Path(p).read_text() for p in out["results"])
    assert csv_text.count("\n") == 5 and "stopped early" in md_text and md_text.startswith("| trial | status")
    assert Image.open(out["plot"]).size[0] > 100
    best = load_config(out["best_config"])
    assert best.optim.lr == 1e-7 and best.train.iterations == 4

    printed = capsys.readouterr().out
    assert printed.count("[tune] trial ") == 4 and "4/4 done" in printed and "ETA" in printed

    # resume: the finished sweep is restored, not re-run (same trials, no new MLflow runs)
    again = tune(CONFIG, sweep, TINY, resume=True)
    assert {r["trial"]: r["status"] for r in again["table"]} == status
    assert again["run_id"] == out["run_id"]
    assert len(client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out['run_id']}'")) == 4
    with pytest.raises(ConfigError, match="--resume"):
        tune(CONFIG, sweep, TINY)  # a second sweep into the same output_dir
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["run_id"] == out["run_id"]


def test_shipped_sweep_file_validates():
    from rlr_dist.tune.space import load_sweep

    sweep, base = load_sweep(CONFIG, str(Path(CONFIG).parent / "sweep-digits.yaml"), [])
    assert {"estimator.h", "optim.lr", "estimator.zo", "regulariser"} <= set(sweep.space)
    assert sweep.n_trials() == 6 and base.estimator.name == "rlr"


PLUGIN = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "plugin-example.yaml")


@pytest.mark.e2e
def test_components_from_outside_the_package_plan_train_and_sweep_unchanged(ray_cluster, tmp_path, capsys):
    """An estimator and a reward defined in jobs/plugins/example.py (not in rlr_dist) and named by
    module:Class: the planner, the Ray pipeline (samplers, reward actor, DeepSpeed learner) and a Tune sweep
    take them as they take the built-in ones."""
    from rlr_dist import planner
    from rlr_dist.cli import main as cli
    from rlr_dist.estimators import ESTIMATORS
    from rlr_dist.pipeline.run import train
    from rlr_dist.rewards import REWARDS
    from rlr_dist.train.config import load_config
    from rlr_dist.tune.runner import tune

    assert "jobs.plugins.example:StridedLR" not in ESTIMATORS.names()  # not registered anywhere in the package
    # the planner asks the classes; no estimator or reward name is written in it
    source = Path(planner.__file__).read_text()
    for name in ESTIMATORS.names() + REWARDS.names():
        assert f'"{name}"' not in source and f"'{name}'" not in source, name
    assert cli(["plan", PLUGIN, "--gpu", "a10g-24gb"]) == 0
    assert "5 calls back-propagated" in capsys.readouterr().out  # StridedLR: T=10 steps / stride 2

    small = ["--train.iterations=2", "--train.samples_per_prompt=4", "--model.num_inference_steps=4",
             "--train.eval_every=2", "--train.eval_samples=4"]
    out = train(load_config(PLUGIN, small + [f"--output_dir={tmp_path / 'run'}"]))
    assert out["metrics"]["weights_version"] == 2 and "eval/heldout" in out["metrics"]

    sweep = _sweep(tmp_path, space={"estimator.stride": {"grid": [1, 2]}}, metric="eval/heldout", mode="max",
                   scheduler={"name": "fifo"})
    res = tune(PLUGIN, sweep, small)
    assert sorted(r["estimator.stride"] for r in res["table"]) == [1, 2]
    assert all(r["status"] == "completed" and r["iterations"] == 2 for r in res["table"])
