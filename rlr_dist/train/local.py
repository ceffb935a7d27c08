"""The single-process loop: the pipeline's iteration (same work, seeds and losses) without Ray or DeepSpeed.

It is the reference the distributed pipeline is tested against (same weights after the same iterations)
and the baseline ``rlr-dist bench pipeline`` measures Ray's overhead against.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from rlr_dist.estimators import Advantages
from rlr_dist.models import DiffusionModel, load_model
from rlr_dist.rewards import build_scorer
from rlr_dist.train import step
from rlr_dist.train.config import TrainConfig


def train_local(cfg: TrainConfig, iterations: int | None = None,
                on_iteration: Callable[[int, dict], None] | None = None) -> tuple[DiffusionModel, list[dict]]:
    """Run ``iterations`` (default ``cfg.train.iterations``) in this process; returns the model and per-
    iteration stats (with per-phase timings)."""
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model)
    estimator, regulariser = cfg.make_estimator(), cfg.make_regulariser()
    advantages = Advantages(cfg.train.advantage_baseline, cfg.train.advantage_scale)
    scorer = build_scorer(cfg.reward, model.decoder())
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    prompts = cfg.data.load_prompts()
    t = cfg.train
    chunks_per_it = max(cfg.cluster.samplers.count, cfg.cluster.learners.count)
    history = []
    for it in range(iterations if iterations is not None else t.iterations):
        t0 = time.perf_counter()
        works = step.iteration_work(prompts, it, t.seed, t.prompts_per_iteration, t.samples_per_prompt, chunks_per_it)
        chunks = [step.rollout(model, estimator, w.prompts, w.prompt_ids, w.seed, it, True) for w in works]
        t1 = time.perf_counter()
        chunks = [step.score(scorer, c, estimator.needs_reward_grad) for c in chunks]
        t2 = time.perf_counter()
        all_R = torch.cat([c.reward for c in chunks])
        opt.zero_grad(set_to_none=True)
        stats = step.learn(model, estimator, regulariser, advantages, chunks, all_rewards=all_R)
        gnorm = step.grad_norm(params)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        advantages.update(all_R, torch.cat([c.traj.prompt_ids for c in chunks]))
        t3 = time.perf_counter()
        stats.update(step.batch_stats(chunks))
        stats.update({"grad_norm": gnorm, "time/sample": t1 - t0, "time/score": t2 - t1, "time/learn": t3 - t2,
                      "time/iteration": t3 - t0})
        history.append(stats)
        if on_iteration is not None:
            on_iteration(it + 1, stats)
    return model, history
