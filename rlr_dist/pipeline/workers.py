"""Sampler and reward-model workers: plain classes that become Ray actors (created by the driver, ``run.py``).

A sampler holds a model replica and produces the trajectories the learner's work asks for (the plan comes
with the work: samplers hold no estimator state); a reward worker holds the reward model (and the decoder)
and scores them. Both only wrap :mod:`rlr_dist.train.step`.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Sequence

import torch
from torch import Tensor

from rlr_dist.config import build
from rlr_dist.models import load_decoder, load_model
from rlr_dist.rewards import build_scorer
from rlr_dist.train import step
from rlr_dist.train.config import TrainConfig

PROBE_SEED = 20_251_122


class StaleWeights(RuntimeError):
    """A sampler was asked for a weight version it does not hold (e.g. it restarted)."""


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _threads() -> None:
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def probe_output(model, prompt: str) -> Tensor:
    """One fixed-noise UNet prediction at the first step: a cheap fingerprint of the trained weights."""
    chain = model.chain()
    g = torch.Generator(device=model.device).manual_seed(PROBE_SEED)
    x = model.initial_noise(1, g)
    with torch.no_grad():
        cond = model.encode_prompts([prompt])
        return chain.mean(x, chain.schedule.T, cond).float().cpu()


def maybe_crash(role: str, index: int, iteration: int, phase: str) -> None:
    """Fault injection (tests, ``rlr-dist bench faults``): ``RLR_DIST_CRASH=ROLE:INDEX:ITERATION:PHASE[,...]``
    kills actor ROLE (``sampler`` / ``reward`` / ``learner``) number INDEX — the whole process — when it reaches
    PHASE (``sample``, ``sync``, ``score``, ``step``) of ITERATION, once: a marker file in ``$RLR_DIST_CRASH_DIR``
    records that it happened. ``node@ROLE:...`` loses the actor's whole node instead: the marker (``*.node``)
    holds the node's Ray id and the actor waits there until the harness kills that node
    (:meth:`rlr_dist.pipeline.local_cluster.LocalCluster.kill`), so the loss lands at an exact point of the run."""
    spec, folder = os.environ.get("RLR_DIST_CRASH"), os.environ.get("RLR_DIST_CRASH_DIR")
    if not spec or not folder:
        return
    me = f"{role}:{index}:{iteration}:{phase}"
    items = spec.split(",")
    if me in items:
        marker = os.path.join(folder, me.replace(":", "_"))
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
    elif f"node@{me}" in items:
        marker = os.path.join(folder, me.replace(":", "_") + ".node")
        if not os.path.exists(marker):
            with open(marker + ".tmp", "w") as f:
                f.write(node_id())
            os.replace(marker + ".tmp", marker)
            while True:  # until the node goes, with this process on it
                time.sleep(1)


def node_id() -> str:
    """The Ray id of the node this process runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _incarnation() -> str:
    """A fresh id for this actor process, with the node it runs on: ``<12 hex>@<node id>``."""
    return f"{uuid.uuid4().hex[:12]}@{node_id()}"


class WeightStore:
    """The latest trained state (held by reference) and its version. Samplers that restart, or miss a
    sync, pull from here instead of asking a particular learner. It also keeps the run's fault record —
    the actors' incarnations (each with its node) and the restarts and re-run calls seen — which outlives a
    learner restart. The driver pins it to its own node, which a run never loses."""

    def __init__(self):
        self.ref, self.version = None, -1
        self.incarnations: dict[str, str] = {}
        self.placements: list[tuple[str, str]] = []   # (actor, incarnation) in the order first seen
        self.restarts, self.retries = 0, 0

    def note(self, actors: dict[str, str], retries: int = 0) -> tuple[list[str], int, int]:
        """Record incarnations seen and calls re-run; returns the actors seen restarted now and the totals."""
        new = [name for name, inc in actors.items() if self.incarnations.get(name, inc) != inc]
        self.placements += [(name, inc) for name, inc in actors.items() if self.incarnations.get(name) != inc]
        self.incarnations.update(actors)
        self.restarts += len(new)
        self.retries += retries
        return new, self.restarts, self.retries

    def put(self, boxed_ref: list, version: int) -> None:
        self.ref, self.version = boxed_ref[0], version  # boxed: Ray passes the ref, not the tensors

    def get(self) -> tuple[list, int]:
        return [self.ref], self.version

    def record(self) -> list[tuple[str, str]]:
        return list(self.placements)

    def node(self) -> str:
        return node_id()


