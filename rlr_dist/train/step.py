"""The pieces of one iteration as plain functions: draw the work, sample, score, summarise, learn, evaluate.

The single-process loop (:mod:`rlr_dist.train.local`) and the Ray roles (sampler and reward actors, the
learners of :mod:`rlr_dist.pipeline.learner`) call exactly these, so the distributed pipeline and the
reference loop do identical work; the learner's state between iterations lives in
:class:`rlr_dist.train.learner.Learner`. No Ray import here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from rlr_dist.chain.trajectory import Plan, Trajectory, sample
from rlr_dist.estimators import Advantages, Batch, Estimator, backward_terms
from rlr_dist.models.base import DiffusionModel
from rlr_dist.regularisers import Regulariser
from rlr_dist.rewards.base import RewardScorer

EVAL_SEED = 10_000  # fresh evaluation samples: part i of the evaluation batch is drawn from seed EVAL_SEED + i


@dataclass
class Work:
    """What one sampler call produces: these prompts (with dataset ids), from this seed, recording what the
    learner's ``plan`` asks for (the learner draws it; samplers hold no estimator state)."""

    prompts: list[str]
    prompt_ids: list[int]
    seed: int
    iteration: int = 0
    plan: Plan | None = None


@dataclass
class Chunk:
    """A sampler's share of an iteration: ``len(prompts)`` trajectories with their prompts, the weight
    version that produced them, and (after scoring) the rewards."""

    traj: Trajectory
    prompts: list[str]
    version: int
    reward: Tensor | None = None
    reward_grad: Tensor | None = None
    stats: dict = field(default_factory=dict)
    actors: dict = field(default_factory=dict)  # "sampler/0" -> incarnation of the actor that made it (Ray)


