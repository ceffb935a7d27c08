"""`rlr-dist bench gpu` (also ``python -m rlr_dist.bench.gpu``): sampler throughput, learner step time and
peak memory of real-size networks with random weights, and the planner's estimate beside every measured peak.

For each architecture preset of :mod:`rlr_dist.planner` the denoiser is built from its published config with
random weights on the device (no download). It runs behind the layout's own adapter (:mod:`rlr_dist.models`),
so the sampler is :func:`rlr_dist.chain.trajectory.sample` on ``DiffusionModel.chain()`` and the learner step
is :func:`rlr_dist.train.step.learn` + AdamW, exactly the code a training run executes. What is not built:
the text encoders (the condition is a random tensor of the shape they produce) and the VAE (only its config
is read, on the meta device); the reward is ``-||x₀ - target||²`` on the latent, so ``∂R/∂x₀`` exists without
a decoder. bf16 (``model.mixed_precision: bf16``), SDPA attention, CFG with ``guidance_scale`` 4.5.

Peak TFLOPS come from a timed bf16 matmul on the same device in the same run; sampler FLOPs per call from
the planner's meta-device count (:func:`rlr_dist.planner.unet_profile`). Out-of-memory is a result ("does
not fit"). On a machine without CUDA (``--tiny``, chosen automatically) the same code runs on the project's
tiny stand-ins (:func:`rlr_dist.models.tiny.build_tiny`) in seconds; peak memory is then the saved-tensor
peak of :class:`rlr_dist.memory.SavedTensorMeter` (activations only), compared with the planner's activations.

Imports only torch / diffusers / transformers / peft / safetensors / yaml and the project's pure modules (no
Ray, DeepSpeed or MLflow): it runs on a bare GPU machine with a carried diffusers wheel (docs/gpu-bench.md).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rlr_dist import planner as P
from rlr_dist.memory import SavedTensorMeter

MB, GB = 2**20, 1e9
DEFAULT_ARCHS = ("sd15", "sd35-medium", "wan21-t2v-1.3b")
GUIDANCE = 4.5
# shapes of the default run (model config keys); the rest is the preset's published resolution
# (the planner puts an un-checkpointed rlr h=2 step of Wan 1.3B at 17 frames, chunk 1, near 140 GB: 9 frames)
SHAPES = {"wan21-t2v-1.3b": {"num_frames": 9}, "wan21-t2v-14b": {"num_frames": 9},
          "modelscope": {"num_frames": 16}, "zeroscope": {"num_frames": 16}}
# the tiny stand-ins' sizes (their rotary tables are short: not the layouts' default resolution)
TINY_SHAPES = {"sd3": {"resolution": 32}, "flux": {"resolution": 32}, "wan": {"resolution": 32}}
# the published scheduler of each layout (the presets carry only network configs)
_DDIM_SD = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
SCHEDULERS = {"sd": _DDIM_SD, "t2v": _DDIM_SD,
              "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
              "flux": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
                       "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
              "wan": {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                      "use_flow_sigmas": True, "flow_shift": 3.0, "num_train_timesteps": 1000}}
# (label, estimator, its parameters, model.gradient_checkpointing); per-block rows only where the adapter has it
ESTIMATOR_CASES = [("rlr h=1", "rlr", {"h": 1}, False), ("rlr h=2", "rlr", {"h": 2}, False),
                   ("rlr h=4", "rlr", {"h": 4}, False), ("lr", "lr", {}, False),
                   ("truncated_bp K=1", "truncated_bp", {"K": 1}, False),
                   ("full_bp", "full_bp", {"checkpoint": False}, False),
                   ("full_bp ckpt per call", "full_bp", {"checkpoint": True}, False),
                   ("full_bp ckpt per block", "full_bp", {"checkpoint": False}, True)]
FULL_FT_CASES = ("rlr h=2", "lr")      # full fine-tuning: fewer rows (each holds a reference copy + AdamW state)


class BenchError(ValueError):
    """A bad argument; the message names the flag."""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def peak_tflops(dev: torch.device, n: int, repeats: int = 5) -> float:
    """Dense bf16 TFLOPS of an ``n``³ matmul on ``dev`` (best of ``repeats`` after a warm-up)."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    a @ b
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


