"""`rlr-dist bench scale`: coordination cost of the Ray pipeline at scale, without GPUs.

A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with ``CPU: 0`` plus worker
nodes, each a raylet with its own object store). Every role is a stand-in actor (``num_cpus=0``, pinned
round-robin to the worker nodes) that moves the real tensors of one iteration and *sleeps* for the GPU time
``rlr-dist plan`` estimates per call, so what is left on top of the sleeps is coordination: the learners'
submit / wait / fetch (Ray scheduling, object-store put, node-to-node transfer, get), the weight push to the
samplers and the driver's per-iteration barrier. The iteration mirrors ``rlr_dist.pipeline.pools``:

* each learner (rank r of L) sends chunks r, r + L, ... : ``sampler.sample`` -> its chunk (the recorded
  states / noises of the estimator's plan, x0, the prompt embeddings) goes by ref to ``reward.score``, which
  returns the scored chunk (the same tensors again, + dR/dx0) and a small summary (``num_returns=2``);
* the learner waits for its summaries, ``ray.get``s its chunks, "trains" (sleeps its backward time),
  rank 0 pushes the trained state: ``ray.put`` + ``set_weights`` on every sampler, verified by a hash of
  what the sampler loaded and a probe call (``ActorPools.sync``: one sampler after the other), or, as the
  candidate fix, the same calls issued to every sampler at once (``--sync concurrent``).

The weight-sync part times three ways of getting one state to N receivers: (a) the current verified push,
(b) one ``ray.put`` that every receiver ``ray.get``s at once (object-store broadcast), (c) a bucketed
``torch.distributed`` gloo broadcast among actors (64 MB buckets).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rlr_dist.ports import free_port

GB, MB = 1e9, 1e6
BUCKET = 64 << 20      # bytes per gloo broadcast bucket / object-store copy slice
GPU_NAME = "h100-80gb"


# ------------------------------------------------------------------------------------------ what is moved
@dataclass
class Preset:
    """One model's per-call GPU seconds and tensor sizes (from the planner, or small ones for ``--quick``)."""

    name: str
    chunk: int                # samples per sampler / reward / learner call
    sampler_s: float          # GPU seconds of one call, as planned
    reward_s: float
    learner_s: float
    payload: int              # bytes a sampler returns per chunk (recorded latents, x0, prompt embeddings)
    grad: int                 # dR/dx0 bytes the reward adds per chunk
    probe_s: float            # one denoiser call at batch 1 (the sync's probe)
    lora_shapes: list = field(default_factory=list)   # trained state at the config's rank: [(name, shape)]
    time_scale: float = 1.0   # sleeps = planned seconds x this (1: real time)
    notes: list = field(default_factory=list)

    def sleeps(self) -> tuple[float, float, float]:
        s = self.time_scale
        return self.sampler_s * s, self.reward_s * s, self.learner_s * s


def quick_preset() -> Preset:
    return Preset("quick", 1, 0.3, 0.03, 0.05, 256 << 10, 16 << 10, 0.002,
                  [(f"lora.{i}", (8, 320)) for i in range(16)])


def _recorded(cfg, T: int) -> int:
    """Latents one trajectory carries for the estimator's plan (states + noises + x0), from a drawn plan on a
    stand-in chain with the config's sigma > 0 pattern (as ``planner.estimator_backprop``)."""
    import torch

    est, m = cfg.make_estimator(), cfg.model
    if m.sampler == "flow":
        from rlr_dist.chain.flow import FlowSchedule

        base = FlowSchedule.from_flow_times(torch.linspace(1, 0, T + 1), m.flow.transition, m.eta)
        sched = base.with_window(next(iter(m.flow.window.windows(T))))
    else:
        from rlr_dist.chain.schedule import GaussianSchedule

        sched = GaussianSchedule.from_alpha_bars(torch.linspace(0.999, 0.01, T + 1),
                                                 eta=m.eta if m.sampler == "ddim" else 1.0,
                                                 last_step_eta=m.last_step_eta)
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(8):
        p = est.plan(sched, g)
        counts.append(1 + (2 * T + 1 if p.record_all else len(p.states) + len(p.noises)))
    return max(counts)


