"""Peak activation memory of one learner step, per estimator, on a tiny diffusers UNet with CFG.

What is measured: the bytes of the tensors autograd saves for backward, counted with
:class:`rlr_dist.memory.SavedTensorMeter`. The peak of that counter is taken over the whole step: every term of the estimator is built
and back-propagated in turn by :func:`~rlr_dist.estimators.base.backward_terms`, exactly as the learner
does, so each graph is freed before the next one exists. Sampling runs under ``no_grad`` and is not part
of the step. Saved tensors that alias memory which exists anyway (parameters, buffers, the recorded
trajectory, ``∂R/∂x_0``, the text embeddings) are not counted: holding them costs nothing extra.

Gradient checkpointing (``full_bp`` with ``checkpoint=True``) installs its own saved-tensor hooks inside
each checkpointed call, so the counter sees only the inputs each checkpoint keeps (one latent per step)
and not the activations recomputed during backward. For those rows the saved bytes of one CFG model call
(measured separately, same batch) are added to the counted peak; the row's ``note`` says so.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from rlr_dist.chain.trajectory import Trajectory, sample
from rlr_dist.estimators import ESTIMATORS, Advantages, Batch, backward_terms
from rlr_dist.memory import MB, SavedTensorMeter

CKPT_NOTE = ("checkpointed: counted peak (saved tensors outside the checkpoints, incl. one kept input latent "
             "per step) + the saved bytes of one CFG model call recomputed during backward, measured separately")


# ---------------------------------------------------------------------------------------------------
# the setup


def tiny_text_unet(seed: int = 0):
    """The tiny ``UNet2DConditionModel`` of shared/docs/stack.md §4 (0.79 M parameters), in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return unet.eval()


def _chain(T: int, device: torch.device, seed: int, guidance_scale: float = 3.0, tokens: int = 8):
    from diffusers import DDIMScheduler

    from rlr_dist.chain import GaussianSchedule
    from rlr_dist.chain.denoiser import DenoiserChain, unet_fn

    model = unet_fn(tiny_text_unet(seed)).to(device).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    gen = torch.Generator().manual_seed(seed + 1)
    uncond = torch.randn(1, tokens, 32, generator=gen).to(device)
    chain = DenoiserChain(model, GaussianSchedule.from_diffusers(sched, T, eta=1.0),
                          guidance_scale=guidance_scale, uncond=uncond)
    return chain, model, uncond