# ------------------------------------------------------------------------------------------------- the model
def _config_folder(root: Path, arch: P.Arch, frames: int) -> Path:
    """A diffusers folder holding only configs (no weights): what the adapters read shapes and schedules from."""
    from rlr_dist.models import MODELS

    cls = MODELS.get(arch.layout, "model.layout")
    root.mkdir(parents=True, exist_ok=True)
    for sub, conf in ((cls.denoiser_folder, {"_class_name": arch.unet_class, **arch.unet}),
                      ("vae", {"_class_name": arch.vae_class, **(arch.vae or {})}),
                      ("scheduler", SCHEDULERS[arch.layout])):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")).write_text(json.dumps(conf))
    (root / "model_index.json").write_text(json.dumps({cls.denoiser_folder: ["diffusers", arch.unet_class]}))
    (root / "rlr_model.json").write_text(json.dumps({"layout": arch.layout, "frames": frames}))
    return root


def _cond(arch: P.Arch, batch: int, dev: torch.device) -> torch.Tensor:
    """A random condition of the shape the layout's text encoders give (packed sequence + pooled for SD3/FLUX)."""
    from rlr_dist.models.text import pack_cond

    g = torch.Generator().manual_seed(batch)
    u = arch.unet
    if arch.layout in ("sd3", "flux"):
        out = pack_cond(torch.randn(batch, arch.tokens, u["joint_attention_dim"], generator=g),
                        torch.randn(batch, u["pooled_projection_dim"], generator=g))
    else:
        out = torch.randn(batch, arch.tokens, u.get("text_dim", u.get("cross_attention_dim", 1280)), generator=g)
    return out.to(dev)


def build_model(arch: P.Arch, folder: Path, model_cfg, dev: torch.device):
    """The layout's adapter around a denoiser built from ``arch``'s config with random weights on ``dev``."""
    from rlr_dist.models import MODELS

    base = MODELS.get(arch.layout, "model.layout")

    def load_unet(self):
        import diffusers

        with torch.device(dev):
            return getattr(diffusers, arch.unet_class).from_config({k: v for k, v in arch.unet.items()
                                                                     if not k.startswith("_")})

    def load_components(self):
        from rlr_dist.models.text import PromptCache

        self.vae = P._build(arch.vae_class, arch.vae)  # meta device: its config gives the latent shape
        self.frames, self._null, self.prompts = arch.frames, None, PromptCache()

    def encode_prompts(self, prompts):
        return _cond(arch, len(prompts), self.device)

    cls = type(f"Bench{base.__name__}", (base,), {"_load_unet": load_unet, "load_components": load_components,
                                                  "encode_prompts": encode_prompts,
                                                  "null_cond": lambda self: encode_prompts(self, [""]),
                                                  "frozen_attributes": ()})
    return cls(folder, model_cfg, {"layout": arch.layout, "frames": arch.frames}).to(dev)


def _model_cfg(arch_name: str, tiny: bool, steps: int, finetune: str, rank: int, per_block: bool, extra: dict):
    from rlr_dist.config import build
    from rlr_dist.models.config import ModelConfig

    layout = _layout(arch_name)
    d = {"path": "bench", "num_inference_steps": steps, "guidance_scale": GUIDANCE, "mixed_precision": "bf16",
         "finetune": finetune, "lora": {"rank": rank}, "gradient_checkpointing": per_block,
         "text_encoder_device": "cpu", "last_step_eta": None, "sampler": "flow" if layout in ("sd3", "flux", "wan") else "ddim",
         **(TINY_SHAPES.get(layout, {}) if tiny else SHAPES.get(arch_name, {})), **extra}
    return build(ModelConfig, d, "model")


def _layout(arch_name: str) -> str:
    from rlr_dist.models.base import layout_of_unet_class

    return layout_of_unet_class(P.PRESETS[arch_name]["unet_class"])