def planner_preset(config: str, arch_name: str, label: str, time_scale: float = 1.0) -> Preset:
    """Per-call seconds and sizes of ``config`` on an H100 from ``rlr_dist.planner`` (a meta-device pass)."""
    from rlr_dist import planner
    from rlr_dist.models import MODELS
    from rlr_dist.train.config import load_config

    cfg = load_config(config)
    arch = planner.arch_of(cfg.model, arch_name)
    roles = {r.name: r for r in planner.plan(cfg, GPU_NAME, arch)}
    c, t, m = cfg.cluster, cfg.train, cfg.model
    chunks = max(c.samplers.count, c.learners.count)
    chunk = math.ceil(t.batch_size / chunks)
    per = lambda name, count: roles[name].seconds / math.ceil(chunks / count)  # noqa: E731
    up, unet, *_ = planner._profiles(arch)
    cfg_mult = 2 if m.guidance_scale != 1.0 else 1
    flops_per_s = planner.GPUS[GPU_NAME].bf16_tflops * 1e12 * planner.EFFICIENCY
    latent = math.prod(arch.latent) * 4
    text_width = arch.text[0][1].get("hidden_size", arch.text[0][1].get("d_model", 768)) if arch.text else 0
    cond = cfg_mult * arch.tokens * text_width * 4
    rec = _recorded(cfg, m.num_inference_steps)
    targets = m.lora.target_modules or MODELS.get(arch.layout, "model.layout").default_lora_targets
    shapes = lora_shapes(unet, m.lora.rank, targets)
    notes = [f"{config} (`--arch {arch_name}`), {GPU_NAME}: chunk {chunk} sample(s); per call sampler "
             f"{per('sampler', c.samplers.count):.3g} s, reward {per('reward', c.rewards.count):.3g} s, learner "
             f"{per('learner', c.learners.count):.3g} s (the planner's per-role seconds / its calls per role)",
             f"chunk payload: {rec} latents of {'x'.join(map(str, arch.latent))} fp32 per sample (the estimator's "
             f"drawn plan: recorded states + noises + x0) + prompt embeddings {cfg_mult}x{arch.tokens}x{text_width} "
             f"fp32 = {(rec * latent + cond) * chunk / MB:.1f} MB; dR/dx0 {latent * chunk / MB:.2f} MB",
             f"probe: one denoiser call at batch 1 = {up.flops / 1e9:.0f} GFLOP at {planner.EFFICIENCY:.0%} of "
             f"{planner.GPUS[GPU_NAME].bf16_tflops:g} TFLOPS = {up.flops / flops_per_s * 1e3:.2f} ms (FLOPs, no "
             f"planner time for it)"]
    if time_scale != 1.0:
        notes.append(f"sleeps scaled by {time_scale:g} (a {per('sampler', c.samplers.count):.0f} s sampler call "
                     "per point is too long for this run): overheads are absolute seconds, compared below with "
                     "the real per-call time")
    return Preset(label, chunk, per("sampler", c.samplers.count), per("reward", c.rewards.count),
                  per("learner", c.learners.count), (rec * latent + cond) * chunk, latent * chunk,
                  up.flops / flops_per_s, shapes, time_scale, notes)


def lora_shapes(unet, rank: int, targets: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """peft's LoRA tensors (A: r x in, B: out x r) of every adapted Linear (``planner.lora_params``' rule)."""
    from torch import nn

    out = []
    for name, mod in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets) and isinstance(mod, nn.Linear):
            out += [(name + ".lora_A", (rank, mod.in_features)), (name + ".lora_B", (mod.out_features, rank))]
    return out