def _configs(hs, sampled, truncated_Ks, T):
    """(label, estimator name, kwargs) in report order."""
    out = [(f"rlr h={h} zo=lr", "rlr", dict(h=h, zo="lr")) for h in hs]
    if sampled is not None:
        h, K = sampled
        out.append((f"rlr h={h} zo=lr_sampled K={K}", "rlr", dict(h=h, zo="lr_sampled", K=K)))
    out.append(("lr (DDPO)", "lr", {}))
    for K in sorted({min(int(K), T) for K in truncated_Ks}):
        out.append((f"truncated_bp K={K}", "truncated_bp", dict(K=K)))
    out.append(("full_bp", "full_bp", dict(checkpoint=False)))
    out.append(("full_bp checkpoint", "full_bp", dict(checkpoint=True)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def activation_memory(T: int = 50, batch: int = 2, hs=(1, 2, 4), seed: int = 0,
                      progress: Callable[[str], None] | None = print, truncated_Ks=(1, 10),
                      sampled: tuple[int, int] | None = (2, 4), device: str | torch.device | None = None) -> list[dict]:
    """Peak activation memory of one learner step for each estimator (see the module docstring).

    Rows, in order: ``rlr`` with ``zo="lr"`` for each h in ``hs``; ``rlr`` with ``zo="lr_sampled"`` for
    ``sampled = (h, K)``; ``lr`` (DDPO); ``truncated_bp`` for each K in ``truncated_Ks`` (clipped to T);
    ``full_bp`` without and with checkpointing. Each row is a dict with ``estimator``,
    ``model_calls_backpropagated``, ``peak_bytes``, ``ratio_vs_full_bp``, ``ratio_vs_full_bp_ckpt``,
    ``seconds`` (the step, sampling excluded), ``trajectory_bytes`` (what selective recording stored),
    ``cuda_peak_bytes`` (allocator peak above the pre-step baseline, CUDA only, else None), ``note``,
    plus ``counted_peak_bytes`` (the raw counter), ``model_call_bytes``, ``T``, ``batch``, ``device``.
    ``device`` defaults to CUDA when available.
    """
    say = progress or (lambda s: None)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chain, model, uncond = _chain(T, dev, seed)
    params = chain.trainable_parameters()
    gen = torch.Generator().manual_seed(seed + 2)
    cond = torch.randn(batch, uncond.shape[1], uncond.shape[2], generator=gen).to(dev)
    x_T = torch.randn(batch, 4, 16, 16, generator=gen).to(dev)
    target = torch.randn(batch, 4, 16, 16, generator=gen).to(dev)
    prompt_ids = torch.arange(batch)
    static = [*params, *model.buffers(), cond, uncond, x_T, target]

    # model calls that build a graph to be back-propagated (not sampling, not checkpoint recomputation)
    calls = [0]

    def count_call(module, args):
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            calls[0] += 1

    handle = model.register_forward_pre_hook(count_call)

    # saved bytes of one CFG model call (what a checkpoint recomputes during backward)
    with SavedTensorMeter(static) as m:
        mu = chain.mean(x_T, T, cond)
    call_bytes = m.peak
    del mu
    calls[0] = 0
    say(f"memory bench: T={T} batch={batch} device={dev}; one CFG model call saves {call_bytes / MB:.2f} MB")

    def run(label: str, name: str, kwargs: dict) -> dict:
        est = ESTIMATORS.build(name, **kwargs)
        est.check(chain.schedule)
        plan = est.plan(chain.schedule, torch.Generator().manual_seed(seed))
        sgen = torch.Generator(device=dev).manual_seed(seed)
        traj: Trajectory = sample(chain, x_T, plan, cond=cond, generator=sgen, prompt_ids=prompt_ids, seed=seed)
        d = traj.x0 - target
        R = -d.flatten(1).pow(2).sum(1)
        dR = -2 * d
        b = Batch(traj, chain, R, dR, advantages=Advantages("loo"))
        for p in params:  # gradients exist before the step (as after the first one), so they are baseline
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        exclude = static + [traj.x0, *traj.x.values(), *traj.eps.values(), R, dR]
        calls[0] = 0
        cuda_peak = None
        _sync(dev)
        if dev.type == "cuda":
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with SavedTensorMeter(exclude) as meter:
            backward_terms(est.terms(b), params)
        _sync(dev)
        seconds = time.perf_counter() - t0
        if dev.type == "cuda":
            cuda_peak = torch.cuda.max_memory_allocated(dev) - base
        if meter.live != 0:
            raise RuntimeError(f"{label}: {meter.live} saved bytes still held after the step")
        ckpt = name == "full_bp" and kwargs.get("checkpoint", True)
        peak = meter.peak + (call_bytes if ckpt else 0)
        return {"estimator": label, "model_calls_backpropagated": calls[0], "peak_bytes": peak,
                "counted_peak_bytes": meter.peak, "ratio_vs_full_bp": None, "ratio_vs_full_bp_ckpt": None,
                "seconds": seconds, "trajectory_bytes": traj.nbytes(), "cuda_peak_bytes": cuda_peak,
                "model_call_bytes": call_bytes, "note": CKPT_NOTE if ckpt else "", "T": T, "batch": batch,
                "device": str(dev)}

    configs = _configs(hs, sampled, truncated_Ks, T)
    rows: dict[str, dict] = {}
    try:
        # full backprop first, so each progress line can show the ratios
        for label, name, kwargs in configs[-2:] + configs[:-2]:
            r = rows[label] = run(label, name, kwargs)
            full, ckpt = rows.get("full_bp"), rows.get("full_bp checkpoint")
            if full and ckpt:
                for row in rows.values():
                    row["ratio_vs_full_bp"] = row["peak_bytes"] / full["peak_bytes"]
                    row["ratio_vs_full_bp_ckpt"] = row["peak_bytes"] / ckpt["peak_bytes"]
            ratio = "" if r["ratio_vs_full_bp"] is None else \
                f" ({r['ratio_vs_full_bp']:.3f}x full_bp, {r['ratio_vs_full_bp_ckpt']:.2f}x checkpointed)"
            cuda = "" if r["cuda_peak_bytes"] is None else f", CUDA peak {r['cuda_peak_bytes'] / MB:.2f} MB"
            say(f"  {label:<28} calls={r['model_calls_backpropagated']:>3}  peak {r['peak_bytes'] / MB:8.2f} MB{ratio}"
                f"{cuda}, trajectory {r['trajectory_bytes'] / MB:.3f} MB, {r['seconds']:.1f}s")
    finally:
        handle.remove()
    return [rows[label] for label, _, _ in configs]


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`activation_memory`'s rows."""
    mb = lambda v: "–" if v is None else f"{v / MB:.2f}"  # noqa: E731
    lines = ["| estimator | calls back-propagated | peak activations (MB) | / full_bp | / full_bp ckpt | "
             "trajectory (MB) | CUDA peak (MB) | step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['model_calls_backpropagated']} | {mb(r['peak_bytes'])} | "
                     f"{r['ratio_vs_full_bp']:.3f} | {r['ratio_vs_full_bp_ckpt']:.2f} | {r['trajectory_bytes'] / MB:.3f} | "
                     f"{mb(r['cuda_peak_bytes'])} | {r['seconds']:.1f}s |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(activation_memory()))