def iteration_work(prompts: Sequence[str], iteration: int, seed: int, prompts_per_iteration: int,
                   samples_per_prompt: int, chunks: int) -> list[Work]:
    """The iteration's samples split into ``chunks`` (one per sampler call). Deterministic in
    ``(seed, iteration)``, so the distributed pipeline and the single-process loop do the same work."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    n = len(prompts)
    if prompts_per_iteration <= n:
        ids = torch.randperm(n, generator=g)[:prompts_per_iteration].tolist()
    else:
        ids = torch.randint(0, n, (prompts_per_iteration,), generator=g).tolist()
    flat = [i for i in ids for _ in range(samples_per_prompt)]
    chunks = max(1, min(chunks, len(flat)))
    bounds = [round(j * len(flat) / chunks) for j in range(chunks + 1)]
    out = []
    for j in range(chunks):
        part = flat[bounds[j]:bounds[j + 1]]
        out.append(Work([prompts[i] for i in part], part, seed=(seed * 7919 + iteration) * 1009 + j,
                        iteration=iteration))
    return out


def with_plan(work: Work, estimator: Estimator, schedule, window: frozenset[int] | None = None) -> Work:
    """``work`` with the plan ``estimator`` draws for it from the work's own seed (the same on every learner).
    ``window``: this iteration's stochastic steps of a flow sampler (``schedule`` must already carry them); the
    plan carries it to the sampler, which builds the same chain (``None``: the model's configured one)."""
    work.plan = estimator.plan(schedule, torch.Generator().manual_seed(work.seed))
    work.plan.window = None if window is None else frozenset(window)
    return work


def rollout(model: DiffusionModel, work: Work, version: int, with_reference: bool = True) -> Chunk:
    """Sample one trajectory per prompt of ``work`` (noise from its seed), recording what its plan needs."""
    if work.plan is None:
        raise ValueError("rollout: the work carries no plan (the learner draws it: Learner.works)")
    t0 = time.perf_counter()
    gen = torch.Generator(device=model.device).manual_seed(work.seed)
    with torch.no_grad():
        cond = model.encode_prompts(list(work.prompts))
    x_T = model.initial_noise(len(work.prompts), gen)
    ids = torch.tensor(list(work.prompt_ids), dtype=torch.long)
    traj = sample(model.chain(window=work.plan.window), x_T, work.plan, cond, gen, with_reference=with_reference,
                  prompt_ids=ids, seed=work.seed)
    traj.meta["iteration"] = work.iteration
    return Chunk(traj=traj.to("cpu"), prompts=list(work.prompts), version=version,
                 stats={"time/sample": time.perf_counter() - t0})


def draw(model: DiffusionModel, prompts: Sequence[str], seed: int) -> Tensor:
    """``x_0`` of fresh samples (nothing recorded) from ``seed``: evaluation, pictures, ``rlr-dist sample``
    (with the model's evaluation sampler: for flow models the one ``model.flow.eval`` names)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    x_T = model.initial_noise(len(prompts), g)
    with torch.no_grad():
        cond = model.encode_prompts(list(prompts))
        return sample(model.eval_chain(), x_T, Plan(), cond, g).x0.cpu()


@dataclass
class Sampled:
    """What scoring needs of a chunk, and what its summary adds: ``x_0``, the prompts with their ids, the
    per-sample sampled KL, the sampler's stats. A reward actor gets this instead of the chunk, whose recorded
    states and noises (most of its bytes) stay in the sampler's object store until the learner fetches them."""

    x0: Tensor
    prompts: list[str]
    prompt_ids: Tensor | None
    kl: Tensor | None
    iteration: int
    stats: dict
    actors: dict

    @classmethod
    def of(cls, chunk: Chunk) -> "Sampled":
        t = chunk.traj
        kl = None if t.delta is None else t.delta.double().sum(1) / 2
        return cls(t.x0, list(chunk.prompts), t.prompt_ids, kl, int(t.meta.get("iteration", -1)), dict(chunk.stats),
                   dict(chunk.actors))


@dataclass
class Scores:
    """A reward call's answer for one chunk: ``R`` and ``∂R/∂x_0`` (when asked) of the samples kept, the mask of
    those kept (``None``: all; the non-finite policy ``drop`` removes samples), the call's stats."""

    reward: Tensor
    reward_grad: Tensor | None
    keep: Tensor | None
    stats: dict
    actors: dict = field(default_factory=dict)


def score_sampled(scorer: RewardScorer, s: Sampled, need_grad: bool, device: str | torch.device = "cpu") -> Scores:
    """Score ``x_0`` (and ``∂R/∂x_0`` when ``need_grad``) under the scorer's non-finite policy: with ``drop`` the
    samples whose reward is NaN/inf are left out (counted in ``reward/dropped``)."""
    t0 = time.perf_counter()
    R, dR, keep = scorer.score_keep(s.x0.to(device), s.prompts, need_grad=need_grad)
    dropped = int((~keep).sum())
    keep = keep.cpu() if dropped else None
    if keep is not None:
        R, dR = R[keep.to(R.device)], None if dR is None else dR[keep.to(dR.device)]
    return Scores(R.cpu(), None if dR is None else dR.cpu(), keep,
                  {"reward/dropped": float(dropped), "time/score": time.perf_counter() - t0})


def apply_scores(chunk: Chunk, scores: Scores) -> Chunk:
    """The chunk with its rewards filled in and the dropped samples removed."""
    if scores.keep is not None:
        chunk.traj = chunk.traj.select(scores.keep)
        chunk.prompts = [p for p, k in zip(chunk.prompts, scores.keep.tolist()) if k]
    chunk.reward, chunk.reward_grad = scores.reward, scores.reward_grad
    chunk.stats.update(scores.stats)
    chunk.actors.update(scores.actors)
    return chunk


def score(scorer: RewardScorer, chunk: Chunk, need_grad: bool, device: str | torch.device = "cpu") -> Chunk:
    """:func:`score_sampled` on the chunk itself, applied to it (the single-process loop, benches)."""
    return apply_scores(chunk, score_sampled(scorer, Sampled.of(chunk), need_grad, device))


def summarise(s: Sampled, scores: Scores) -> dict:
    """The small part of a scored chunk every learner needs: rewards, prompt ids, per-sample sampled KL
    (``Σ_k δ_k / 2``), the stats (timings, dropped samples) and the actors that made it."""
    def kept(t: Tensor | None) -> Tensor | None:
        return t if t is None or scores.keep is None else t[scores.keep]

    return {"reward": scores.reward, "prompt_ids": kept(s.prompt_ids), "kl": kept(s.kl),
            "stats": {**s.stats, **scores.stats}, "actors": {**s.actors, **scores.actors}}


def learn(model: DiffusionModel, estimator: Estimator, regulariser: Regulariser, advantages: Advantages,
          chunks: Sequence[Chunk], all_rewards: Tensor, backward: Callable[[Tensor], None] | None = None,
          track_norms: bool = False, optimizer_step: Callable[[], None] | None = None) -> dict[str, float]:
    """Back-propagate the estimator's surrogate loss over ``chunks`` (gradients accumulate in ``.grad``;
    the caller steps the optimiser). Each chunk is one :class:`Batch`, weighted by its share of the
    iteration's samples (``all_rewards``: every learner's, which also sets a batch-wide reward scale).
    Returns per-term ``loss/<term>`` (and ``gnorm/<term>`` with ``track_norms``) summed over the chunks.
    Each chunk's chain is the one it was sampled with (its plan's flow window).

    An estimator with ``optimizer_steps > 1`` (the authors' released loop, ``rlr_release``) is learned in
    phases: phase p's terms over every chunk, then ``optimizer_step()`` (step the optimiser and zero the
    gradients) before phase p + 1; the caller makes the last step, so the gradient left in ``.grad`` is the
    last phase's. Without ``optimizer_step`` the phases accumulate at the same weights (their sum)."""
    chains: dict = {}
    total = len(all_rewards)
    params = model.trainable_parameters() if track_norms else None
    out: dict[str, float] = {}
    phases = estimator.optimizer_steps
    for phase in range(phases):
        if phase and optimizer_step is not None:
            optimizer_step()
        for c in chunks:
            w = c.traj.batch_size / total
            window = c.traj.plan.window
            if window not in chains:
                chains[window] = model.chain(window=window)
            chain = chains[window]
            b = Batch(traj=c.traj.to(model.device), chain=chain, reward=c.reward.to(model.device),
                      reward_grad=None if c.reward_grad is None else c.reward_grad.to(model.device),
                      regulariser=regulariser, advantages=advantages, batch_reward=all_rewards)
            b.scale = advantages.scale_factor(all_rewards)
            parts = estimator.terms(b) if phases == 1 else estimator.phase_terms(b, phase)
            terms = ((name, w * loss) for name, loss in parts)
            for key, v in backward_terms(terms, params, track_norms, backward).items():
                out[key] = out.get(key, 0.0) + v
    return out


def grad_norm(params: Sequence[Tensor]) -> float:
    sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
    return sq**0.5


def term_metrics(stats: dict[str, float], T: int) -> dict[str, float]:
    """Per-term learner stats as the metrics a person reads: ``loss/total``, one ``loss/<kind>`` per kind of
    term (``fo``, ``ho``, ``zo`` summed over steps, ...) and the per-step terms under ``step_loss/`` and
    ``step_gnorm/`` with zero-padded steps (``step_loss/zo_07``), so they sort and group."""
    width = max(2, len(str(T)))
    out: dict[str, float] = {}
    for key, v in stats.items():
        what, _, term = key.partition("/")
        kind, _, k = term.partition(":")
        if what == "loss":
            out["loss/total"] = out.get("loss/total", 0.0) + v
            out[f"loss/{kind}"] = out.get(f"loss/{kind}", 0.0) + v
        if k.isdigit():
            out[f"step_{what}/{kind}_{int(k):0{width}d}"] = v
        elif what == "gnorm":
            out[f"gnorm/{kind}"] = v
    return out


def batch_metrics(summaries: Sequence[dict]) -> dict[str, float]:
    """Reward mean/std over the iteration's kept samples, dropped samples, and the sampled KL to the
    reference (mean over samples of ``Σ_k δ_k / 2``)."""
    R = torch.cat([s["reward"] for s in summaries]).double()
    out = {"reward/mean": float(R.mean()), "reward/std": float(R.std()) if R.numel() > 1 else 0.0,
           "samples": float(R.numel()),
           "reward/dropped": sum(s["stats"].get("reward/dropped", 0.0) for s in summaries)}
    kl = [s["kl"] for s in summaries if s["kl"] is not None]
    if kl:
        out["kl/sampled"] = float(torch.cat(kl).double().mean())
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def eval_parts(prompts: Sequence[str], n: int, parts: int) -> list[tuple[list[str], int]]:
    """The evaluation batch (``n`` prompts cycled) split into ``parts`` (one per sampler), each with its seed."""
    per = [prompts[i % len(prompts)] for i in range(n)]
    return [(per[i::parts], EVAL_SEED + i) for i in range(parts) if per[i::parts]]


def eval_metrics(train: RewardScorer, heldout: RewardScorer | None, x0: Tensor, prompts: Sequence[str],
                 device: str | torch.device = "cpu") -> dict[str, float]:
    """Evaluation numbers of fresh samples: ``eval/reward`` (the training reward), ``eval/heldout`` (the
    configured evaluation reward) with that reward's own report numbers (``eval/<name>``), and
    ``eval/pairwise_l2`` (mean pairwise L2 distance of the decoded samples: diversity)."""
    x0 = x0.to(device)
    out = {"eval/reward": float(train.score(x0, prompts)[0].mean())}
    if heldout is not None:
        out["eval/heldout"] = float(heldout.score(x0, prompts)[0].mean())
        with torch.no_grad():
            extra = heldout.reward.eval_metrics(heldout.decoder(x0).float(), prompts)
        out.update({f"eval/{k}": float(v) for k, v in extra.items()})
    if len(x0) > 1:
        with torch.no_grad():
            images = train.decoder(x0).float()
        out["eval/pairwise_l2"] = float(torch.pdist(images.flatten(1).cpu()).mean())
    return out
