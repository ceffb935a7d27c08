"""Training the toy world's models (``rlr-dist pretrain digits | moving-digits | classifiers``) from data that
ships in wheels, and writing them as checksummed model folders.

* ``digits``        — class-conditional DDPM on sklearn's digits at 16×16 (``UNet2DModel``, 267 k parameters,
  11 class embeddings: 0..9 and the null class 10, used for 10 % of training examples so classifier-free
  guidance works), then the training-reward classifier and the held-out evaluator (unless ``--no-classifiers``).
* ``moving-digits`` — its video twin on a real video architecture: a rectified flow on a tiny
  ``WanTransformer3DModel`` (full space-time attention with 3-D rotary positions, patches 2×4×4 of 8 frames of
  16×24 pixels = 96 tokens, 4 blocks of width 128, frame and column as coordinate input channels), conditioned
  on the digit *and* the direction of motion (two one-hot tokens as the cross-attention context and as constant
  input channels; each is null for 10 % of examples, independently, so
  ``"3"``, ``"moving right"``, ``"3 moving right"`` and ``""`` are all prompts it knows). Layout
  ``pixel_video_flow``.
* ``digits-flow``   — a rectified-flow digits model (velocity prediction, flow time ``t ∈ [0, 1]``) on a tiny
  ``SD3Transformer2DModel`` (patch 2, 16×16 pixels, 4 joint blocks of width 64); the digit class is fed as one
  one-hot conditioning token and as the pooled projection (class 10 = null, 10 % of examples, for CFG).
  Layout ``pixel_flow``; sampled by ``FlowMatchEulerDiscreteScheduler`` (ODE) or a flow SDE (docs/flow.md).
* ``classifiers``   — only the two classifiers.

Model folders hold ``DDPMPipeline.save_pretrained`` output (``model_index.json``, ``unet/``, ``scheduler/``),
``rlr_model.json`` (layout, conditioning, classes, shape, ``made_by``) and ``manifest.json`` (written last,
through :func:`rlr_dist.storage.atomic_dir`). They load with :func:`rlr_dist.models.load_model` like any
model. A fixed seed and thread count reproduce a run.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rlr_dist.toy_world.classifiers import CLASS_NAMES
from rlr_dist.toy_world.data import CANVAS_W, FRAMES, digits_16, make_clips, motion_offsets

NUM_CLASSES = 10
NULL_CLASS = 10
P_NULL = 0.1
TRAIN_TIMESTEPS = 100
DEFAULT_STEPS = {"digits": 1200, "moving-digits": 3600, "digits-flow": 1800}
DEFAULT_BATCH = {"digits": 128, "moving-digits": 32, "digits-flow": 128}
META = "rlr_model.json"

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ models
def make_unet(kind: str):
    """The UNet of ``kind`` (``digits``), freshly initialised."""
    from diffusers import UNet2DModel

    common = dict(layers_per_block=1, norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1,
                  # no attention: 2x cheaper on CPU, and the 16x16 digits need none (268 k parameters)
                  down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
    if kind == "digits":
        return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), **common)
    raise ValueError(f"unknown toy DDPM {kind!r}; the only one is 'digits'")


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon")


def versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}


def _fmt_secs(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


class _Batches:
    """Random training batches in [-1, 1]: digits ``(x, y, None)``, or for ``moving-digits`` clips
    ``(x (n, 1, F, 16, 24), y, direction index)`` (0 = left, 1 = right)."""

    def __init__(self, kind: str, g: torch.Generator):
        self.kind, self.g = kind, g
        self.x, self.y = digits_16("train")

    def __call__(self, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
        idx = torch.randint(0, len(self.x), (n,), generator=self.g)
        x, y = self.x[idx], self.y[idx]
        if self.kind != "moving-digits":
            return x, y, None
        offs, d = motion_offsets(n, self.g)
        return make_clips(x, offs), y, (d > 0).long()


def _train_step(loss: Tensor, net, opt, one_cycle, ema: float | None, step: int, steps: int, log_every: int,
                t0: float, log: Log) -> float:
    """One clipped optimiser step of a pretraining loop and its progress line; returns the loss EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    one_cycle.step()
    ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
    if step % log_every == 0 or step == steps:
        el = time.time() - t0
        log(f"  step {step:>5}/{steps}  loss {ema:.4f}  {step / el:.2f} steps/s  "
            f"elapsed {_fmt_secs(el)}  eta {_fmt_secs(el / step * (steps - step))}")
    return ema


