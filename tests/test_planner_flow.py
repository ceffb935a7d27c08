"""The planner on flow-matching transformers (sd3 / flux / wan): preset parameter counts against the published
configs, transformer-block units over image and text tokens, per-block checkpointing and absorbed ODE segments in
the learner estimate (checked against measured saved-tensor bytes of the tiny stand-ins), and the real-model
flow configs: they fit an 80 GB GPU and load, preflight, sample and score with tiny stand-ins."""
from pathlib import Path

import pytest
import torch

from rlr_dist import planner as P
from rlr_dist.cli import main as cli
from rlr_dist.models.config import ModelConfig
from rlr_dist.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FLOW_CONFIGS = {"sd35-medium-aesthetic-lora.yaml": "sd35-medium", "flux1-dev-aesthetic-lora.yaml": "flux1-dev",
                "wan21-t2v-1.3b-aesthetic-lora.yaml": "wan21-t2v-1.3b", "wan21-t2v-14b-aesthetic-lora.yaml": "wan21-t2v-14b"}
TINY = {"sd35-medium": "sd3", "flux1-dev": "flux", "wan21-t2v-1.3b": "wan", "wan21-t2v-14b": "wan"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlr_dist.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("plan-flow-tiny")
    return {layout: build_tiny(layout, root / layout) for layout in ("sd3", "flux", "wan")}


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rlr_dist.rewards.aesthetic import AestheticHead

    root = tmp_path_factory.mktemp("plan-flow-aesthetic")
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=32, patch_size=8,
                                                          projection_dim=16))
    clip.save_pretrained(root / "clip")
    save_file(AestheticHead(16).state_dict(), str(root / "head.safetensors"))
    return root


# Exact meta-device counts of the configs in rlr_dist/planner.py (the published diffusers config.json of each
# model); nominal sizes as the model cards state them.
COUNTS = {"sd35-medium": (2_243_171_520, 2.5e9, 0.11),    # Stability: "2.5 billion" (MMDiT-X)
          "flux1-dev": (11_901_408_320, 12e9, 0.01),      # BFL: "12 billion parameter rectified flow transformer"
          "wan21-t2v-1.3b": (1_418_996_800, 1.3e9, 0.10),  # Wan: "1.3B"
          "wan21-t2v-14b": (14_288_491_584, 14e9, 0.03)}   # Wan: "14B"


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_flow_presets_match_the_published_parameter_counts(preset):
    exact, nominal, tol = COUNTS[preset]
    a = P.arch_of(ModelConfig(sampler="flow"), preset)
    n = P.unet_profile(a)[0].params
    assert n == exact and abs(n - nominal) / nominal < tol
    text, vae = P.text_params(a.text), P._profiles(a)[4]
    want_text = {"sd35-medium": 123_650_304 + 694_659_840 + 4_762_310_656,   # CLIP-L, CLIP-G (bigG text), T5-XXL enc.
                 "flux1-dev": 123_060_480 + 4_762_310_656, "wan21-t2v-1.3b": 5_680_910_336,  # UMT5-XXL encoder
                 "wan21-t2v-14b": 5_680_910_336}[preset]
    assert text == want_text
    assert vae == (126_892_531 if preset.startswith("wan") else 83_819_683)      # Wan-VAE "127M"; SD3/FLUX VAE


