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


def local_trial(point: dict, config: str, overrides: list[str], checkpoint_every: int) -> None:
    """The single-process loop (:func:`train_local`) in the trial's process. Checkpoints (every
    ``checkpoint_every`` iterations and the last) hold the trainable parameters, the AdamW state, the
    learner's state (baselines, step norms), the iteration and the last evaluation: enough for PBT to continue
    a trial from another's checkpoint. They are read with ``weights_only=True`` (no pickled code)."""
    from ray import tune

    from rlr_dist.memory import MB, SavedTensorMeter
    from rlr_dist.models import load_model
    from rlr_dist.train.config import load_config
    from rlr_dist.train.learner import Learner
    from rlr_dist.train.local import Evaluator, make_optimizer, train_local

    torch.set_num_threads(1)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # a line per checkpoint otherwise
    cfg = load_config(config, overrides + point_overrides(point))
    T = cfg.train.iterations
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model)
    params = model.trainable_parameters()
    opt = make_optimizer(cfg, params)
    learner = Learner(cfg, model.schedule())
    start, spent, ev = 0, 0.0, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE, weights_only=True)  # tensors and plain values only, no pickle
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        for g in opt.param_groups:  # PBT may have perturbed them since
            g.update(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
        start, spent, ev = state["iteration"], state["seconds"], state["eval"]
        learner.load_state_dict(state["learner"])
    evaluate = Evaluator(cfg, model)
    ev = ev or evaluate(model)  # before training: what ASHA / PBT compare until the first evaluation
    meter = SavedTensorMeter(exclude=model.unet.parameters())
    t0 = time.perf_counter()

    def on_iteration(i: int, stats: dict) -> None:
        nonlocal ev
        if evaluate.due(i):
            ev = {k: v for k, v in stats.items() if k.startswith("eval/")}  # train_local evaluated this iteration
        elif i == T:
            ev = evaluate(model)  # the last iteration is always scored, even with train.eval_every: 0
        m = {"reward/mean": stats["reward/mean"], "kl/sampled": stats.get("kl/sampled", float("nan")), **ev,
             "time/trial": spent + time.perf_counter() - t0,
             "memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
             "memory/peak_activation_mb": meter.peak / MB, "target_iterations": T}
        if i % checkpoint_every and i != T:
            tune.report(m)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
                        "iteration": i, "seconds": m["time/trial"], "eval": ev, "learner": learner.state_dict()},
                       Path(d) / STATE)
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))

    with meter:
        train_local(cfg, on_iteration=on_iteration, model=model, optimizer=opt, start=start, learner=learner)


PIPELINE_KEYS = ("reward/mean", "kl/sampled", "eval/heldout", "eval/reward")


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
        hist = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in PIPELINE_KEYS}
        for step in sorted(s for s in hist["reward/mean"] if s > reported):
            if step == T and not finished:
                break
            m = {k: v[max(s for s in v if s <= step)] for k, v in hist.items() if any(s <= step for s in v)}
            m.update({"time/trial": time.perf_counter() - t0, "target_iterations": T})
            if step == T and "error" not in box:
                from rlr_dist.train.local import Evaluator

                final = load_model({"path": cfg.export, "num_inference_steps": cfg.model.num_inference_steps,
                                    "eta": cfg.model.eta})
                m.update({k: v for k, v in Evaluator(cfg, final)(final).items()
                          if k not in m})  # the pipeline's own evaluation numbers stay
            tune.report(m)
            reported = step
        if finished:
            break
        time.sleep(2.0)
    if "error" in box:
        raise box["error"]