def train_ddpm(kind: str, steps: int, seed: int = 0, batch: int | None = None, lr: float = 2e-3,
               log: Log = _log, log_every: int = 100):
    """Train the DDPM of ``kind``; returns ``(unet, scheduler, seconds, final_loss, cpu_seconds)``."""
    batch = batch or DEFAULT_BATCH[kind]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet, sched = make_unet(kind), make_scheduler()
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"pretrain {kind}: {n_params / 1e6:.3f} M parameters, {steps} steps of batch {batch}, seed {seed}, "
        f"{torch.get_num_threads()} thread(s)")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    batches = _Batches(kind, g)
    unet.train()
    t0, c0, ema = time.time(), time.process_time(), None
    for step in range(1, steps + 1):
        x0, y, _ = batches(batch)
        y = torch.where(torch.rand(batch, generator=g) < P_NULL, torch.full_like(y, NULL_CLASS), y)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, noise)
        ema = _train_step(loss, unet, opt, one_cycle, ema, step, steps, log_every, t0, log)
    unet.eval()
    cpu = time.process_time() - c0
    log(f"  {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU")
    return unet, sched, time.time() - t0, ema, cpu


# ------------------------------------------------------------------------------- the rectified-flow twin
FLOW_WIDTH, FLOW_HEADS, FLOW_LAYERS = 64, 2, 4
FLOW_SHIFT = 1.0


def make_flow_transformer():
    """The tiny ``SD3Transformer2DModel`` of ``digits-flow``: 16×16×1 pixels in patches of 2 (64 tokens), one
    conditioning token of dimension 11 (a one-hot class, 10 = null) and the same one-hot as pooled projection."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=FLOW_LAYERS,
                                 attention_head_dim=FLOW_WIDTH // FLOW_HEADS, num_attention_heads=FLOW_HEADS,
                                 joint_attention_dim=NUM_CLASSES + 1, caption_projection_dim=FLOW_WIDTH,
                                 pooled_projection_dim=NUM_CLASSES + 1, pos_embed_max_size=8)


def make_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def class_tokens(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(tokens (B, 1, 11), pooled (B, 11))``: the one-hot class as the conditioning token and pooled vector."""
    onehot = F.one_hot(labels, NUM_CLASSES + 1).float()
    return onehot[:, None, :], onehot


# the video twin: a tiny Wan 2.1-class transformer on pixels
VIDEO_WIDTH, VIDEO_HEADS, VIDEO_LAYERS, VIDEO_PATCH = 128, 4, 4, (2, 4, 4)
DIRECTIONS = ("left", "right")  # direction indices 0, 1; 2 = null (either way)
NULL_DIRECTION = len(DIRECTIONS)
VIDEO_COND_DIM = NUM_CLASSES + 1 + NULL_DIRECTION + 1  # 14: class one-hot (11) then direction one-hot (3)
VIDEO_COORDS = ("frame", "x")  # coordinate input channels (Wan's rotary positions are relative only)


def make_video_transformer():
    """The tiny ``WanTransformer3DModel`` of ``moving-digits`` (1.0 M parameters): 1 channel, patches 2×4×4
    (2 frames × 4 × 4 pixels: 4 × 4 × 6 = 96 tokens; 1.6× faster per step than 1×4×4 at width 96 and as good
    after 600 steps in a side-by-side run), width 128, 4 blocks, context = two tokens
    of dimension 14 (:func:`video_tokens`); its input is the clip, the same two-hot vector as 14 constant
    channels (as Wan's image-to-video models concatenate their conditioning channels) and two coordinate
    channels, frame index and column (:func:`~rlr_dist.models.transformers.with_cond_channels`). Measured
    (docs/toy-world.md): with the tokens alone the direction stayed at chance after 2,400 steps; with the
    constant channels it reached 0.61; with the coordinate channels 1.0 within 200 steps — a clip's digit sits
    at a column fixed by the frame index and the direction, which relative positions alone cannot place."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=VIDEO_PATCH, num_attention_heads=VIDEO_HEADS,
                                 attention_head_dim=VIDEO_WIDTH // VIDEO_HEADS,
                                 in_channels=1 + VIDEO_COND_DIM + len(VIDEO_COORDS), out_channels=1,
                                 text_dim=VIDEO_COND_DIM, freq_dim=64, ffn_dim=2 * VIDEO_WIDTH,
                                 num_layers=VIDEO_LAYERS, cross_attn_norm=True, rope_max_seq_len=32)


def video_tokens(labels: Tensor, directions: Tensor) -> Tensor:
    """``(B, 2, 14)``: a class token (one-hot of 0..9, 10 = null, in dims 0..10) and a direction token
    (one-hot of left / right / null in dims 11..13) — the ``pixel_video_flow`` layout's context."""
    from rlr_dist.models.transformers import class_direction_tokens

    return class_direction_tokens(labels, directions, VIDEO_COND_DIM, NUM_CLASSES + 1)


