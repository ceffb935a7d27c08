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


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)


def train_local(cfg: TrainConfig, iterations: int | None = None,
                on_iteration: Callable[[int, dict], None] | None = None,
                model: DiffusionModel | None = None, optimizer: torch.optim.Optimizer | None = None,
                start: int = 0) -> tuple[DiffusionModel, list[dict]]:
    """Run iterations ``start, …, iterations - 1`` (default end ``cfg.train.iterations``) in this process;
    returns the model and per-iteration stats (with per-phase timings). ``model``: train this one instead of
    loading ``cfg.model``; ``optimizer``: step this one (from :func:`make_optimizer` over the model's
    trainable parameters, e.g. restored from a checkpoint together with the model, with ``start`` > 0)."""
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model) if model is None else model
    cfg.check_schedule(model.schedule())
    estimator, regulariser = cfg.make_estimator(), cfg.make_regulariser()
    advantages = Advantages(cfg.train.advantage_baseline, cfg.train.advantage_scale)
    scorer = build_scorer(cfg.reward, model.decoder())
    params = model.trainable_parameters()
    opt = make_optimizer(cfg, params) if optimizer is None else optimizer
    prompts = cfg.data.load_prompts()
    t = cfg.train
    chunks_per_it = max(cfg.cluster.samplers.count, cfg.cluster.learners.count)
    history = []
    for it in range(start, iterations if iterations is not None else t.iterations):
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


def evaluate(model: DiffusionModel, n: int, target: int) -> dict:
    """Held-out evaluator numbers on ``n`` fresh samples from fixed seeds (toy-world digits models):
    ``heldout`` (fraction read as ``target``), ``heldout_logp``, ``class_entropy`` (bits, of the predicted
    classes) and ``pairwise_l2`` (mean pairwise L2 distance of the images) — the last two measure diversity."""
    from rlr_dist.chain.trajectory import Plan, sample
    from rlr_dist.toy_world.rewards import evaluate_digits

    g = torch.Generator().manual_seed(123_457)
    with torch.no_grad():
        x0 = sample(model.chain(), model.initial_noise(n, g), Plan(), model.encode_prompts([""] * n), g).x0
        images = model.decode(x0).float()
    ev = evaluate_digits(images, target)
    flat = images.flatten(1)
    return {"heldout": ev["frac_target"], "heldout_logp": ev["mean_logp_target"], "class_entropy": ev["entropy_bits"],
            "pairwise_l2": float(torch.pdist(flat).mean())}