class SamplerWorker:
    def __init__(self, cfg: dict, index: int = 0, store=None):
        _threads()
        self.incarnation = _incarnation()  # new after every (re)start: how a restart is noticed
        self.store = store
        self.cfg = build(TrainConfig, cfg)
        self.index = index
        self.model = load_model(self.cfg.model, _device(self.cfg.cluster.samplers.num_gpus))
        self.version = 0
        self.probe_prompt = self.cfg.data.load_prompts()[0]

    def set_weights(self, state: dict, version: int, crash_point: bool = True) -> tuple[str, Tensor, str]:
        """Load the learner's trained state; returns the hash of what is now loaded (read back from the
        model), the probe prediction (for the learner to verify) and this process's incarnation."""
        from rlr_dist.pipeline.engine import state_hash

        if crash_point:
            maybe_crash("sampler", self.index, version, "sync")
        self.model.load_trained_state(state)
        self.version = version
        return state_hash(self.model.trained_state()), probe_output(self.model, self.probe_prompt), self.incarnation

    def get_version(self) -> int:
        return self.version

    def sample(self, work: step.Work, version: int) -> tuple[step.Chunk, step.Sampled]:
        """The chunk (for the learner) and what scoring needs of it (for a reward actor): two objects, so the
        reward actor's node never pulls the recorded states (call with ``num_returns=2``)."""
        maybe_crash("sampler", self.index, work.iteration, "sample")
        if version != self.version:
            self._pull(version)
        chunk = step.rollout(self.model, work, self.version)  # with the reference: the KL is logged every iteration
        chunk.actors[f"sampler/{self.index}"] = self.incarnation
        return chunk, step.Sampled.of(chunk)

    def _pull(self, version: int) -> None:
        """Load the latest weights from the store (after a restart). If the store has moved past ``version``
        (overlap mode), the chunk is drawn with the newer weights and says so in ``chunk.version``."""
        import ray

        if self.store is None:
            raise StaleWeights(f"sampler {self.index} holds weights v{self.version}, asked for v{version}")
        boxed, have = ray.get(self.store.get.remote())
        if have < version or boxed[0] is None:
            raise StaleWeights(f"sampler {self.index}: v{version} asked for, the weight store holds v{have}")
        self.set_weights(ray.get(boxed[0]), have, crash_point=False)

    def draw(self, prompts: Sequence[str], seed: int) -> Tensor:
        """Only ``x_0`` of fresh samples (for evaluation and pictures)."""
        return step.draw(self.model, prompts, seed)


class RewardWorker:
    def __init__(self, cfg: dict, index: int = 0):
        _threads()
        self.index = index
        self.incarnation = _incarnation()
        self.cfg = build(TrainConfig, cfg)
        self.device = _device(self.cfg.cluster.rewards.num_gpus)
        decoder = load_decoder(self.cfg.model, self.device)
        self.scorer = build_scorer(self.cfg.reward, decoder)
        self.scorer.reward.to(self.device)
        self.eval_scorer = None
        if self.cfg.eval_reward is not None:
            self.eval_scorer = build_scorer(self.cfg.eval_reward, decoder, "eval_reward")
            self.eval_scorer.reward.to(self.device)
        self.decoder = decoder

    def score(self, sampled: step.Sampled, need_grad: bool) -> step.Scores:
        maybe_crash("reward", self.index, sampled.iteration, "score")
        scores = step.score_sampled(self.scorer, sampled, need_grad, self.device)
        scores.actors[f"reward/{self.index}"] = self.incarnation
        return scores

    def score_and_summarise(self, sampled: step.Sampled, need_grad: bool) -> tuple[step.Scores, dict]:
        """The rewards of a chunk (applied to it by the learner: :func:`rlr_dist.train.step.apply_scores`) and a
        small summary every learner gets (rewards, prompt ids, per-sample KL)."""
        scores = self.score(sampled, need_grad)
        return scores, step.summarise(sampled, scores)

    def evaluate(self, x0: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Training and evaluation reward on fresh samples (:func:`rlr_dist.train.step.eval_metrics`)."""
        return step.eval_metrics(self.scorer, self.eval_scorer, x0, prompts, self.device)

    def images(self, x0: Tensor) -> Tensor:
        """Decoded images in [0, 1] (for grids and GIFs), on the CPU."""
        with torch.no_grad():
            return self.decoder(x0.to(self.device)).float().cpu()
