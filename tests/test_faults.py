"""Faults and bad input on a real local Ray cluster (issue: nothing lost, nothing repeated, nothing leaked,
every error before Ray starts). The scenarios are those of `rlr-dist bench faults` (rlr_dist/bench/faults.py),
asserted here on a tiny model; docs/results/faults.md holds the bench's table."""
import json
from pathlib import Path

import pytest

from rlr_dist.bench import faults as F
from rlr_dist.config import ConfigError, build
from rlr_dist.models.tiny import build_tiny
from rlr_dist.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    import ray

    from rlr_dist.pipeline.run import _env

    ray.init(num_cpus=5, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": _env()})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = build_tiny("pixel", tmp_path_factory.mktemp("faults-model") / "pixel")
    return build(TrainConfig, {
        "model": {"path": str(model), "num_inference_steps": 4}, "estimator": {"name": "rlr", "h": 1},
        "reward": {"name": "brightness"}, "data": {"prompts": ["zero", "one"]},
        "train": {"iterations": 6, "prompts_per_iteration": 2, "samples_per_prompt": 2, "eval_every": 0},
        "cluster": {"samplers": {"count": 2, "num_cpus": 0.5}, "rewards": {"count": 1, "num_cpus": 0.5},
                    "learners": {"count": 1, "num_cpus": 0.5}},
        "optim": {"lr": 3e-3}, "checkpoint": {"every": 2, "keep": 3}, "output_dir": "unused"})


@pytest.fixture(scope="module")
def reference(base):
    """The undisturbed run's numbers, from the single-process loop: it does the Ray pipeline's exact work
    (tests/test_pipeline.py checks the two agree metric for metric)."""
    from rlr_dist.train.local import train_local

    _, hist = train_local(base)
    return {k: [(i + 1, h[k]) for i, h in enumerate(hist) if k in h] for k in F.SERIES}


@pytest.mark.e2e
def test_deaths_of_actors_and_a_learner_lose_nothing_and_repeat_nothing(ray_cluster, reference, base, tmp_path,
                                                                         monkeypatch):
    """A sampler killed at the weight sync (where the dead actor is first seen), the reward actor while
    scoring, and the learner after iteration 3 (last checkpoint at 2). Actor calls are re-run where the death
    is seen and never restart the learners; the lost learner makes Ray Train restart the group from the
    iteration-2 checkpoint and redo iteration 3. Every restart is counted, every metric is logged once per
    step, and the run's numbers are the undisturbed run's. The run is started from another directory with
    relative output paths, as `make demo` is: the model lands where the config says. Then the latest
    checkpoint is damaged and ``--resume`` refuses it and continues from the newest one that verifies."""
    from rlr_dist.cli import main as cli

    monkeypatch.chdir(tmp_path)  # learners run in Ray Train's own folder, actors in the repository's
    relative = ["--output_dir=runs/f", "--export=runs/f/model"]
    with F.crashes("sampler:1:2:sync,reward:0:4:score,learner:0:3:step", tmp_path / "markers"):
        out, _, err = F.run(F.with_overrides(base, relative))
    assert out is not None, err
    assert len(list((tmp_path / "markers").iterdir())) == 3  # all three really died
    m = out["metrics"]
    assert m["restarts/actors"] >= 2 and m["restarts/calls_rerun"] >= 2 and m["restarts/learners"] == 1
    starts = F.lineage(out["output_dir"])
    assert [s for _, s, _ in starts] == [0, 2] and starts[1][2].startswith("checkpoint_")  # restored at 2
    hist = F.history(out)
    assert F.duplicates(hist) == 0 and [s for s, _ in hist["reward/mean"]] == [1, 2, 3, 4, 5, 6]
    assert F.same_series(hist, reference)
    # relative paths resolved where the run was started
    assert out["output_dir"] == str(tmp_path / "runs" / "f") and out["export"] == str(tmp_path / "runs" / "f" / "model")
    assert (tmp_path / "runs" / "f" / "model" / "model_index.json").is_file()
    assert cli(["eval", "runs/f/model", "--reward", "brightness", "--params", "{}", "--n", "2"]) == 0

    newest = Path(out["checkpoint"]).name
    F.damage_latest(out, "truncate")  # a shard of iteration 6's checkpoint cut in half
    more, _, err = F.run(F.with_overrides(base, relative + ["--train.iterations=8"]), resume=True)
    assert more is not None, err
    _, s2, restored = F.lineage(tmp_path / "runs" / "f")[-1]
    assert s2 == 4 and restored not in (newest, starts[1][2])  # iteration 6 refused, iteration 4's used
    hist = F.history(more)
    assert F.duplicates(hist) == 0 and [s for s, _ in hist["reward/mean"]] == list(range(1, 9))


def test_a_checkpoint_without_a_manifest_is_refused_before_anything_is_read(tmp_path):
    from rlr_dist import storage
    from rlr_dist.pipeline import engine

    (tmp_path / "state.json").write_text(json.dumps({"iteration": 2}))  # what the loader used to accept
    with pytest.raises(storage.StorageError, match="no manifest.json"):
        engine.load(None, tmp_path)  # the engine is never touched


def test_a_run_the_cluster_cannot_hold_fails_before_taking_anything(ray_cluster, base, tmp_path):
    import time

    from rlr_dist.pipeline.run import ClusterError, check_fits

    big = F.with_overrides(base, ["--cluster.samplers.count=9", f"--output_dir={tmp_path}"])  # 4.5 + 1 CPUs > 5
    t0 = time.time()
    with pytest.raises(ClusterError, match=r"does not fit this Ray cluster \(CPU 5.5 needed, 5 in the cluster"):
        check_fits(big)
    assert time.time() - t0 < 5
    one_node = F.with_overrides(base, ["--cluster.learners.num_cpus=6", f"--output_dir={tmp_path}"])
    with pytest.raises(ClusterError, match="learner 0"):
        check_fits(one_node)  # no node has 6 CPUs, whatever the total
    wait = F.with_overrides(base, ["--cluster.samplers.count=9", "--cluster.autoscale_timeout_s=3"])
    t0 = time.time()
    with pytest.raises(ClusterError, match="autoscaler did not provide"):
        check_fits(wait)
    assert 3 <= time.time() - t0 < 15
    assert not ray_cluster.util.list_named_actors()  # nothing was created


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory):
    return F.bad_inputs(str(ROOT / "jobs/configs/digits.yaml"), tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("what, argv, field", F.BAD_INPUTS, ids=[b[0] for b in F.BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_field_before_ray_starts(bad_rows, what, argv, field):
    r = next(r for r in bad_rows if r["input"] == what)
    assert r["exit_code"] == 2 and r["lines"] == 1 and r["names_field"], r
    assert not r["ray_started"] and not r["wrote"] and r["seconds"] < 10, r


def test_a_config_that_sets_nothing_is_an_error(tmp_path):
    from rlr_dist.config import load_yaml

    (tmp_path / "braces.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="sets nothing"):
        load_yaml(tmp_path / "braces.yaml")


def test_zz_no_credential_in_any_ray_log(ray_cluster):
    """After every run of this module (S3 credentials in the environment), no file of the Ray session — its
    logs and runtime_env records — holds the secret key."""
    from conftest import S3_SECRET

    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path())
    hits = [p for p in session.rglob("*") if p.is_file() and S3_SECRET.encode() in p.read_bytes()]
    assert not hits, hits
