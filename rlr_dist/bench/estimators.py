"""`rlr-dist bench estimators`: variance and bias of every estimator on the same toy chain, side by side,
plus peak activation memory of one learner step on a tiny diffusers UNet; writes a markdown report.

Variance is ``tr Cov`` of one batch-mean gradient (batch of ``m`` trajectories, its own plan draw), with a
bootstrap CI over optimiser steps; bias is measured against a long full-backprop reference with a
Bonferroni max-|z| test (spec §11.3–11.4).
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import torch

from rlr_dist.estimators import ESTIMATORS
from rlr_dist.chain.tiny import MLPChain, bump_reward
from rlr_dist.estimators.montecarlo import batch_variance, bonferroni_threshold, call_means, estimate, z_scores

SCHEDULES = {
    "logsnr": "log-SNR toy schedule (ᾱ = sigmoid(λ), λ linear 6 → −4)",
    "sd": "Stable Diffusion 1.x schedule (scaled-linear β, 1000 train steps, leading spacing, ᾱ_0 = ᾱ(t=0))",
}

# (label, estimator name, kwargs, batches per call). Batches of one call share its plan draw. SPSA
# shares one perturbation per call (batches would mix their perturbations), and K-sampled steps make
# call means heavy-tailed (kurtosis ~50 at T = 50 with 200 draws, so the z-test's normal approximation
# fails): both get one batch per call, i.e. an independent plan for every batch.
CONFIGS: list[tuple[str, str, dict, int]] = [
    ("full BP", "full_bp", {}, 10),
    ("RLR h=1 (ZO-LR all)", "rlr", dict(h=1), 10),
    ("RLR h=2 (ZO-LR all)", "rlr", dict(h=2), 10),
    ("RLR h=4 (ZO-LR all)", "rlr", dict(h=4), 10),
    ("RLR h=2 (ZO-LR K=4 sampled)", "rlr", dict(h=2, zo="lr_sampled", K=4), 1),
    ("RLR h=2 (ZO SPSA s=1e-2)", "rlr", dict(h=2, zo="spsa", spsa_scale=1e-2), 1),
    ("pure LR (DDPO)", "lr", {}, 10),
    ("truncated BP K=1", "truncated_bp", dict(K=1), 10),
    ("truncated BP K=10", "truncated_bp", dict(K=10), 10),
]


@dataclass
class Row:
    T: int
    schedule: str
    label: str
    variance: float
    var_lo: float
    var_hi: float
    rel_bias: float
    max_z: float
    z_bound: float
    seconds: float
    batches: int


def _bootstrap_variance(est: torch.Tensor, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    n = est.shape[0]
    vals = sorted(batch_variance(est[torch.randint(0, n, (n,), generator=gen)]) for _ in range(reps))
    return vals[int(0.025 * reps)], vals[int(0.975 * reps) - 1]


def variance_table(T: int, batches: int, m: int = 64, seed: int = 0, schedule: str = "logsnr",
                   progress: Callable[[str], None] = print) -> list[Row]:
    t0 = time.time()
    tag = f"T={T} {schedule}"
    ref_chain = MLPChain(T=T, G=50, seed=seed, schedule=schedule)
    ref = call_means(estimate(ref_chain, ESTIMATORS.build("full_bp"), bump_reward, max(4, 4 * batches // 50), m=m, seed=10_000 + seed))
    ref_mean, ref_se = ref.mean(0), ref.std(0) / math.sqrt(ref.shape[0])
    progress(f"[{tag}] reference: full BP, {4 * batches} batches of {m} in {time.time() - t0:.1f}s")
    rows = []
    for i, (label, name, kw, G) in enumerate(CONFIGS):
        t1 = time.time()
        calls = max(2, batches // G)
        est = estimate(MLPChain(T=T, G=G, seed=seed, schedule=schedule), ESTIMATORS.build(name, **kw), bump_reward, calls, m=m, seed=seed + 1 + i)
        cm = call_means(est)
        z = z_scores(cm, ref_mean, ref_se)
        P = int((cm.std(0) > 0).sum())
        lo, hi = _bootstrap_variance(est)
        rows.append(Row(T, schedule, label, batch_variance(est), lo, hi,
                        float((cm.mean(0) - ref_mean).norm() / ref_mean.norm()),
                        float(z.abs().max()), bonferroni_threshold(P), time.time() - t1, calls * G))
        done = i + 1
        rate = (time.time() - t0) / done
        progress(f"[{tag}] {done}/{len(CONFIGS)} {label}: V={rows[-1].variance:.4g} max|z|={rows[-1].max_z:.1f} "
                 f"({rows[-1].seconds:.1f}s, ETA {rate * (len(CONFIGS) - done):.0f}s)")
    return rows


def _fmt_mb(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:.2f}"


def report(tables: dict[tuple[int, str], list[Row]], memory: list[dict] | None, m: int, elapsed: float) -> str:
    lines = [
        "# Estimator benchmark",
        "",
        f"Made by `rlr-dist bench estimators` on {date.today().isoformat()} ({platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}); total {elapsed / 60:.1f} min.",
        "",
        "## Variance and bias on the toy chain",
        "",
        f"Tiny MLP chain (D = 2, hidden 8, shared weights, DDIM η = 1, float64), reward "
        f"`exp(−‖x−a‖²/2) + 0.5 tanh(wᵀx)`, batch of {m} trajectories, leave-one-out baseline. "
        "V = trace of the covariance of one batch-mean gradient (its own draw of j / sampled steps), "
        "95 % bootstrap CI over optimiser steps. Bias: relative error of the mean against a 4× longer "
        "full-backprop reference, and max |z| over coordinates against the Bonferroni bound (α = 1e-3).",
        "",
    ]
    for (T, sch), rows in tables.items():
        lr = next(r for r in rows if r.label.startswith("pure LR"))
        lines += [f"### T = {T}, {SCHEDULES[sch]}", "",
                  "| estimator | V (95 % CI) | V / V(pure LR) | rel. bias | max \\|z\\| (bound) | unbiased? | batches | time |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ok = "yes" if r.max_z < r.z_bound else "**no**"
            lines.append(f"| {r.label} | {r.variance:.4g} ({r.var_lo:.4g}–{r.var_hi:.4g}) | {r.variance / lr.variance:.3f} | "
                         f"{r.rel_bias:.3f} | {r.max_z:.1f} ({r.z_bound:.1f}) | {ok} | {r.batches} | {r.seconds:.0f}s |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met? |", "|---|---|---|"]
    for (T, sch), rows in tables.items():
        T = f"{T} ({sch})"
        rlr = [r for r in rows if r.label.startswith("RLR")]
        worst = max(rlr, key=lambda r: r.max_z / r.z_bound)
        lines.append(f"| RLR unbiased, T={T} (all RLR rows max\\|z\\| < bound) | worst {worst.label}: "
                     f"{worst.max_z:.1f} vs {worst.z_bound:.1f} | {'yes' if all(r.max_z < r.z_bound for r in rlr) else 'no'} |")
        h1 = next(r for r in rows if r.label.startswith("RLR h=1"))
        lr = next(r for r in rows if r.label.startswith("pure LR"))
        ratio = h1.variance / lr.variance
        lines.append(f"| V(RLR h=1) / V(pure LR) ≤ 0.5, T={T} | {ratio:.3f} | {'yes' if ratio <= 0.5 else 'no'} |")
    if memory:
        r2 = next((r for r in memory if r["estimator"].startswith("rlr h=2") and "zo=lr" in r["estimator"]
                   and "sampled" not in r["estimator"]), None)
        if r2 is not None:
            lines.append(f"| memory(RLR h=2) / memory(full BP) ≤ 0.1 | {r2['ratio_vs_full_bp']:.3f} (vs checkpointed full BP: "
                         f"{r2['ratio_vs_full_bp_ckpt']:.3f}) | {'yes' if r2['ratio_vs_full_bp'] <= 0.1 else 'no'} |")
        lines += ["", "## Peak activation memory of one learner step", "",
                  "Tiny `UNet2DConditionModel` with CFG (both branches trained), T = 50 DDIM steps; bytes of the tensors "
                  "autograd saves for backward, peak over the step (each term back-propagated and freed in turn, as the "
                  "learner does). Sampling is no-grad and excluded.", "",
                  "| estimator | model calls back-propagated | peak activations (MB) | / full BP | / full BP (checkpointed) | recorded trajectory (MB) | CUDA peak (MB) | step time |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in memory:
            lines.append(f"| {r['estimator']} | {r['model_calls_backpropagated']} | {_fmt_mb(r['peak_bytes'])} | "
                         f"{r['ratio_vs_full_bp']:.3f} | {r['ratio_vs_full_bp_ckpt']:.2f} | {_fmt_mb(r['trajectory_bytes'])} | "
                         f"{_fmt_mb(r.get('cuda_peak_bytes'))} | {r['seconds']:.1f}s |")
        notes = sorted({r["note"] for r in memory if r.get("note")})
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(Ts=(20, 50), batches: int = 2000, m: int = 64, memory: bool = True, memory_T: int = 50,
         schedules=("logsnr", "sd"), out: str | None = "docs/results/estimators.md",
         progress: Callable[[str], None] = print) -> str:
    """Every T on the smooth log-SNR toy schedule; the largest T also on Stable Diffusion's schedule."""
    t0 = time.time()
    runs = [(T, "logsnr") for T in Ts if "logsnr" in schedules]
    runs += [(max(Ts), s) for s in schedules if s != "logsnr"]
    tables = {(T, s): variance_table(T, batches, m, schedule=s, progress=progress) for T, s in runs}
    mem = None
    if memory:
        from rlr_dist.bench.memory import activation_memory

        mem = activation_memory(T=memory_T, progress=progress)
    text = report(tables, mem, m, time.time() - t0)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        progress(f"wrote {path}")
    return text
