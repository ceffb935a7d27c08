"""The distributed pipeline on a real local Ray cluster: sampler and reward actors, DeepSpeed learners under
Ray Train, MLflow tracking, checkpoints (local and S3), resume, and a sampler killed mid-run."""
import json

import pytest
import torch

from rlr_dist.config import ConfigError, build
from rlr_dist.models.tiny import build_tiny
from rlr_dist.train.config import TrainConfig


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray cluster for the module; started after the S3 server so its workers see the endpoint."""
    import ray

    from rlr_dist.pipeline.run import _env

    ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": _env()})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {layout: build_tiny(layout, root / layout) for layout in ("pixel", "pixel_video", "sd")}


def _cfg(model_path, out, **over) -> TrainConfig:
    data = {
        "model": {"path": str(model_path), "num_inference_steps": 4},
        "estimator": {"name": "rlr", "h": 1},
        "reward": {"name": "brightness"},
        "data": {"prompts": ["zero", "one"]},
        "train": {"iterations": 4, "prompts_per_iteration": 2, "samples_per_prompt": 3, "eval_every": 2,
                  "eval_samples": 4},
        "cluster": {"samplers": {"count": 2, "num_cpus": 0.5}, "rewards": {"count": 1, "num_cpus": 0.5},
                    "learners": {"count": 2, "num_cpus": 0.5}},
        "deepspeed": {"zero_stage": 1},
        "optim": {"lr": 3e-3},
        "checkpoint": {"every": 2},
        "output_dir": str(out),
    }
    for key, value in over.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return build(TrainConfig, data)


def _lora(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.e2e
def test_train_tracks_checkpoints_and_resumes_to_the_single_process_result(ray_cluster, tiny, tmp_path):
    """2 iterations, stop, resume to 4 on 2 DeepSpeed learners == 4 iterations of the single-process loop — with
    RLR's learned value baseline, which each learner fits on the records of both (gathered), which the checkpoint
    carries across the resume, and which weights the likelihood ratios of iterations 3 and 4."""
    from mlflow.tracking import MlflowClient

    from rlr_dist.pipeline.run import train
    from rlr_dist.train.local import train_local

    out = tmp_path / "run"
    first = train(_cfg(tiny["pixel"], out, **{"train.iterations": 2, "estimator": VALUE}))
    assert first["metrics"]["weights_version"] == 2
    ckpt = first["checkpoint"]
    assert json.loads(open(f"{ckpt}/state.json").read())["iteration"] == 2
    listed = json.loads(open(f"{ckpt}/manifest.json").read())["files"]
    # every rank's optimizer shard is listed (and present: the manifest is verified on resume)
    assert any("zero_pp_rank_1" in rel for rel in listed) and any("zero_pp_rank_0" in rel for rel in listed)
    resumed = train(_cfg(tiny["pixel"], out, export=str(tmp_path / "export"), estimator=VALUE), resume=True)
    assert resumed["run_id"] == first["run_id"] and resumed["metrics"]["weights_version"] == 4

    # MLflow: the resolved config as params, a metric per iteration, pictures and config as artifacts
    client = MlflowClient(first["tracking_uri"])
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["estimator.h"] == "1" and run.data.params["model.finetune"] == "lora"
    assert [m.step for m in client.get_metric_history(first["run_id"], "reward/mean")] == [1, 2, 3, 4]
    for key in ("kl/sampled", "grad_norm", "time/sync", "samples_per_s", "eval/reward"):
        assert client.get_metric_history(first["run_id"], key), key
    assert all(m.value > 0 for m in client.get_metric_history(first["run_id"], "grad_norm"))
    arts = {a.path for a in client.list_artifacts(first["run_id"])}
    assert {"config.yaml", "reward_curve.png", "samples"} <= arts
    assert {a.path for a in client.list_artifacts(first["run_id"], "samples")} == {
        "samples/iter_00000.png", "samples/iter_00002.png", "samples/iter_00004.png"}  # 0: before training
    assert [m.step for m in client.get_metric_history(first["run_id"], "eval/reward")] == [0, 2, 4]

    model, history = train_local(_cfg(tiny["pixel"], tmp_path / "local", estimator=VALUE))
    assert [h.get("value/steps_used", 0) for h in history][2:] == [3, 3]  # V weights every LR step from iteration 3
    local = model.trained_state()
    exported = {k[len("unet."):]: v for k, v in _lora(tmp_path / "export").items()}
    assert exported.keys() == local.keys()
    assert max(float(v.abs().max()) for k, v in local.items() if "lora_B" in k) > 0  # training moved the adapter
    # Adam divides by √v of tiny gradients, so float rounding of the DDP average shows up at ~1e-5
    for k in local:
        torch.testing.assert_close(exported[k], local[k], rtol=1e-3, atol=1e-4)
    for key in ("reward/mean", "kl/sampled", "loss/total", "loss/zo", "value/loss"):  # 2 learners' shares = 1 process
        steps = sorted(client.get_metric_history(first["run_id"], key), key=lambda m: m.step)
        assert [m.value for m in steps] == pytest.approx([h[key] for h in history], rel=1e-4, abs=1e-7), key


VALUE = {"name": "rlr", "h": 1, "baseline": "value", "value": {"steps": 20, "min_skill": -100.0}}
TRANSPORT = ("time/", "samples_per_s", "weights_version", "restarts/")  # what only the Ray loop measures


def test_both_loops_run_one_iteration_skeleton(ray_cluster, tiny, tmp_path):
    """Serial layout, identical seeds: the Ray pipeline logs exactly the per-iteration metrics of the
    single-process loop — with a reward that fails on every third sample (dropped, not trained on as 0) and
    the RLR block start drawn by the softmax law of the gradient norms the learners measure."""
    from mlflow.tracking import MlflowClient

    from rlr_dist.estimators.rlr import RLR
    from rlr_dist.pipeline.run import train
    from rlr_dist.train.learner import Learner
    from rlr_dist.train.local import train_local

    over = {"model.num_inference_steps": 6, "estimator": {"name": "rlr", "h": 1, "j_law": "softmax", "temperature": 0.2},
            "reward": {"name": "jobs.plugins.example:Flaky", "every": 3, "on_nonfinite": "drop"},
            "eval_reward": {"name": "jobs.plugins.example:CentreBrightness"}, "train.iterations": 6,
            "train.samples_per_prompt": 4, "train.eval_every": 3, "checkpoint.every": 3,
            **{f"cluster.{r}.count": 1 for r in ("samplers", "rewards", "learners")}}
    cfg = _cfg(tiny["pixel"], tmp_path / "ray", **over)
    out = train(cfg)
    local_cfg = _cfg(tiny["pixel"], tmp_path / "local", **over)
    from rlr_dist.models import load_model

    torch.manual_seed(local_cfg.train.seed)  # as train_local and every learner do before building the model
    model = load_model(local_cfg.model)
    learner = Learner(local_cfg, model.schedule())
    _, history = train_local(local_cfg, model=model, learner=learner)

    client = MlflowClient(out["tracking_uri"])
    run = client.get_run(out["run_id"])
    logged = {k for k in run.data.metrics if not k.startswith(TRANSPORT)}
    local_keys = {k for h in history for k in h if not k.startswith(TRANSPORT)}
    assert logged == local_keys, logged ^ local_keys
    for key in sorted(local_keys):
        ray_pts = {m.step: m.value for m in client.get_metric_history(out["run_id"], key) if m.step > 0}
        local_pts = {i + 1: h[key] for i, h in enumerate(history) if key in h}
        assert ray_pts.keys() == local_pts.keys(), key
        if key == "loss/total":  # a sum of terms that can cancel (HO +68.2, ZO −68.8): its rounding error is
            # bounded by rel × Σ|terms|, not by rel × |total|; each term is compared on its own above/below
            parts = [k for k in local_keys if k.startswith("loss/") and k != key]
            for i in sorted(local_pts):
                scale = sum(abs(h[k]) for h in [history[i - 1]] for k in parts if k in h)
                assert ray_pts[i] == pytest.approx(local_pts[i], abs=1e-4 * scale + 1e-6), (key, i)
            continue
        assert [ray_pts[i] for i in sorted(ray_pts)] == pytest.approx(
            [local_pts[i] for i in sorted(local_pts)], rel=1e-4, abs=1e-6), key
    # dropped, not trained on: 3 of every 8 samples (indices 1, 4, 7 of the chunk)
    assert all(h["reward/dropped"] == 3 and h["samples"] == 5 for h in history)

    # the softmax law: uniform until norms exist, then driven by them (and the draws follow it)
    assert history[0]["plan/j_tv"] == 0 and all(h["plan/j_tv"] > 0.2 for h in history[1:])
    est = RLR(h=1, j_law="softmax", temperature=0.2)
    ckpt = json.loads(open(f"{out['checkpoint']}/state.json").read())
    est.load_state_dict(ckpt["learner"]["estimator"])
    assert est.step_norm and est.step_norm == pytest.approx(learner.estimator.step_norm, rel=1e-4)
    law = est.j_probabilities(model.schedule())
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([est.plan(model.schedule(), g).j for _ in range(4000)])
    for j, p in law.items():
        freq = float((draws == j).double().mean())
        assert abs(freq - p) < 4 * (p * (1 - p) / 4000) ** 0.5 + 1e-3, (j, freq, p)
    assert max(law.values()) > 0.5  # far from uniform (0.2 each)


@pytest.mark.e2e
def test_text_to_image_run_survives_a_killed_sampler(ray_cluster, tiny, tmp_path, monkeypatch):
    from rlr_dist.pipeline.run import train

    monkeypatch.setenv("RLR_DIST_CRASH", "sampler:1:1:sample")
    monkeypatch.setenv("RLR_DIST_CRASH_DIR", str(tmp_path))
    cfg = _cfg(tiny["sd"], tmp_path / "sd", **{"data.prompts": ["a cat", "a red dog"], "train.iterations": 3,
                                               "train.eval_every": 0, "cluster.samplers.max_restarts": 2,
                                               "model.guidance_scale": 2.0, "deepspeed.zero_stage": 2})
    out = train(cfg)
    assert (tmp_path / "sampler_1_1_sample").exists()  # the sampler really died
    assert out["metrics"]["weights_version"] == 3
    assert out["metrics"]["restarts/actors"] >= 1 and out["metrics"]["restarts/calls_rerun"] >= 1
    assert out["metrics"]["restarts/learners"] == 0


@pytest.mark.e2e
def test_video_run_with_overlap_checkpoints_to_s3(ray_cluster, tiny, tmp_path, s3_server):
    from rlr_dist import storage
    from rlr_dist.pipeline.run import train

    cfg = _cfg(tiny["pixel_video"], tmp_path / "video", **{
        "reward": {"name": "temporal_consistency"}, "train.iterations": 2, "train.overlap": True,
        "train.eval_every": 2, "checkpoint.dir": f"{s3_server}/ckpt", "deepspeed.zero_stage": 3,
        "model.finetune": "full"})
    out = train(cfg)
    assert out["metrics"]["weights_version"] == 2
    assert out["checkpoint"].startswith("rlr-test/ckpt/") or out["checkpoint"].startswith("s3://")
    keys = [o["Key"] for o in storage.s3_client().list_objects_v2(Bucket="rlr-test", Prefix="ckpt/")["Contents"]]
    assert any(k.endswith("/manifest.json") for k in keys) and any(k.endswith("/state.json") for k in keys)
    assert (tmp_path / "video" / "samples" / "iter_00002.gif").is_file()


# ------------------------------------------------------------------------------------------ no Ray Train
def test_weight_sync_mismatch_fails_loudly(ray_cluster, tiny, tmp_path):
    import ray

    from rlr_dist.config import to_dict
    from rlr_dist.models import load_model
    from rlr_dist.pipeline.engine import state_hash
    from rlr_dist.pipeline.pools import ActorPools, WeightSyncError
    from rlr_dist.pipeline.workers import SamplerWorker, probe_output

    cfg = _cfg(tiny["pixel"], tmp_path)
    sampler = ray.remote(SamplerWorker).remote(to_dict(cfg), 0)
    ctl = ActorPools(cfg, [sampler], [], need_grad=True)
    model = load_model(cfg.model)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.01)
    state = model.trained_state()
    probe = probe_output(model, "zero")
    assert ctl.sync(state, 1, probe, state_hash(state)) >= 0  # consistent: passes
    with pytest.raises(WeightSyncError, match="hash"):
        ctl.sync(state, 2, probe, "0" * 64)
    with pytest.raises(WeightSyncError, match="probe"):
        ctl.sync(state, 3, probe + 1e-2, state_hash(state))
    ray.kill(sampler)


def test_nonfinite_rewards_are_dropped_and_counted(tiny, tmp_path):
    from rlr_dist.chain.trajectory import Plan, sample
    from rlr_dist.config import to_dict
    from rlr_dist.models import load_model
    from rlr_dist.pipeline.workers import RewardWorker
    from rlr_dist.rewards import REWARDS, Reward, RewardError
    from rlr_dist.train.step import Chunk, Sampled, apply_scores

    if "test_nan_every_other" not in REWARDS:
        @REWARDS.register("test_nan_every_other")
        class NanEveryOther(Reward):
            differentiable = True

            def forward(self, images, prompts=None):
                r = images.flatten(1).mean(1)
                return torch.where(torch.arange(len(r)) % 2 == 0, r, torch.full_like(r, float("nan")))

    model = load_model(str(tiny["pixel"]))
    T = model.chain().schedule.T
    plan = Plan(states=frozenset(range(1, T + 1)), noises=frozenset(range(1, T + 1)))  # every step, as ZO-LR records
    traj = sample(model.chain(), model.initial_noise(4), plan, model.encode_prompts(["zero"] * 4),
                  with_reference=True, prompt_ids=torch.tensor([5, 6, 7, 8]))
    worker = RewardWorker(to_dict(_cfg(tiny["pixel"], tmp_path, reward={"name": "test_nan_every_other",
                                                                         "on_nonfinite": "drop"})))
    sampled = Sampled.of(Chunk(traj, ["zero"] * 4, 0))
    # the reward actor gets x_0 and the prompts, not the recorded states and noises (2T + 1 latents per sample)
    assert sampled.x0.nbytes * (2 * T + 1) == traj.nbytes()
    scores, summary = worker.score_and_summarise(sampled, need_grad=True)
    chunk = apply_scores(Chunk(traj, ["zero"] * 4, 0), scores)
    assert chunk.traj.batch_size == 2 and len(chunk.prompts) == 2 and summary["stats"]["reward/dropped"] == 2
    assert torch.isfinite(chunk.reward).all() and chunk.reward_grad.shape == chunk.traj.x0.shape
    assert chunk.traj.x[T].shape[0] == 2 and chunk.traj.prompt_ids.tolist() == summary["prompt_ids"].tolist() == [5, 7]
    assert torch.equal(summary["kl"], chunk.traj.delta.double().sum(1) / 2) and torch.equal(summary["reward"], chunk.reward)
    strict = RewardWorker(to_dict(_cfg(tiny["pixel"], tmp_path, reward={"name": "test_nan_every_other"})))
    with pytest.raises(RewardError, match="test_nan_every_other"):
        strict.score(sampled, need_grad=False)


def test_bad_config_fails_before_ray(tmp_path, monkeypatch):
    from rlr_dist.pipeline import run

    monkeypatch.setattr(run, "init_ray", lambda cfg: pytest.fail("Ray was started"))
    with pytest.raises(ConfigError, match="model.path"):
        run.train(_cfg(tmp_path / "no-such-model", tmp_path / "out"))
    with pytest.raises(ConfigError, match="estimator.hh"):
        _cfg(tmp_path, tmp_path, estimator={"name": "rlr", "hh": 2})
    with pytest.raises(ConfigError, match="reward.name"):
        _cfg(tmp_path, tmp_path, reward={"name": "jpeg_compressibility"})  # rlr's FO term needs ∂R/∂x_0
    with pytest.raises(ConfigError, match="cluster.learners.count"):
        _cfg(tmp_path, tmp_path, **{"cluster.learners.count": 0})
