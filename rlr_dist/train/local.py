"""The single-process loop: the pipeline's iteration (same work, plans, seeds, losses and metrics) without
Ray or DeepSpeed.

It is the reference the distributed pipeline is tested against (same weights and the same per-iteration
metrics after the same iterations) and the baseline ``rlr-dist bench pipeline`` measures Ray's overhead
against. The iteration itself is :class:`rlr_dist.train.learner.Learner` plus the functions of
:mod:`rlr_dist.train.step`; this file only moves tensors between them in one process.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from rlr_dist.models import DiffusionModel, load_model
from rlr_dist.rewards import build_scorer
from rlr_dist.train import step
from rlr_dist.train.config import TrainConfig
from rlr_dist.train.learner import Learner


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)


def chunks_per_iteration(cfg: TrainConfig) -> int:
    """Sampler calls per iteration: the layout's (one per sampler, at least one per learner)."""
    return max(cfg.cluster.samplers.count, cfg.cluster.learners.count)


def train_local(cfg: TrainConfig, iterations: int | None = None,
                on_iteration: Callable[[int, dict], None] | None = None,
                model: DiffusionModel | None = None, optimizer: torch.optim.Optimizer | None = None,
                start: int = 0, learner: Learner | None = None) -> tuple[DiffusionModel, list[dict]]:
    """Run iterations ``start, …, iterations - 1`` (default end ``cfg.train.iterations``) in this process;
    returns the model and per-iteration metrics (with per-phase timings). ``model`` / ``optimizer`` /
    ``learner``: continue these (e.g. restored from a checkpoint, with ``start`` > 0) instead of fresh ones.
    With ``train.eval_every`` the metrics of evaluated iterations include the evaluation numbers."""
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model) if model is None else model
    cfg.check_schedule(model.schedule())
    learner = Learner(cfg, model.schedule()) if learner is None else learner
    scorer = build_scorer(cfg.reward, model.decoder())
    evaluator = Evaluator(cfg, model, scorer)
    params = model.trainable_parameters()
    opt = make_optimizer(cfg, params) if optimizer is None else optimizer
    n_chunks = chunks_per_iteration(cfg)

    def clip_and_step() -> None:
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()

    def optimizer_step() -> None:
        """The learner's step between the phases of an estimator that steps several times per iteration
        (``estimator.optimizer_steps``); the loop below makes the last."""
        clip_and_step()
        opt.zero_grad(set_to_none=True)

    end = iterations if iterations is not None else cfg.train.iterations
    history = []
    for it in range(start, end):
        t0 = time.perf_counter()
        chunks = [step.rollout(model, w, it) for w in learner.works(it, n_chunks)]
        t1 = time.perf_counter()
        sampled = [step.Sampled.of(c) for c in chunks]
        scores = [step.score_sampled(scorer, s, learner.need_grad) for s in sampled]
        summaries = [step.summarise(s, sc) for s, sc in zip(sampled, scores)]
        chunks = [step.apply_scores(c, sc) for c, sc in zip(chunks, scores)]
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        terms = learner.learn(model, chunks, summaries, optimizer_step=optimizer_step)
        gnorm = step.grad_norm(params)
        clip_and_step()
        metrics = learner.finish(it, summaries, terms, gnorm)
        t3 = time.perf_counter()
        metrics.update({"time/sample": t1 - t0, "time/score": t2 - t1, "time/learn": t3 - t2, "time/iteration": t3 - t0})
        if evaluator.due(it + 1):
            metrics.update(evaluator(model))
        history.append(metrics)
        if on_iteration is not None:
            on_iteration(it + 1, metrics)
    return model, history


class Evaluator:
    """The configured evaluation, in one process: fresh samples from the fixed evaluation seeds split as the
    pipeline's samplers split them, scored by the training reward and the ``eval_reward``
    (:func:`rlr_dist.train.step.eval_metrics`) — the same numbers the pipeline logs."""

    def __init__(self, cfg: TrainConfig, model: DiffusionModel, scorer=None):
        self.cfg = cfg
        self.scorer = scorer or build_scorer(cfg.reward, model.decoder())
        self.heldout = None if cfg.eval_reward is None else build_scorer(cfg.eval_reward, model.decoder(), "eval_reward")

    def due(self, done: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and (done % every == 0 or done == self.cfg.train.iterations)

    def __call__(self, model: DiffusionModel) -> dict[str, float]:
        prompts = self.cfg.data.eval_prompts or self.cfg.data.load_prompts()
        parts = step.eval_parts(prompts, self.cfg.train.eval_samples, self.cfg.cluster.samplers.count)
        x0 = torch.cat([step.draw(model, p, seed) for p, seed in parts])
        order = [q for p, _ in parts for q in p]
        return step.eval_metrics(self.scorer, self.heldout, x0, order)