def test_transformer_blocks_are_units_over_image_and_text_tokens():
    sd = P.unet_profile(P.arch_of(ModelConfig(sampler="flow"), "sd35-medium"))[0]
    kinds = [k for k, _ in sd.units]
    assert kinds.count("JointTransformerBlockDual") == 13 and kinds.count("JointTransformerBlock") == 11
    assert {n for _, n in sd.units} == {(4096 + 77 + 256) * 1536}               # 64x64 patches + CLIP + T5 tokens
    flux = P.unet_profile(P.arch_of(ModelConfig(sampler="flow"), "flux1-dev"))[0]
    assert [k for k, _ in flux.units].count("FluxSingleTransformerBlock") == 38
    assert {n for _, n in flux.units} == {(64 * 64 + 512) * 3072}
    wan = P.arch_of(ModelConfig(sampler="flow", num_frames=61, resolution=[480, 832]), "wan21-t2v-1.3b")
    assert wan.latent == (16, 16, 60, 104) and wan.frames == 61 and wan.temporal == 4
    wan_units = P.unet_profile(wan)[0].units
    tokens = 16 * 30 * 52 * 1536  # blocks count at their ffn ratio (8960 / 1536); the output head at its width
    text = 512 * 1536  # UMT5 tokens x width: cross-attention keys and values, a sixth of an image element each
    assert {n for k, n in wan_units if k == "WanTransformerBlock"} == {int(tokens * (11 + 8960 / 1536) / 15 + text / 6)}
    assert [n for k, n in wan_units if k == "head"] == [tokens]


@pytest.mark.parametrize("case, call_tol, step_tol", [
    ({"layout": "sd3", "guidance_scale": 5.0}, 0.20, 0.20),
    ({"layout": "flux"}, 0.20, 0.20),
    ({"layout": "wan", "guidance_scale": 5.0}, 0.20, 0.20),
])
def test_flow_estimate_matches_measured_saved_bytes(tiny, case, call_tol, step_tol):
    from rlr_dist.bench.planner import measure_case

    case = dict(case)
    r = measure_case({"path": str(tiny[case.pop("layout")]), "sampler": "flow", "resolution": 32, **case})
    print(f"\n[plan] {case}: call {r['call_measured'] / 2**20:.2f} MB measured, {r['call_estimated'] / 2**20:.2f} MB "
          f"estimated; rlr step {r['step_measured'] / 2**20:.2f} / {r['step_estimated'] / 2**20:.2f} MB")
    assert r["call_estimated"] == pytest.approx(r["call_measured"], rel=call_tol)
    assert r["step_estimated"] == pytest.approx(r["step_measured"], rel=step_tol)


def test_per_block_checkpointing_estimate_matches_measured(tiny):
    """One CFG call of the tiny SD3 with per-block checkpointing keeps (until backward) only the blocks' inputs:
    the planner's kept term, Σ unit inputs; the one block recomputed in backward is a unit coefficient (measured
    by rlr-dist bench plan), not re-measured here."""
    from rlr_dist.memory import SavedTensorMeter
    from rlr_dist.models import load_model

    m = load_model({"path": str(tiny["sd3"]), "sampler": "flow", "resolution": 32, "guidance_scale": 5.0,
                    "gradient_checkpointing": True, "num_inference_steps": 4})
    chain, cond = m.chain(), m.encode_prompts(["a red cube"] * 2)
    x = m.initial_noise(2, torch.Generator().manual_seed(0))
    static = [*m.unet.parameters(), *m.unet.buffers(), x, cond, chain.uncond]
    with SavedTensorMeter(static) as meter:
        mu = chain.mean(x, 4, cond)
    del mu
    prof = P.unet_profile(P.arch_of(m.cfg))[0]
    kept = prof.unit_inputs() * 4 * 2 * 2
    full = prof.saved_bytes("fp32", "lora") * 2 * 2
    print(f"\n[plan] per-block checkpointed call: kept {meter.peak / 2**20:.3f} MB measured, {kept / 2**20:.3f} MB "
          f"estimated (unit inputs; embeddings outside the blocks are not counted); unchecked call {full / 2**20:.3f} MB")
    assert kept == pytest.approx(meter.peak, rel=0.4)
    assert meter.peak < 0.25 * full


def test_absorbed_ode_segments_lengthen_the_learner_segment():
    """deterministic='absorb' on a window: the FO term runs over the ODE tail below it, the likelihood-ratio
    segment over the ODE steps above — the planner takes the longest over every window the run can draw."""
    cfg = load_config(ROOT / "jobs/configs/digits-flow.yaml")
    _, absorb = P.estimator_backprop(cfg)
    _, skip = P.estimator_backprop(load_config(ROOT / "jobs/configs/digits-flow.yaml",
                                               ["--estimator.deterministic=skip", "--estimator.fo=false"]))
    T, L = cfg.model.num_inference_steps, cfg.model.flow.window.length
    assert absorb.steps == T - L + 2      # the window at the output end: HO block (2) + every ODE step above it
    assert skip.steps == 2 and skip.calls <= 2 * L
    assert absorb.calls > skip.calls