def train_flow(kind: str, steps: int, seed: int = 0, batch: int = 128, lr: float = 1e-3, log: Log = _log,
               log_every: int = 100):
    """Rectified flow on the digits (``digits-flow``) or the moving-digits clips (``moving-digits``):
    ``x_t = (1 − t)·x + t·ε`` with ``t`` logit-normal (SD3's sampling of flow times), target velocity
    ``ε − x``, model time ``1000·t``; the class (and the direction) dropped to null for 10 % of examples each.
    Returns ``(transformer, scheduler, seconds, final_loss, cpu_seconds)``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    video = kind == "moving-digits"
    model, sched = (make_video_transformer() if video else make_flow_transformer()), make_flow_scheduler()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretrain {kind}: {n_params / 1e6:.3f} M parameters, {steps} steps of batch {batch}, seed {seed}, "
        f"{torch.get_num_threads()} thread(s)")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    batches = _Batches(kind, g)
    model.train()
    t0, c0, ema = time.time(), time.process_time(), None
    for step in range(1, steps + 1):
        x0, y, d = batches(batch)
        y = torch.where(torch.rand(batch, generator=g) < P_NULL, torch.full_like(y, NULL_CLASS), y)
        if video:
            d = torch.where(torch.rand(batch, generator=g) < P_NULL, torch.full_like(d, NULL_DIRECTION), d)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))
        tb = t.view(-1, *[1] * (x0.dim() - 1))
        xt = (1 - tb) * x0 + tb * noise
        if video:
            from rlr_dist.models.transformers import with_cond_channels

            tokens = video_tokens(y, d)
            v = model(hidden_states=with_cond_channels(xt, tokens, VIDEO_COORDS), timestep=t * 1000,
                      encoder_hidden_states=tokens).sample
        else:
            tokens, pooled = class_tokens(y)
            v = model(xt, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t * 1000).sample
        loss = F.mse_loss(v, noise - x0)
        ema = _train_step(loss, model, opt, one_cycle, ema, step, steps, log_every, t0, log)
    model.eval()
    cpu = time.process_time() - c0
    log(f"  {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU")
    return model, sched, time.time() - t0, ema, cpu


def save_flow_model(folder: str | Path, transformer, scheduler, made_by: dict) -> Path:
    """Write a ``pixel_flow`` (``digits-flow``) or ``pixel_video_flow`` (``moving-digits``) folder:
    ``transformer/``, ``scheduler/``, ``model_index.json``, ``rlr_model.json`` (layout, classes, null class,
    directions, shape, ``made_by``), ``manifest.json`` last."""
    from rlr_dist.storage import atomic_dir

    video = type(transformer).__name__ == "WanTransformer3DModel"
    meta = {"layout": "pixel_video_flow" if video else "pixel_flow",
            "conditioning": "class+direction" if video else "class", "num_classes": NUM_CLASSES,
            "null_class": NULL_CLASS, "class_names": CLASS_NAMES, "channels": 1,
            **({"frames": FRAMES, "directions": list(DIRECTIONS), "null_direction": NULL_DIRECTION,
                "cond_channels": VIDEO_COND_DIM, "coord_channels": list(VIDEO_COORDS)} if video else {}),
            "sample_size": [16, CANVAS_W] if video else [16, 16], "made_by": made_by}
    index = {"_class_name": "PixelVideoFlow" if video else "PixelFlow", "_diffusers_version": versions()["diffusers"],
             "transformer": ["diffusers", type(transformer).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__]}

    def write(tmp: Path) -> None:
        import copy

        tmp.chmod(0o755)
        # weights stored in float16 (the folder stays < 2 MB); they load back as float32
        copy.deepcopy(transformer).half().save_pretrained(tmp / "transformer")
        for f in (tmp / "transformer").iterdir():
            f.chmod(0o644)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        (tmp / META).write_text(json.dumps(meta, indent=1))

    atomic_dir(folder, write)
    return Path(folder)


def load_model(folder: str | Path):
    """``(unet, scheduler, meta)`` of a toy model folder (eval mode, frozen)."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = Path(folder)
    if not (folder / META).is_file():
        raise ValueError(f"{folder}: no {META}; not a toy model folder")
    meta = json.loads((folder / META).read_text())
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return unet, sched, meta