def _arch(arch_name: str, tiny: bool, model_cfg, root: Path) -> P.Arch:
    """The preset's architecture, or on ``--tiny`` the architecture of the tiny stand-in of its layout."""
    if not tiny:
        return P.arch_of(model_cfg, arch_name)
    from rlr_dist.models.tiny import build_tiny

    layout = _layout(arch_name)
    folder = root / f"tiny-{layout}"
    if not folder.exists():
        build_tiny(layout, folder, frames=5 if layout == "wan" else 3)
    model_cfg.path = str(folder)
    return P.arch_of(model_cfg)


# ----------------------------------------------------------------------------------------------- measuring
class Clock:
    """Elapsed time, the overall budget, and progress lines with an ETA over the planned cases."""

    def __init__(self, budget: float, cases: int, say) -> None:
        self.t0, self.budget, self.cases, self.done, self.say = time.perf_counter(), budget, cases, 0, say

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed > self.budget

    def tick(self, line: str) -> None:
        self.done += 1
        eta = self.elapsed / self.done * max(self.cases - self.done, 0)
        self.say(f"[{self.elapsed:6.0f} s, ETA {eta:4.0f} s] {line}")


def sampler_rows(model, arch, prof, steps, batches, tflops, case_limit, clock) -> list[dict]:
    from rlr_dist.chain.trajectory import Plan, sample

    dev, rows = model.device, []
    chain = model.chain()
    cfg_mult = 2 if model.cfg.guidance_scale != 1.0 else 1
    for B in batches:
        row = {"arch": arch, "batch": B, "T": steps}
        if clock.over():
            row["status"] = "skipped (budget)"
        else:
            try:
                cond = model.encode_prompts([""] * B)
                x = model.initial_noise(B, torch.Generator(device=dev).manual_seed(0))
                with torch.no_grad():
                    chain.mean(x, steps, cond)  # warm-up: kernels, allocator
                _sync(dev)
                t0 = time.perf_counter()
                sample(chain, x, Plan(), cond, torch.Generator(device=dev).manual_seed(1))
                _sync(dev)
                s = time.perf_counter() - t0
                call = s / steps
                flops = prof.flops * B * cfg_mult
                row.update(status="ok", seconds=s, per_call_s=call, samples_per_s=B / s, call_tflop=flops / 1e12,
                           achieved_tflops=flops / call / 1e12, fraction_of_peak=flops / call / 1e12 / tflops)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "does not fit"
            _free(dev)
        rows.append(row)
        clock.tick(f"{arch} sampler batch {B}: {row['status']}" + (
            f", {row['samples_per_s']:.2f} samples/s, {row['per_call_s'] * 1e3:.0f} ms/call, "
            f"{row['fraction_of_peak']:.0%} of peak" if row["status"] == "ok" else ""))
        if row.get("seconds", 0) > case_limit:
            for b in batches[batches.index(B) + 1:]:
                rows.append({"arch": arch, "batch": b, "T": steps, "status": f"skipped (batch {B} took > {case_limit:g} s)"})
                clock.tick(f"{arch} sampler batch {b}: skipped")
            break
    return rows


def learner_step(model, estimator, batch: int, seed: int = 0) -> tuple[float, float]:
    """One optimiser step (``learn`` + AdamW) on a freshly sampled chunk: ``(seconds, peak bytes)``. Peak: the
    CUDA allocator's maximum during the step, or on CPU the saved-tensor peak (activations only)."""
    from rlr_dist.estimators import Advantages
    from rlr_dist.regularisers import REGULARISERS
    from rlr_dist.train import step

    dev = model.device
    estimator.check(model.schedule())
    work = step.with_plan(step.Work([""] * batch, list(range(batch)), seed=seed), estimator, model.schedule())
    chunk = step.rollout(model, work, version=0)
    target = torch.randn(chunk.traj.x0.shape, generator=torch.Generator().manual_seed(seed))
    d = chunk.traj.x0.float() - target
    chunk.reward, chunk.reward_grad = -d.flatten(1).pow(2).sum(1), -2 * d
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-6)
    opt.zero_grad(set_to_none=True)
    _free(dev)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # CPU: count saved tensors (no allocator peak there); CUDA: the allocator's peak, no Python hooks in the timing
    meter = SavedTensorMeter([*model.unet.parameters(), *model.unet.buffers()]) if dev.type != "cuda" else nullcontext()
    t0 = time.perf_counter()
    try:
        with meter:
            step.learn(model, estimator, REGULARISERS.build("kl_exact", beta=0.01), Advantages("loo"), [chunk],
                       chunk.reward)
        opt.step()
        _sync(dev)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else meter.peak
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
    return seconds, peak