def full_shapes(arch_name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of the preset's denoiser (meta device)."""
    from rlr_dist import planner

    p = planner.PRESETS[arch_name]
    unet = planner._build(p["unet_class"], p["unet"])
    return [(n, tuple(t.shape)) for n, t in unet.named_parameters()]


def make_state(shapes, dtype) -> dict[str, np.ndarray]:
    """Arrays of the given shapes (each its own constant: what is timed is moving them, not their values)."""
    return {n: np.full(s, 0.25 + i % 7, dtype=dtype) for i, (n, s) in enumerate(shapes)}


def state_bytes(state: dict) -> int:
    return sum(a.nbytes for a in state.values())


def digest(state: dict) -> str:
    """What ``engine.state_hash`` does to a loaded state: sha256 over names and values."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state[k]).data)
    return h.hexdigest()


def load(state: dict, scratch: np.ndarray) -> int:
    """Copy every tensor through a bucket-sized buffer (the host-to-device copy into the model's parameters)."""
    flat = scratch.view(np.uint8)
    n = 0
    for a in state.values():
        b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        for i in range(0, b.size, flat.size):
            part = b[i:i + flat.size]
            flat[:part.size] = part
        n += b.size
    return n


# ------------------------------------------------------------------------------------------- stand-ins
def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class Sampler:
    def __init__(self, index: int):
        self.index, self.version, self.payload, self.scratch = index, 0, None, None

    def node(self) -> str:
        return _node()

    def configure(self, payload: int, prompts: int) -> None:
        self.payload = np.ones(payload // 4, dtype=np.float32)
        self.prompts = prompts

    def sample(self, iteration: int, version: int, sleep: float) -> dict:
        if version != self.version:
            raise RuntimeError(f"sampler {self.index}: holds v{self.version}, asked for v{version}")
        time.sleep(sleep)
        return {"traj": self.payload, "prompt_ids": np.arange(self.prompts), "version": version,
                "iteration": iteration, "sampler": self.index}

    def set_weights(self, state: dict, version: int, probe_s: float, verify: bool = True) -> tuple:
        """As ``SamplerWorker.set_weights``: load, then the hash of what is loaded and the probe call."""
        if self.scratch is None:
            self.scratch = np.empty(BUCKET // 4, dtype=np.float32)
        n = load(state, self.scratch)
        self.version = version
        if not verify:
            return "", n, self.index
        h = digest(state)
        time.sleep(probe_s)
        return h, n, self.index

    def ping(self) -> int:
        return self.index


class Reward:
    def __init__(self, index: int):
        self.index, self.grad = index, None

    def node(self) -> str:
        return _node()

    def configure(self, grad: int) -> None:
        self.grad = np.ones(max(1, grad // 4), dtype=np.float32)

    def score(self, chunk: dict, sleep: float) -> tuple[dict, dict]:
        time.sleep(sleep)
        scored = dict(chunk, reward=np.zeros(len(chunk["prompt_ids"]), np.float32), reward_grad=self.grad)
        return scored, {"reward": 0.0, "n": len(chunk["prompt_ids"]), "sampler": chunk["sampler"]}


class Learner:
    def __init__(self, rank: int):
        self.rank = rank

    def node(self) -> str:
        return _node()

    def configure(self, samplers, rewards, world: int, state: dict | None, probe_s: float, sync: str) -> None:
        self.samplers, self.rewards, self.world = samplers, rewards, world
        self.state, self.probe_s, self.sync_mode = state, probe_s, sync
        self.want = digest(state) if state is not None else ""

    def iterate(self, iteration: int, version: int, chunks: int, sleeps: tuple[float, float, float]) -> dict:
        import ray

        s_sleep, r_sleep, l_sleep = sleeps
        t0 = time.perf_counter()
        mine = list(range(self.rank, chunks, self.world))
        jobs = []
        for j in mine:
            c = self.samplers[j % len(self.samplers)].sample.remote(iteration, version, s_sleep)
            jobs.append(self.rewards[j % len(self.rewards)].score.options(num_returns=2).remote(c, r_sleep))
        t1 = time.perf_counter()
        ray.get([s for _, s in jobs])
        t2 = time.perf_counter()
        got = ray.get([c for c, _ in jobs])
        nbytes = sum(g["traj"].nbytes + g["reward_grad"].nbytes for g in got)
        del got
        t3 = time.perf_counter()
        time.sleep(l_sleep * len(mine))
        t4 = time.perf_counter()
        if self.rank == 0 and self.state is not None:
            self.push(version + 1)
        t5 = time.perf_counter()
        return {"submit": t1 - t0, "wait": t2 - t1, "fetch": t3 - t2, "learn": t4 - t3, "sync": t5 - t4,
                "total": t5 - t0, "chunks": len(mine), "bytes": nbytes}

    def push(self, version: int) -> None:
        import ray

        ref = ray.put(self.state)
        if self.sync_mode == "serial":   # ActorPools.sync: one sampler after the other
            results = [ray.get(s.set_weights.remote(ref, version, self.probe_s)) for s in self.samplers]
        else:
            results = ray.get([s.set_weights.remote(ref, version, self.probe_s) for s in self.samplers])
        bad = [i for h, _, i in results if h != self.want]
        if bad:
            raise RuntimeError(f"weight sync: samplers {bad} hold other weights")


class GlooPeer:
    """A torch.distributed (gloo, CPU) member: rank 0 sends the state in 64 MB buckets, the others receive."""

    def node(self) -> str:
        return _node()

    def join(self, addr: str, world: int, rank: int) -> None:
        import torch  # noqa: F401  (imported here: only these peers pay for torch)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"tcp://{addr}", world_size=world, rank=rank)
        self.rank = rank

    def hold(self, state_ref: list) -> int:
        import ray

        self.state = ray.get(state_ref[0])
        return state_bytes(self.state)

    def broadcast(self, total: int) -> float:
        import torch
        import torch.distributed as dist

        t0 = time.perf_counter()
        buf = torch.empty(BUCKET, dtype=torch.uint8)
        arr = buf.numpy()
        if self.rank == 0:
            views = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in self.state.values()]
            flat_pos, vi, off = 0, 0, 0
            while flat_pos < total:
                n = min(BUCKET, total - flat_pos)
                filled = 0
                while filled < n:
                    v = views[vi]
                    k = min(n - filled, v.size - off)
                    arr[filled:filled + k] = v[off:off + k]
                    filled, off = filled + k, off + k
                    if off == v.size:
                        vi, off = vi + 1, 0
                dist.broadcast(buf[:n], src=0)
                flat_pos += n
        else:
            pos = 0
            while pos < total:
                n = min(BUCKET, total - pos)
                dist.broadcast(buf[:n], src=0)
                pos += n
        dist.barrier()
        return time.perf_counter() - t0

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.state = None


# ---------------------------------------------------------------------------------------------- cluster
class Cluster:
    """Head (``CPU: 0``) + ``workers`` nodes on this machine, each with its own object store; always shut down.
    Nodes take Ray's default address, the host's own interface, as ``rlr_dist.pipeline.local_cluster`` does: Ray's driver
    rewrites a 127.0.0.1 bootstrap address to that interface (``canonicalize_bootstrap_address``), so a cluster
    bound to loopback only is not reachable from ``ray.init``. No dashboard is started."""

    def __init__(self, workers: int, store_gb: float, head_store_gb: float | None = None):
        self.workers, self.store_gb = workers, store_gb
        self.head_store_gb = head_store_gb or store_gb

    def __enter__(self) -> "Cluster":
        import ray
        from ray.cluster_utils import Cluster as RayCluster

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.c = RayCluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": int(self.head_store_gb * GB)})
        try:
            self.nodes = [self.c.add_node(num_cpus=1, object_store_memory=int(self.store_gb * GB)) for _ in range(self.workers)]
            self.c.wait_for_nodes()
            ray.init(address=self.c.address, log_to_driver=False)
        except BaseException:
            self.c.shutdown()
            raise
        self.node_ids = [n.node_id for n in self.nodes]
        return self

    def __exit__(self, *exc) -> None:
        import ray

        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            self.c.shutdown()

    def spawn(self, cls, n: int, start: int = 0, **options) -> list:
        """``n`` actors of ``cls`` (``num_cpus=0``), actor i pinned to worker node ``(start + i) % workers``."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(num_cpus=0, max_concurrency=1, **options)(cls)
        return [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            self.node_ids[(start + i) % self.workers], soft=False)).remote(*([i] if cls is not GlooPeer else []))
            for i in range(n)]



# ---------------------------------------------------------------------------------------------- the runs
@dataclass
class Point:
    sweep: str          # samplers / rewards / learners / profile
    preset: str
    sync: str
    S: int
    R: int
    L: int
    n: int              # the swept count
    chunks: int
    samples: int
    wall: float         # mean steady-state iteration seconds
    ideal: float        # the sleeps on the critical path
    submit: float       # rank-0 learner: issuing the calls
    transfer: float     # rank-0 wait beyond the sleeps + its ray.get of the chunks (object store: put/transfer/get)
    fetch: float        # of which the ray.get of its chunks
    sync_s: float       # weight push (rank 0)
    driver: float       # driver barrier: iteration wall - slowest learner's loop
    mbytes: float       # MB through the object store per iteration (chunks out of samplers + scored back)
    nodes: int          # distinct worker nodes the stand-ins ran on
    throughput: float = 0.0
    efficiency: float = 0.0
    variant: str = ""   # profile points: what was switched off


class Pools:
    """Stand-in actors created once and reused by every point (a subset per point)."""

    def __init__(self, cl: Cluster, samplers: int, rewards: int, learners: int):
        import ray

        self.cl = cl
        self.samplers = cl.spawn(Sampler, samplers)
        self.rewards = cl.spawn(Reward, rewards, start=1)
        self.learners = cl.spawn(Learner, learners, start=2)
        self.nodes = {"sampler": ray.get([a.node.remote() for a in self.samplers]),
                      "reward": ray.get([a.node.remote() for a in self.rewards]),
                      "learner": ray.get([a.node.remote() for a in self.learners])}


def run_point(pools: Pools, preset: Preset, sweep: str, S: int, R: int, L: int, sleeps, iterations: int,
              sync: str = "serial") -> Point:
    import ray

    samplers, rewards, learners = pools.samplers[:S], pools.rewards[:R], pools.learners[:L]
    chunks = S if sweep in ("samplers", "profile") else max(8, R, L)
    ray.get([s.configure.remote(preset.payload, preset.chunk) for s in samplers]
            + [r.configure.remote(preset.grad) for r in rewards])
    state = make_state(preset.lora_shapes, np.float32) if preset.lora_shapes and sync != "off" else None
    ray.get([ln.configure.remote(samplers, rewards, L, state if i == 0 else None, preset.probe_s * preset.time_scale,
                                 sync) for i, ln in enumerate(learners)])
    ray.get([s.set_weights.remote(state or {}, 0, 0.0, False) for s in samplers])
    s_sleep, r_sleep, l_sleep = sleeps
    ideal = s_sleep * math.ceil(chunks / S) + r_sleep * math.ceil(chunks / R) + l_sleep * math.ceil(chunks / L)
    rows, walls = [], []
    for it in range(iterations + 1):    # iteration 0: warm-up (first transfers, worker imports)
        t0 = time.perf_counter()
        version = it if state is not None else 0    # no sync: the samplers keep version 0
        res = ray.get([ln.iterate.remote(it, version, chunks, sleeps) for ln in learners])
        wall = time.perf_counter() - t0
        if it:
            rows.append(res)
            walls.append(wall)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    r0 = [r[0] for r in rows]
    wall = mean(walls)
    waited = mean([r["wait"] for r in r0]) - (s_sleep * math.ceil(chunks / S) + r_sleep * math.ceil(chunks / R))
    nodes = {pools.nodes["sampler"][i] for i in range(S)} | {pools.nodes["reward"][i] for i in range(R)} | \
            {pools.nodes["learner"][i] for i in range(L)}
    p = Point(sweep, preset.name, sync, S, R, L, {"rewards": R, "learners": L}.get(sweep, S), chunks,
              chunks * preset.chunk, wall, ideal, mean([r["submit"] for r in r0]),
              max(0.0, waited) + mean([r["fetch"] for r in r0]), mean([r["fetch"] for r in r0]),
              mean([r["sync"] for r in r0]), wall - mean([max(x["total"] for x in r) for r in rows]),
              chunks * (2 * preset.payload + preset.grad) / MB, len(nodes))
    p.throughput = p.samples / p.wall
    return p


def sweep(pools: Pools, preset: Preset, what: str, counts, iterations: int, sync: str = "serial",
          progress=print, base: float | None = None) -> list[Point]:
    """Throughput against the number of one role; the others move their tensors but do not sleep."""
    s, r, l_ = preset.sleeps()
    S8, R8 = min(8, len(pools.samplers)), min(8, len(pools.rewards))
    out = []
    t0 = time.perf_counter()
    for k, n in enumerate(counts):
        if what == "samplers":
            S, R, L, sleeps = n, min(8, max(1, n // 4)), min(8, max(1, n // 8)), (s, 0.0, 0.0)
        elif what == "rewards":
            S, R, L, sleeps = S8, n, 1, (0.0, r, 0.0)
        else:
            S, R, L, sleeps = S8, R8, n, (0.0, 0.0, l_)
        p = run_point(pools, preset, what, S, R, L, sleeps, iterations, sync)
        out.append(p)
        per_actor = base or out[0].throughput / out[0].n
        p.efficiency = p.throughput / (p.n * per_actor)
        el = time.perf_counter() - t0
        eta = el / (k + 1) * (len(counts) - k - 1)
        progress(f"[scale] {preset.name} {what}={n:>2} sync={sync}: {p.throughput:7.2f} samples/s, efficiency "
                 f"{p.efficiency:5.1%}, iteration {p.wall:.2f} s (ideal {p.ideal:.2f}, transfer {p.transfer:.3f}, "
                 f"sync {p.sync_s:.3f}, driver {p.driver:.3f}) [{k + 1}/{len(counts)}, {el:.0f} s, ETA {eta:.0f} s]")
    return out


def profile(pools: Pools, preset: Preset, n: int, iterations: int, base: float, progress=print) -> list[Point]:
    """The sampler sweep's point at ``n`` with parts switched off: the weight sync, the chunk bytes, both."""
    from dataclasses import replace

    s_sleep = preset.sleeps()[0]
    S, R, L = n, min(8, max(1, n // 4)), min(8, max(1, n // 8))
    out = []
    for variant, sync, pre in (("as is", "serial", preset), ("no weight sync", "off", preset),
                               ("4-byte chunks", "serial", replace(preset, payload=4, grad=4)),
                               ("4-byte chunks, no sync", "off", replace(preset, payload=4, grad=4))):
        p = run_point(pools, pre, "profile", S, R, L, (s_sleep, 0.0, 0.0), iterations, sync)
        p.variant, p.efficiency = variant, p.throughput / (n * base)
        out.append(p)
        progress(f"[scale] profile {preset.name} samplers={n} {variant}: {p.throughput:.2f} samples/s, efficiency "
                 f"{p.efficiency:.1%}, iteration {p.wall:.2f} s (object store {p.transfer:.3f}, sync {p.sync_s:.3f})")
    return out


@dataclass
class SyncPoint:
    size: str
    bytes: int
    tensors: int
    method: str
    receivers: int
    seconds: float
    nodes: int


def time_sync(cl: Cluster, receivers: list, peers: list, size: str, state: dict, counts, methods, probe_s: float,
              repeats: int, progress=print) -> list[SyncPoint]:
    """Seconds to get ``state`` loaded by N receivers, per method (best of ``repeats``)."""
    import ray

    out = []
    nbytes, want = state_bytes(state), digest(state)
    rnodes = ray.get([r.node.remote() for r in receivers])
    warm = ray.put(state)                 # untimed: first transfers, receivers' scratch buffers
    ray.get([x.set_weights.remote(warm, 0, 0.0, False) for x in receivers[:max(counts)]])
    del warm
    t_all = time.perf_counter()
    for n in counts:
        for method in methods:
            if method == "gloo" and n > len(peers) - 1:
                continue
            best = math.inf
            for rep in range(repeats):
                ray.get([r.ping.remote() for r in receivers[:n]])
                if method == "gloo":
                    group = peers[:n + 1]
                    addr = f"{ray.util.get_node_ip_address()}:{free_port('')}"
                    ray.get([g.join.remote(addr, n + 1, i) for i, g in enumerate(group)])
                    held = ray.put(state)
                    ray.get(group[0].hold.remote([held]))
                    del held
                    t0 = time.perf_counter()
                    ray.get([g.broadcast.remote(nbytes) for g in group])
                    dt = time.perf_counter() - t0
                    ray.get([g.leave.remote() for g in group])
                else:
                    t0 = time.perf_counter()
                    r = ray.put(state)            # the learner puts the new state each sync
                    if method == "verified":      # (a) ActorPools.sync: one sampler after the other
                        got = [ray.get(x.set_weights.remote(r, rep + 1, probe_s)) for x in receivers[:n]]
                        assert all(h == want for h, _, _ in got)
                    else:                         # (b) every receiver gets the same ref at once
                        ray.get([x.set_weights.remote(r, rep + 1, 0.0, False) for x in receivers[:n]])
                    dt = time.perf_counter() - t0
                    del r
                best = min(best, dt)
            nodes = len({rnodes[i] for i in range(n)})
            out.append(SyncPoint(size, nbytes, len(state), method, n, best, nodes))
            progress(f"[scale] sync {size} ({nbytes / MB:.1f} MB) {method:<9} receivers={n:>2}: {best:.3f} s "
                     f"({nbytes * n / best / GB:.2f} GB/s delivered) [{time.perf_counter() - t_all:.0f} s]")
    return out


def hash_rate(mb: int = 256) -> float:
    """sha256 GB/s of one core here: the verify cost per receiver (parallel across real nodes)."""
    a = np.ones(mb * (1 << 18), dtype=np.float32)
    t0 = time.perf_counter()
    hashlib.sha256(a.data).hexdigest()
    return a.nbytes / (time.perf_counter() - t0) / GB


# -------------------------------------------------------------------------------------------- the plan
@dataclass
class Settings:
    quick: bool
    workers: int = 4
    store_gb: float = 1.5
    samplers: tuple = (1, 2, 4, 8, 16, 32, 64)
    rewards: tuple = (1, 2, 4, 8)
    learners: tuple = (1, 2, 4, 8)
    video_samplers: tuple = (1, 2, 4, 8, 16)
    video_time_scale: float = 0.04
    concurrent_samplers: tuple = (8, 32, 64)
    profile_n: int = 32
    iterations: int = 3
    sync_receivers: tuple = (1, 2, 4, 8, 16, 32, 64)
    gloo_peers: int = 16
    big_receivers: tuple = (1, 2, 4)
    big_workers: int = 2
    big_store_gb: float = 3.3
    repeats: int = 2

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if not quick:
            return cls(False)
        return cls(True, workers=2, store_gb=0.3, samplers=(1, 2, 4), rewards=(1, 2), learners=(1, 2),
                   video_samplers=(), concurrent_samplers=(4,), profile_n=4, iterations=2, sync_receivers=(1, 2, 4),
                   gloo_peers=2, big_receivers=(), repeats=1)


def run(settings: Settings, progress=print) -> dict:
    from rlr_dist import planner

    t0 = time.perf_counter()
    st = settings
    if st.quick:
        presets = [quick_preset()]
        sizes = {"lora quick": [(n, s) for n, s in quick_preset().lora_shapes]}
        dtypes = {"lora quick": np.float32}
    else:
        progress("[scale] planner: SD-1.5 and Wan 2.1 1.3B per-call seconds and sizes (meta-device passes)")
        sd = planner_preset("jobs/configs/sd15-aesthetic-lora.yaml", "sd15", "sd15")
        wan = planner_preset("jobs/configs/wan21-t2v-1.3b-aesthetic-lora.yaml", "wan21-t2v-1.3b", "wan-1.3b",
                             st.video_time_scale)
        presets = [sd, wan]
        up, unet, *_ = planner._profiles(planner.arch_of(_cfg("jobs/configs/sd15-aesthetic-lora.yaml").model, "sd15"))
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        sizes = {"sd15 lora r8": lora_shapes(unet, 8, targets), "sd15 lora r64": lora_shapes(unet, 64, targets),
                 "sd15 full fp16": full_shapes("sd15"), "wan 1.3b fp16": full_shapes("wan21-t2v-1.3b")}
        dtypes = {k: (np.float32 if "lora" in k else np.float16) for k in sizes}
    out = {"settings": asdict(st), "presets": [asdict(p) for p in presets], "points": [], "sync": [],
           "load": [os.getloadavg()[0]],
           "nodes": {}, "hash_gbps": hash_rate(64 if st.quick else 256)}
    small = [k for k in sizes if "lora" in k]
    big = [k for k in sizes if "lora" not in k]
    with Cluster(st.workers, st.store_gb) as cl:
        progress(f"[scale] cluster: head (CPU 0) + {st.workers} worker nodes, {st.store_gb:g} GB object store each "
                 f"[{time.perf_counter() - t0:.0f} s]")
        pools = Pools(cl, max(st.samplers + st.sync_receivers), max(st.rewards), max(st.learners))
        out["nodes"] = pools.nodes
        progress(f"[scale] {len(pools.samplers)} samplers, {len(pools.rewards)} rewards, {len(pools.learners)} "
                 f"learners on {len(set(sum(pools.nodes.values(), [])))} nodes [{time.perf_counter() - t0:.0f} s]")
        main = presets[0]
        pts = sweep(pools, main, "samplers", st.samplers, st.iterations, progress=progress)
        pts += sweep(pools, main, "samplers", st.concurrent_samplers, st.iterations, "concurrent", progress,
                     pts[0].throughput / pts[0].n)
        pts += profile(pools, main, st.profile_n, st.iterations, pts[0].throughput / pts[0].n, progress)
        pts += sweep(pools, main, "rewards", st.rewards, st.iterations, progress=progress)
        pts += sweep(pools, main, "learners", st.learners, st.iterations, progress=progress)
        for p in presets[1:]:
            pts += sweep(pools, p, "samplers", st.video_samplers, max(2, st.iterations - 1), progress=progress)
        out["points"] = [asdict(p) for p in pts]
        peers = cl.spawn(GlooPeer, st.gloo_peers + 1)
        for k in small:
            state = make_state(sizes[k], dtypes[k])
            out["sync"] += [asdict(x) for x in time_sync(
                cl, pools.samplers, peers, k, state, st.sync_receivers, ("verified", "broadcast", "gloo"),
                main.probe_s, st.repeats, progress)]
    out["errors"] = []
    if big and st.big_receivers:
        try:
            _big_sync(st, big, sizes, dtypes, presets[0].probe_s, out, t0, progress)
        except Exception as e:  # noqa: BLE001  (the report says what failed; the rest stands)
            out["errors"].append(f"full-size weight sync: {type(e).__name__}: {str(e)[:300]}")
            progress(f"[scale] full-size weight sync failed: {out['errors'][-1]}")
    out["seconds"] = time.perf_counter() - t0
    out["load"].append(os.getloadavg()[0])
    return out


def _big_sync(st: Settings, big: list, sizes: dict, dtypes: dict, probe_s: float, out: dict, t0: float,
              progress) -> None:
    """Weight sync of the full-size states on a cluster of its own (larger object stores, fewer nodes)."""
    with Cluster(st.big_workers, st.big_store_gb) as cl:
        progress(f"[scale] cluster for full-size states: head + {st.big_workers} worker nodes, "
                 f"{st.big_store_gb:g} GB object store each [{time.perf_counter() - t0:.0f} s]")
        recv = cl.spawn(Sampler, max(st.big_receivers))
        peers = cl.spawn(GlooPeer, max(st.big_receivers) + 1)
        for k in big:
            state = make_state(sizes[k], dtypes[k])
            out["sync"] += [asdict(x) for x in time_sync(
                cl, recv, peers, k, state, st.big_receivers, ("verified", "broadcast", "gloo"),
                probe_s, 1, progress)]
            del state


def _cfg(path: str):
    from rlr_dist.train.config import load_config

    return load_config(path)


# ------------------------------------------------------------------------------------------------ report
def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                         for r in rows]


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in sorted({(p["preset"], p["sweep"], p["sync"]) for p in res["points"] if p["sweep"] != "profile"}):
        pts = sorted((p for p in res["points"] if (p["preset"], p["sweep"], p["sync"]) == key), key=lambda p: p["n"])
        ns = [p["n"] for p in pts]
        a.plot(ns, [p["efficiency"] for p in pts], "o-", label=f"{key[0]}: {key[1]} (sync {key[2]})")
    a.axhline(0.9, color="grey", ls=":", lw=1)
    a.set_xscale("log", base=2)
    a.set_xlabel("actors of the swept role (N)")
    a.set_ylabel("scaling efficiency = throughput / (N x single)")
    a.set_title("throughput vs N (as efficiency; samples/s in the tables)")
    a.legend(fontsize=7)
    for key in sorted({(s["size"], s["method"]) for s in res["sync"]}):
        pts = sorted((s for s in res["sync"] if (s["size"], s["method"]) == key), key=lambda s: s["receivers"])
        b.plot([s["receivers"] for s in pts], [s["seconds"] for s in pts], "o-" if key[1] != "gloo" else "s--",
               label=f"{key[0]}: {key[1]}")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("receivers (samplers)")
    b.set_ylabel("seconds per weight sync")
    b.set_title("weight sync time vs receivers")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(res: dict, command: str, png: str | None) -> str:
    import datetime

    import ray

    st = res["settings"]
    lines = [f"# Coordination cost at scale (stand-in actors on a {st['workers']}-node local Ray cluster)", "",
             f"`{command}` (`rlr_dist/bench/scale.py`); {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
             f"UTC, {res['seconds']:.0f} s; Ray {ray.__version__}; this machine: {os.cpu_count()} cores, "
             f"{_ram_gb():.0f} GB RAM, no GPU; 1-minute load average {res['load'][0]:.1f} at the start, "
             f"{res['load'][-1]:.1f} at the end (other jobs share the machine). Cluster: head (`CPU: 0`) + {st['workers']} worker nodes (separate "
             f"raylets on this machine, {st['store_gb']:g} GB object store each); full-size weight states on a second "
             f"cluster of head + {st['big_workers']} nodes ({st['big_store_gb']:g} GB stores). Stand-ins are "
             "`num_cpus=0` actors pinned round-robin to the worker nodes; they move the real tensors and sleep "
             "for the planned GPU time.", "",
             "**All nodes share this machine's 2 cores and memory bandwidth: object-store \"transfers\" between "
             "nodes are loopback copies, not network transfers**, and every extra process competes for the same "
             "2 cores. Read the overheads as a lower bound on Ray's own bookkeeping and an upper bound on what a "
             "real cluster's CPUs would spend; bytes moved are exact.", ""]
    lines += ["## Presets (from `rlr-dist plan`)", ""] + [f"- **{p['name']}**: " + "; ".join(p["notes"] or [
        f"chunk {p['chunk']}, sampler {p['sampler_s']} s, reward {p['reward_s']} s, learner {p['learner_s']} s, "
        f"payload {p['payload'] / MB:.2f} MB"]) for p in res["presets"]] + [""]
    lines += ["## Throughput and efficiency", "",
              "Each sweep varies one role; that role sleeps its planned per-call time, the other roles move their "
              "tensors without sleeping (so every second beyond the sleeps is coordination). Samplers: weak "
              "scaling (N chunks of the preset's chunk size per iteration; rewards = min(8, N/4), learners = "
              "min(8, N/8)); rewards / learners: 8 chunks per iteration from 8 samplers. Efficiency = throughput "
              "/ (N x throughput at N = 1). Per iteration (mean of the steady-state iterations, rank-0 learner): "
              "*submit* = issuing the remote calls; *object store* = waiting beyond the sleeps on the critical "
              "path + `ray.get` of its chunks (put, node-to-node transfer, get, scheduling); *sync* = weight push "
              "to the samplers (`serial`: `ActorPools.sync` as written, one verified `set_weights` after the "
              "other; `concurrent`: the same calls issued at once); `profile` rows: the sampler point at "
              f"N = {st['profile_n']} with the weight sync and / or the chunk bytes switched off; *driver* = iteration wall minus the slowest "
              "learner's loop (the per-iteration barrier).", ""]
    head = ["preset", "sweep", "sync", "N", "S/R/L", "samples/iter", "MB moved/iter", "iteration s", "ideal s",
            "samples/s", "efficiency", "submit s", "object store s", "(get) s", "sync s", "driver s", "nodes"]
    rows = [[p["preset"], p["sweep"], p["variant"] or p["sync"], p["n"], f"{p['S']}/{p['R']}/{p['L']}", p["samples"],
             f"{p['mbytes']:.0f}", f"{p['wall']:.3f}", f"{p['ideal']:.3f}", f"{p['throughput']:.2f}",
             f"{p['efficiency']:.1%}", f"{p['submit']:.3f}", f"{p['transfer']:.3f}", f"{p['fetch']:.3f}",
             f"{p['sync_s']:.3f}", f"{p['driver']:.3f}", p["nodes"]] for p in res["points"]]
    lines += _table(head, rows) + [""]
    video = [p for p in res["presets"] if p["time_scale"] != 1.0]
    for v in video:
        pts = [p for p in res["points"] if p["preset"] == v["name"]]
        lines += [f"{v['name']}: sleeps scaled by {v['time_scale']:g}, so its efficiency column understates the "
                  f"real one. Overhead per iteration (wall - ideal) against the real sampler call of "
                  f"{v['sampler_s']:.1f} s: " + ", ".join(
                      f"N={p['n']}: {p['wall'] - p['ideal']:.2f} s ({(p['wall'] - p['ideal']) / v['sampler_s']:.1%})"
                      for p in pts) + ".", ""]
    lines += ["## Weight sync", "",
              "Seconds until N receivers hold (have copied through a 64 MB buffer, as into GPU parameters) one "
              "trained state. (a) `verified`: `ActorPools.sync` as written — `ray.put`, then for each sampler in "
              "turn `set_weights(ref)`: get, load, sha256 of the loaded state, one probe call (sleep of one "
              "denoiser call at batch 1); (b) `broadcast`: one `ray.put`, every receiver `ray.get`s the same "
              "ref at once and loads it (no hash); (c) `gloo`: `torch.distributed` gloo on CPU among actors, the "
              "sender broadcasting 64 MB buckets (group set up beforehand, not timed). Best of "
              f"{st['repeats']} for LoRA sizes, 1 run for full sizes. sha256 here: {res['hash_gbps']:.2f} GB/s "
              "on one core (the verify cost per receiver; on a real cluster every sampler hashes on its own "
              "CPUs, in parallel).", ""]
    head = ["state", "MB", "tensors", "receivers", "nodes", "verified s", "broadcast s", "gloo s"]
    rows = []
    for size in dict.fromkeys(s["size"] for s in res["sync"]):
        for n in sorted({s["receivers"] for s in res["sync"] if s["size"] == size}):
            got = {s["method"]: s for s in res["sync"] if s["size"] == size and s["receivers"] == n}
            any_ = next(iter(got.values()))
            rows.append([size, f"{any_['bytes'] / MB:.1f}", any_["tensors"], n, any_["nodes"]]
                        + [f"{got[m]['seconds']:.3f}" if m in got else "-" for m in ("verified", "broadcast", "gloo")])
    lines += _table(head, rows) + [""]
    lines += [f"**Did not complete**: {e}" for e in res.get("errors", [])] + ([""] if res.get("errors") else [])
    if png:
        lines += [f"![efficiency vs N and weight sync time vs receivers]({png})", ""]
    lines += ["Actors ran on nodes: " + "; ".join(f"{role}: {len(set(ids))} node(s)" for role, ids in
                                                  res["nodes"].items()) + ".", ""]
    return "\n".join(lines)


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


READING = "## Reading"


def main(out: str | None, quick: bool = False, command: str = "rlr-dist bench scale",
         progress=print) -> tuple[str, dict]:
    """Run, write ``out`` (markdown, a PNG and the raw numbers as JSON beside it) and return the text and the
    numbers. A hand-written ``## Reading`` section already in ``out`` is kept."""
    import json

    old = Path(out).read_text() if out and Path(out).is_file() else ""
    reading = old[old.index(READING):] if READING in old else ""
    res = run(Settings.make(quick), progress)
    png = None
    if out:
        o = Path(out)
        o.parent.mkdir(parents=True, exist_ok=True)
        plot(res, o.with_suffix(".png"))
        png = o.with_suffix(".png").name
        o.with_suffix(".json").write_text(json.dumps(res, indent=1))
    text = report(res, command, png)
    if reading:
        text += "\n" + reading
    if out:
        Path(out).write_text(text)
    return text, res
