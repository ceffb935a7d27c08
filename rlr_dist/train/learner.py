"""The learner's side of every iteration, with no transport: the one iteration skeleton both loops share.

A :class:`Learner` owns what persists between iterations — the estimator (its per-step gradient norms, which
the softmax law of the RLR block start reads), the regulariser and the advantage baselines — and does, in
order, each iteration:

    works(it)   draw the trajectory plans (a flow sampler's stochastic window, j, sampled steps, SPSA seeds)
                and put them in the samplers' work
    learn(...)  back-propagate the estimator's terms over the scored chunks this process holds
    finish(...) update baselines and step norms from the whole iteration, and return its metrics

The single-process loop (:func:`rlr_dist.train.local.train_local`) runs it over chunks it samples and scores
itself; each Ray learner (:func:`rlr_dist.pipeline.learner.learner_loop`) runs one over the chunks of its
share, gathering the small summaries and per-term stats of the other learners, so every learner ends an
iteration in the same state. Transport, weight sync and checkpoint writing stay in the loops.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from rlr_dist.estimators import Advantages
from rlr_dist.models.base import DiffusionModel
from rlr_dist.train import step
from rlr_dist.train.config import TrainConfig


class Learner:
    def __init__(self, cfg: TrainConfig, schedule) -> None:
        self.cfg = cfg
        self.schedule = schedule
        self.estimator, self.regulariser = cfg.make_estimator(), cfg.make_regulariser()
        self.advantages = Advantages(cfg.train.advantage_baseline, cfg.train.advantage_scale)
        self.prompts = cfg.data.load_prompts()
        self.T = schedule.T
        self._plan_metrics: dict[int, dict] = {}  # iteration -> numbers about its plans (for finish)

    @property
    def need_grad(self) -> bool:
        return self.estimator.needs_reward_grad

    def window(self, iteration: int) -> frozenset[int] | None:
        """The stochastic window of a flow sampler at ``iteration`` when it varies (``model.flow.window``:
        sliding, or random from the iteration's seed); ``None`` otherwise (the configured schedule)."""
        m = self.cfg.model
        if m.sampler != "flow" or not m.flow.window.varies:
            return None
        return m.flow.window.draw(self.T, iteration, self.cfg.train.seed)

    def schedule_at(self, iteration: int):
        """The chain schedule of ``iteration`` (the configured one, or with that iteration's window)."""
        w = self.window(iteration)
        return self.schedule if w is None else self.schedule.with_window(w)

    def works(self, iteration: int, chunks: int) -> list[step.Work]:
        """Iteration ``iteration``'s work in ``chunks`` sampler calls, each carrying the plan the estimator
        drew for it (from the work's own seed, so every learner draws the same plans) and, for a varying flow
        window, that iteration's window (samplers and learners build their chain from it)."""
        t = self.cfg.train
        works = step.iteration_work(self.prompts, iteration, t.seed, t.prompts_per_iteration, t.samples_per_prompt,
                                    chunks)
        window, schedule = self.window(iteration), self.schedule_at(iteration)
        works = [step.with_plan(w, self.estimator, schedule, window) for w in works]
        metrics = self.estimator.plan_metrics([w.plan for w in works], schedule)
        fixed = self.estimator.describe().get("fixed_steps")
        if fixed is not None:  # steps left without gradient this iteration (biased; docs/flow.md)
            metrics["plan/fixed_steps"] = float(len(fixed))
        if window is not None:
            metrics["plan/window_start"] = float(self.T - max(window))
        self._plan_metrics[iteration] = metrics
        return works

    def learn(self, model: DiffusionModel, chunks: Sequence[step.Chunk], summaries: Sequence[dict],
              backward: Callable[[Tensor], None] | None = None,
              optimizer_step: Callable[[], None] | None = None) -> dict[str, float]:
        """Back-propagate this process's ``chunks`` (``summaries``: the whole iteration's, for the weights
        and the reward scale). Per-term gradient norms are measured when the estimator reads them.
        ``optimizer_step``: steps the optimiser (and zeroes the gradients) between the phases of an estimator
        that makes several optimiser steps per call (``estimator.optimizer_steps``); the caller makes the last."""
        all_R = torch.cat([s["reward"] for s in summaries])
        return step.learn(model, self.estimator, self.regulariser, self.advantages, chunks, all_R, backward,
                          track_norms=self.estimator.reads_term_norms, optimizer_step=optimizer_step)

    def finish(self, iteration: int, summaries: Sequence[dict], term_stats: dict[str, float],
               grad_norm: float | None, records: list | None = None) -> dict:
        """End iteration ``iteration``: fold its rewards into the baselines and its per-term norms into the
        estimator (``term_stats`` summed over every learner), and let the estimator learn from what its terms
        recorded (``records``: every learner's :meth:`Estimator.take_records`, gathered; ``None``: this
        process's only, the single-process loop); returns the iteration's metrics."""
        R = torch.cat([s["reward"] for s in summaries])
        self.advantages.update(R, torch.cat([s["prompt_ids"] for s in summaries]))
        self.estimator.observe(term_stats)
        learned = self.estimator.learn_from([self.estimator.take_records()] if records is None else records)
        out = {**step.batch_metrics(summaries), **step.term_metrics(term_stats, self.T),
               **self._plan_metrics.pop(iteration, {}), **learned}
        out["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"advantages": self.advantages.state_dict(), "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.advantages.load_state_dict(state["advantages"])
        self.estimator.load_state_dict(state.get("estimator", {}))
