"""The trainables: one Tune trial is one full training run of the base config at a point of the space.

Both report to Tune every iteration (so ASHA can stop a trial early) with the metrics of
:data:`rlr_dist.tune.space.METRICS`, the last evaluation carried forward between evaluations, and
``target_iterations`` (the trial's ``train.iterations``; a trial that reports fewer was stopped early).
"""
from __future__ import annotations

import json
import logging
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch

from rlr_dist.tune.space import point_overrides

STATE = "trial.pt"


def _evaluate(model, cfg) -> dict:
    from rlr_dist.train.local import evaluate

    target = int((cfg.eval_reward or cfg.reward).params.get("target", 3))
    e = evaluate(model, cfg.train.eval_samples, target)
    return {"eval/heldout": e["heldout"], "eval/heldout_logp": e["heldout_logp"],
            "diversity/class_entropy": e["class_entropy"], "diversity/pairwise_l2": e["pairwise_l2"]}


def local_trial(point: dict, config: str, overrides: list[str], checkpoint_every: int) -> None:
    """The single-process loop (:func:`train_local`) in the trial's process. Checkpoints (every
    ``checkpoint_every`` iterations and the last) hold the trainable parameters, the AdamW state, the
    iteration and the last evaluation: enough for PBT to continue a trial from another's checkpoint."""
    from ray import tune

    from rlr_dist.memory import MB, SavedTensorMeter
    from rlr_dist.models import load_model
    from rlr_dist.train.config import load_config
    from rlr_dist.train.local import make_optimizer, train_local

    torch.set_num_threads(1)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # a line per checkpoint otherwise
    cfg = load_config(config, overrides + point_overrides(point))
    T, every = cfg.train.iterations, cfg.train.eval_every
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model)
    params = model.trainable_parameters()
    opt = make_optimizer(cfg, params)
    start, spent, ev = 0, 0.0, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE, weights_only=False)
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        for g in opt.param_groups:  # PBT may have perturbed them since
            g.update(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
        start, spent, ev = state["iteration"], state["seconds"], state["eval"]
    ev = ev or _evaluate(model, cfg)  # before training: what ASHA / PBT compare until the first evaluation
    meter = SavedTensorMeter(exclude=model.unet.parameters())
    t0 = time.perf_counter()

    def on_iteration(i: int, stats: dict) -> None:
        nonlocal ev
        if i == T or (every and i % every == 0):
            ev = _evaluate(model, cfg)
        m = {"reward/mean": stats["reward/mean"], "kl/sampled": stats.get("kl/sampled", float("nan")), **ev,
             "time/trial": spent + time.perf_counter() - t0,
             "memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
             "memory/peak_activation_mb": meter.peak / MB, "target_iterations": T}
        if i % checkpoint_every and i != T:
            tune.report(m)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
                        "iteration": i, "seconds": m["time/trial"], "eval": ev}, Path(d) / STATE)
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))

    with meter:
        train_local(cfg, on_iteration=on_iteration, model=model, optimizer=opt, start=start)


PIPELINE_KEYS = {"reward/mean": "reward.mean", "kl/sampled": "kl.sampled", "eval/heldout": "eval.heldout",
                 "eval/reward": "eval.reward"}


def pipeline_trial(point: dict, config: str, overrides: list[str], uri: str, parent_id: str, root: str) -> None:
    """A full ``rlr-dist train`` (actor pools, DeepSpeed learners under Ray Train) nested in the trial, in
    ``<root>/trials/<trial id>``, logging into the trial's nested MLflow run. Its per-iteration metrics are
    read back from MLflow and reported to Tune as they appear; at the end the exported model is evaluated
    for diversity. An interrupted trial continues from its own pipeline checkpoint (``train(resume=True)``)."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from rlr_dist.models import load_model
    from rlr_dist.pipeline.run import RUN_FILE, train
    from rlr_dist.train.config import load_config
    from rlr_dist.tune.tracking import find_run

    trial_id = tune.get_context().get_trial_id()
    out = Path(root) / "trials" / trial_id
    cfg = load_config(config, overrides + point_overrides(point) + [
        f"--output_dir={out}", f"--export={out / 'model'}", f"--tracking.uri={uri}"])
    client = MlflowClient(uri)
    run_id = find_run(client, parent_id, trial_id, wait_s=120)  # the driver's callback creates it
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({"name": trial_id, "run_id": run_id, "tracking_uri": uri}))
    box: dict = {}

    def work() -> None:
        try:
            box["out"] = train(cfg, resume=True)  # the run exists; continues a checkpoint if there is one
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    t0, reported, T = time.perf_counter(), 0, cfg.train.iterations
    while True:
        finished = not thread.is_alive()  # read before the poll, so the poll sees the last metrics
        hist = {k: {m.step: m.value for m in client.get_metric_history(run_id, v)} for k, v in PIPELINE_KEYS.items()}
        for step in sorted(s for s in hist["reward/mean"] if s > reported):
            if step == T and not finished:
                break
            m = {k: v[max(s for s in v if s <= step)] for k, v in hist.items() if any(s <= step for s in v)}
            m.update({"time/trial": time.perf_counter() - t0, "target_iterations": T})
            if step == T and "error" not in box:
                final = load_model({"path": cfg.export, "num_inference_steps": cfg.model.num_inference_steps,
                                    "eta": cfg.model.eta})
                m.update({k: v for k, v in _evaluate(final, cfg).items()
                          if k != "eval/heldout"})  # the pipeline's own held-out score stays
            tune.report(m)
            reported = step
        if finished:
            break
        time.sleep(2.0)
    if "error" in box:
        raise box["error"]