def planned(model_cfg, arch: P.Arch, est: str, kw: dict, batch: int, gpu: str) -> tuple[float, float]:
    """``(learner bytes the planner expects of what this bench holds, its activations)``: the learner role
    of ``rlr_dist.planner.plan`` minus the frozen VAE / text encoders, which the bench does not build."""
    from rlr_dist.config import build, to_dict
    from rlr_dist.train.config import TrainConfig

    # a built-in reward (the default one is a toy-world plug-in, registered only where the package is installed)
    reward = {"name": "temporal_consistency" if arch.frames > 1 else "brightness"}
    cfg = build(TrainConfig, {"model": to_dict(model_cfg), "estimator": {"name": est, **kw}, "reward": reward,
                              "train": {"prompts_per_iteration": 1, "samples_per_prompt": batch},
                              "cluster": {"samplers": {"count": 1}, "learners": {"count": 1}}})
    role = next(r for r in P.plan(cfg, gpu, arch) if r.name == "learner")
    return role.total - role.memory["frozen vae + text encoder"], role.memory["activations"]


def learner_rows(arch_name, tiny, root, dev, args, clock) -> list[dict]:
    from rlr_dist.estimators import ESTIMATORS
    from rlr_dist.models import MODELS

    rows = []
    groups = [("lora", args.lora_rank, False), ("lora", args.lora_rank, True), ("full", args.lora_rank, False)]
    for finetune, rank, per_block in groups:
        cases = [c for c in ESTIMATOR_CASES if c[3] == per_block and (finetune == "lora" or c[0] in FULL_FT_CASES)]
        mcfg = _model_cfg(arch_name, tiny, args.steps, finetune, rank, per_block, {})
        arch = _arch(arch_name, tiny, mcfg, root)
        if per_block and not MODELS.get(arch.layout, "model.layout").checkpoints_blocks:
            continue
        label = f"LoRA r={rank}" if finetune == "lora" else "full"
        model, why = None, None
        if clock.over():
            why = "skipped (budget)"
        else:
            try:
                model = build_model(arch, _config_folder(root / f"{arch_name}-cfg", arch, arch.frames), mcfg, dev)
            except torch.cuda.OutOfMemoryError:
                why = "does not fit (model + reference)"
        for case, est, kw, _ in cases:
            row = {"arch": arch_name, "finetune": label, "estimator": case, "batch": args.learner_batch}
            try:
                row["planned_bytes"], row["planned_activations"] = planned(mcfg, arch, est, kw, args.learner_batch, args.gpu)
            except P.PlanError as e:
                row["planned_bytes"] = row["planned_activations"] = None
                row["plan_note"] = str(e)
            if why or model is None or clock.over():
                row["status"] = why or "skipped (budget)"
            else:
                try:
                    row["seconds"], row["peak_bytes"] = learner_step(model, ESTIMATORS.build(est, **kw),
                                                                     args.learner_batch)
                    row["status"] = "ok"
                    ref = row["planned_bytes"] if dev.type == "cuda" else row["planned_activations"]
                    # on CPU the saved-tensor counter cannot see activations recomputed inside a checkpoint
                    hidden = dev.type != "cuda" and (kw.get("checkpoint") or per_block)
                    row["plan_error"] = None if hidden or not ref or not row["peak_bytes"] else ref / row["peak_bytes"] - 1
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "does not fit"
                except ValueError as e:  # the estimator does not apply to this chain (e.g. h > T - 1)
                    row["status"] = f"n/a: {e}"
                _free(dev)
            rows.append(row)
            clock.tick(f"{arch_name} learner {label} {case}: {row['status']}" + (
                f", {row['seconds']:.2f} s, peak {row['peak_bytes'] / MB:.0f} MB" if row["status"] == "ok" else ""))
        del model
        _free(dev)
    return rows