@pytest.mark.parametrize("name", sorted(FLOW_CONFIGS))
def test_flow_configs_fit_an_80gb_gpu(name, capsys):
    rc = cli(["plan", str(ROOT / "jobs/configs" / name), "--gpu", "h100-80gb", "--arch", FLOW_CONFIGS[name]])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count(": fits;") == 3 and "DOES NOT FIT" not in out


def test_plan_finds_the_fix_for_native_wan_14b_frames(capsys):
    cfg = str(ROOT / "jobs/configs/wan21-t2v-14b-aesthetic-lora.yaml")
    rc = cli(["plan", cfg, "--gpu", "h100-80gb", "--arch", "wan21-t2v-14b", "--model.num_frames=81",
              "--model.text_encoder_device=auto"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out
    fix = next(line for line in out.splitlines() if "to fit" in line)
    assert "--model.text_encoder_device=cpu" in fix and "learners.count" not in fix
    assert cli(["plan", cfg, "--gpu", "h200-141gb", "--arch", "wan21-t2v-14b", "--model.num_frames=81"]) == 0


@pytest.mark.parametrize("name", sorted(FLOW_CONFIGS))
def test_real_flow_config_loads_with_tiny_stand_ins(name, tiny, tiny_aesthetic, tmp_path):
    """load_config + the pipeline's preflight with the weights replaced by tiny saved models, then the plans a
    learner draws, one sampling + scoring call of the config's model and reward."""
    from rlr_dist.models import load_model
    from rlr_dist.pipeline.run import preflight
    from rlr_dist.rewards import build_scorer
    from rlr_dist.train import step
    from rlr_dist.train.learner import Learner

    video = name.startswith("wan")
    key = "reward.reward" if video else "reward"
    cfg = load_config(ROOT / "jobs/configs" / name, [
        f"--model.path={tiny[TINY[FLOW_CONFIGS[name]]]}", "--model.resolution=32", "--model.num_frames=5",
        "--model.num_inference_steps=6", f"--{key}.clip={tiny_aesthetic / 'clip'}",
        f"--{key}.head={tiny_aesthetic / 'head.safetensors'}", "--cluster.address=null",
        f"--checkpoint.dir={tmp_path / 'ckpt'}", f"--export={tmp_path / 'export'}", f"--output_dir={tmp_path / 'run'}"])
    coverage = preflight(cfg)
    assert cfg.model.sampler == "flow" and cfg.model.mixed_precision == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.deepspeed.bf16 and cfg.model.lora.rank == 16
    assert all(r.num_gpus >= 0.5 for r in (cfg.cluster.samplers, cfg.cluster.rewards, cfg.cluster.learners))
    est = cfg.make_estimator()
    assert (coverage["fixed_steps"] == []) == (est.deterministic == "absorb")   # skip configs state their bias
    model = load_model(cfg.model)
    learner = Learner(cfg, model.schedule())
    work = learner.works(0, 1)[0]
    work.prompts, work.prompt_ids = work.prompts[:2], work.prompt_ids[:2]
    chunk = step.rollout(model, work, version=0)
    assert chunk.traj.x0.shape == ((2, 4, 2, 4, 4) if video else (2, 4, 16, 16))
    assert {k for k in range(1, 7) if float(chunk.traj.sigma[k]) > 0} == work.plan.window
    chunk = step.score(build_scorer(cfg.reward, model.decoder()), chunk, need_grad=est.needs_reward_grad)
    assert torch.isfinite(chunk.reward).all() and chunk.reward.shape == (2,)
    if video:
        assert cfg.reward.params["num_frames"] == 4 and cfg.model.vae_slicing and not est.needs_reward_grad