def save_model(folder: str | Path, unet, scheduler, made_by: dict) -> Path:
    """Write a model folder (pipeline + ``rlr_model.json``) atomically, ``manifest.json`` last."""
    from diffusers import DDPMPipeline

    from rlr_dist.storage import atomic_dir

    meta = {"layout": "pixel", "conditioning": "class", "num_classes": NUM_CLASSES,
            "null_class": NULL_CLASS, "class_names": CLASS_NAMES, "channels": 1,
            "sample_size": [16, 16], "made_by": made_by}

    def write(tmp: Path) -> None:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the shipped folders must be readable by everyone
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=1))

    atomic_dir(folder, write)
    return Path(folder)


# -------------------------------------------------------------------------------------------- commands
def default_asset_dir(name: str) -> Path:
    """Where ``rlr-dist pretrain`` writes by default: the package's ``assets/toy/<name>``."""
    return Path(__file__).resolve().parent.parent / "assets" / "toy" / name


def made_by(command: str, seed: int, steps: int, seconds: float, **extra) -> dict:
    return {"command": command, "seed": seed, "steps": steps, "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), "versions": versions(), **extra}


def pretrain_model(kind: str, out: str | Path | None = None, steps: int | None = None, seed: int = 0,
                   batch: int | None = None, log: Log = _log, log_every: int = 100,
                   command: str | None = None) -> dict:
    """Train and save the model of ``kind`` (the DDPM ``digits``, or the rectified flows ``digits-flow`` and
    ``moving-digits``); returns its
    ``made_by`` record."""
    steps = steps or DEFAULT_STEPS[kind]
    batch = batch or DEFAULT_BATCH[kind]
    out = Path(out) if out else default_asset_dir(kind)
    cmd = command or f"rlr-dist pretrain {kind} --steps {steps} --seed {seed}"
    if kind in ("digits-flow", "moving-digits"):
        model, sched, secs, loss, cpu = train_flow(kind, steps, seed, batch, log=log, log_every=log_every)
        record = made_by(cmd, seed, steps, secs, batch=batch, final_loss=round(loss, 4), cpu_seconds=round(cpu, 1))
        save_flow_model(out, model, sched, record)
        log(f"wrote {out} ({_fmt_secs(secs)} of training)")
        return record
    unet, sched, secs, loss, cpu = train_ddpm(kind, steps, seed, batch, log=log, log_every=log_every)
    record = made_by(cmd, seed, steps, secs, batch=batch, final_loss=round(loss, 4), cpu_seconds=round(cpu, 1))
    save_model(out, unet, sched, record)
    log(f"wrote {out} ({_fmt_secs(secs)} of training)")
    return record


def pretrain_classifiers(out_dir: str | Path | None = None, steps: int = 800, seed: int = 0,
                         log: Log = _log, command: str | None = None) -> dict:
    """Train and save ``<out_dir>/classifier`` and ``<out_dir>/evaluator``; returns their metrics."""
    from rlr_dist.toy_world.classifiers import train_both

    out_dir = Path(out_dir) if out_dir else default_asset_dir("classifier").parent
    cmd = command or f"rlr-dist pretrain classifiers --steps {steps} --seed {seed}"
    res = train_both(out_dir / "classifier", out_dir / "evaluator", seed=seed, steps=steps,
                     made_by={"command": cmd, "threads": torch.get_num_threads(), "versions": versions()}, log=log)
    log(f"wrote {out_dir / 'classifier'} and {out_dir / 'evaluator'}")
    return res