# ------------------------------------------------------------------------------------------------- report
def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def render(res: dict) -> str:
    cuda = res["device"]["type"] == "cuda"
    mem = "peak allocated (torch.cuda.max_memory_allocated)" if cuda else \
        "saved-tensor peak (SavedTensorMeter; activations only; CPU: no allocator peak)"
    ref = "planner learner total minus the frozen VAE / text encoders (not built here)" if cuda else \
        "planner activations"
    d = res["device"]
    lines = ["# GPU benchmark" + (" (tiny CPU stand-ins)" if res["tiny"] else ""), "",
             f"`{res['command']}` — `rlr_dist/bench/gpu.py`, {res['seconds']:.0f} s. Device: **{d['name']}**; "
             f"torch {d['torch']}, CUDA {d['cuda'] or 'none'}, diffusers {d['diffusers']}, Python {d['python']}.",
             f"Peak measured in this run: **{res['peak_tflops']:.3g} TFLOPS** (bf16 {res['matmul_n']}³ matmul, best of 5).",
             "", "Random-weight networks built from the presets' published configs, bf16 (`mixed_precision: bf16`), "
             f"SDPA attention, CFG {GUIDANCE}; text encoders and VAE not built (random condition, latent reward).",
             "", "## Sampler", "",
             "| arch | batch | T | status | samples/s | ms per call | TFLOP per call | achieved TFLOPS | of peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["sampler"]:
        lines.append(f"| {r['arch']} | {r['batch']} | {r['T']} | {r['status']} | {_num(r.get('samples_per_s'), '.2f')} | "
                     f"{_num(r.get('per_call_s') and r['per_call_s'] * 1e3, '.1f')} | {_num(r.get('call_tflop'), '.3g')} | "
                     f"{_num(r.get('achieved_tflops'), '.3g')} | {_num(r.get('fraction_of_peak'), '.1%')} |")
    lines += ["", "## Learner (one optimiser step: `rlr_dist.train.step.learn` + AdamW) and planner check", "",
              f"Memory: {mem}. Planned: {ref}. Error = planned / measured − 1"
              + ("." if cuda else "; none for checkpointed rows (the counter does not see recomputed activations)."), "",
              "| arch | fine-tuning | estimator | batch | status | step s | peak MB | planned MB | error |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["learner"]:
        planned = r.get("planned_bytes") if cuda else r.get("planned_activations")
        lines.append(f"| {r['arch']} | {r['finetune']} | {r['estimator']} | {r['batch']} | {r['status']} | "
                     f"{_num(r.get('seconds'), '.2f')} | {_num(r.get('peak_bytes') and r['peak_bytes'] / MB, '.4g')} | "
                     f"{_num(planned and planned / MB, '.4g')} | {_num(r.get('plan_error'), '+.1%')} |")
    return "\n".join(lines) + "\n"


def _device_info(dev: torch.device) -> dict:
    import diffusers

    cuda = dev.type == "cuda"
    return {"type": dev.type, "name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "CPU",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "diffusers": diffusers.__version__, "python": platform.python_version()}


def run(archs=DEFAULT_ARCHS, out: str | None = "docs/results/gpu.md", tiny: bool | None = None, steps: int = 8,
        batches=(1, 2, 4, 8), learner_batch: int = 1, lora_rank: int = 64, budget: float = 450.0,
        case_limit: float = 60.0, gpu: str = "h200-141gb", say=print, command: str = "rlr-dist bench gpu") -> dict:
    """Every table (see the module docstring); writes ``out`` (markdown) and the JSON beside it."""
    for a in archs:
        if a not in P.PRESETS:
            raise BenchError(f"--arch: unknown preset {a!r}; one of {sorted(P.PRESETS)}")
    if gpu not in P.GPUS:
        raise BenchError(f"--gpu: unknown GPU {gpu!r}; one of {sorted(P.GPUS)}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = dev.type != "cuda" if tiny is None else tiny
    if tiny:
        steps, batches, lora_rank = min(steps, 6), tuple(b for b in batches if b <= 2) or (1,), min(lora_rank, 4)
    args = argparse.Namespace(steps=steps, learner_batch=learner_batch, lora_rank=lora_rank, gpu=gpu)
    n = 1024 if tiny else 8192
    tflops = peak_tflops(dev, 256 if dev.type == "cpu" else n)
    say(f"bench gpu: {dev} ({'tiny stand-ins' if tiny else 'full-size presets'}), peak {tflops:.3g} bf16 TFLOPS")
    per_arch = len(batches) + 2 * len(FULL_FT_CASES) + len(ESTIMATOR_CASES)
    clock = Clock(budget, per_arch * len(archs), say)
    res = {"tiny": tiny, "peak_tflops": tflops, "matmul_n": 256 if dev.type == "cpu" else n, "sampler": [],
           "learner": [], "device": _device_info(dev), "command": command}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for a in archs:
            mcfg = _model_cfg(a, tiny, steps, "lora", lora_rank, False, {})
            arch = _arch(a, tiny, mcfg, root)
            prof, _ = P.unet_profile(arch)
            model = None
            try:
                model = build_model(arch, _config_folder(root / f"{a}-cfg", arch, arch.frames), mcfg, dev)
                res["sampler"] += sampler_rows(model, a, prof, steps, list(batches), tflops, case_limit, clock)
            except torch.cuda.OutOfMemoryError:
                res["sampler"] += [{"arch": a, "batch": b, "T": steps, "status": "does not fit"} for b in batches]
            del model
            _free(dev)
            res["learner"] += learner_rows(a, tiny, root, dev, args, clock)
    res["seconds"] = clock.elapsed
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(render(res))
        Path(out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    ok = [r for r in res["sampler"] if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["fraction_of_peak"], default=None)
    fit = sum(r["status"] == "ok" for r in res["learner"])
    errs = [abs(r["plan_error"]) for r in res["learner"] if r.get("plan_error") is not None]
    say(f"bench gpu: {res['device']['name']}, peak {tflops:.3g} TFLOPS; sampler best "
        + (f"{best['fraction_of_peak']:.0%} of peak ({best['arch']} batch {best['batch']})" if best else "n/a")
        + f"; learner {fit}/{len(res['learner'])} cases ran"
        + (f", planner error median {sorted(errs)[len(errs) // 2]:.0%}" if errs else "")
        + f"; {res['seconds']:.0f} s" + (f" -> {out}" if out else ""))
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS),
                   help=f"planner presets (default {' '.join(DEFAULT_ARCHS)}); one of {', '.join(sorted(P.PRESETS))}")
    p.add_argument("--out", default="docs/results/gpu.md", help="report path (.json beside it), '-' for none")
    p.add_argument("--tiny", action="store_true", help="tiny stand-ins of each preset's layout (default without CUDA)")
    p.add_argument("--steps", type=int, default=8, help="sampler steps T of sampling and the learner (default 8)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="sampler batch sweep (default 1 2 4 8)")
    p.add_argument("--learner-batch", type=int, default=1, help="samples per learner step (default 1)")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; cases not started by then are skipped "
                   "(default 450)")
    p.add_argument("--case-limit", type=float, default=60.0, help="seconds; a sampler batch slower than this ends "
                   "its sweep (default 60)")
    p.add_argument("--gpu", default="h200-141gb", help="planner GPU class for the estimates (default h200-141gb)")


def main(args: argparse.Namespace, prog: str = "rlr-dist bench gpu") -> int:
    argv = sys.argv[sys.argv.index("gpu") + 1:] if "gpu" in sys.argv else sys.argv[1:]
    try:
        run(args.arch, None if args.out == "-" else args.out, True if args.tiny else None, args.steps,
            tuple(args.batches), args.learner_batch, args.lora_rank, args.budget, args.case_limit, args.gpu,
            command=" ".join([prog, *argv]))
    except BenchError as e:
        print(f"rlr-dist bench gpu: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m rlr_dist.bench.gpu", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args(), parser.prog))
