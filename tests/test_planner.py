"""The memory planner (`rlr-dist plan`), its calibration against measured saved-tensor bytes on tiny models,
the real-model job configs (loaded with tiny stand-ins for the weights) and the model.resolution knob."""
from pathlib import Path

import pytest
import torch

from rlr_dist import planner as P
from rlr_dist.cli import main as cli
from rlr_dist.models.config import ModelConfig
from rlr_dist.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"sd15-aesthetic-lora.yaml": "sd15", "sd21-aesthetic-lora.yaml": "sd21",
           "zeroscope-aesthetic-lora.yaml": "zeroscope"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlr_dist.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("plan-tiny")
    return {layout: build_tiny(layout, root / layout, frames=4) for layout in ("sd", "t2v")}


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rlr_dist.rewards.aesthetic import AestheticHead

    root = tmp_path_factory.mktemp("plan-aesthetic")
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=32, patch_size=8,
                                                          projection_dim=16))
    clip.save_pretrained(root / "clip")
    save_file(AestheticHead(16).state_dict(), str(root / "head.safetensors"))
    return root


def test_presets_match_the_published_parameter_counts():
    counts = {}
    for name in ("sd15", "sd21", "zeroscope"):
        a = P.arch_of(ModelConfig(), name)
        counts[name] = P.unet_profile(a)[0].params
    assert counts["sd15"] == 859_520_964          # runwayml / stable-diffusion-v1-5 unet
    assert abs(counts["sd21"] - 865_910_724) < 1e6
    assert abs(counts["zeroscope"] - 1_411_233_860) < 1e6
    assert P.arch_of(ModelConfig(), "zeroscope").latent_hw == (40, 72)


def test_coefficients_still_measure_the_same():
    from rlr_dist.bench.planner import measure_coefficients

    fresh = measure_coefficients()
    for prec, modes in fresh.items():
        for mode, kinds in modes.items():
            for kind, v in kinds.items():
                assert v == pytest.approx(P.COEF[prec][mode][kind], rel=0.03), (prec, mode, kind)


@pytest.mark.parametrize("case, call_tol, step_tol", [
    ({"layout": "sd", "guidance_scale": 5.0}, 0.10, 0.10),
    ({"layout": "sd", "guidance_scale": 5.0, "mixed_precision": "bf16"}, 0.12, 0.12),
    ({"layout": "t2v", "guidance_scale": 5.0}, 0.25, 0.25),   # temporal attention: see docs/results/plan.md
])
def test_estimate_matches_measured_saved_bytes(tiny, case, call_tol, step_tol):
    from rlr_dist.bench.planner import measure_case

    case = dict(case)
    r = measure_case({"path": str(tiny[case.pop("layout")]), **case})
    assert r["call_estimated"] == pytest.approx(r["call_measured"], rel=call_tol)
    assert r["step_estimated"] == pytest.approx(r["step_measured"], rel=step_tol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_real_model_configs_fit_their_gpu(name, capsys):
    rc = cli(["plan", str(ROOT / "jobs/configs" / name), "--gpu", "h100-80gb", "--arch", CONFIGS[name]])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count(": fits;") == 3 and "DOES NOT FIT" not in out


def test_plan_says_what_to_change(capsys):
    cfg = str(ROOT / "jobs/configs/sd15-aesthetic-lora.yaml")
    rc = cli(["plan", cfg, "--gpu", "a10g-24gb", "--arch", "sd15", "--model.gradient_checkpointing=false",
              "--cluster.learners.count=1", "--cluster.samplers.count=1"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out
    fix = [line for line in out.splitlines() if "to fit" in line]
    assert len(fix) == 2 and all(" --" in line for line in fix)      # reward and learner get a fix
    # applying the printed fix makes the learner fit
    cfg_obj = load_config(cfg, ["--model.gradient_checkpointing=false", "--cluster.learners.count=1",
                                "--cluster.samplers.count=1"])
    learner = next(v for v in P.verdicts(cfg_obj, "a10g-24gb", P.arch_of(cfg_obj.model, "sd15"))
                   if v.role.name == "learner")
    assert not learner.role.total <= learner.usable and learner.fits and learner.fix
    fixed = load_config(cfg, ["--model.gradient_checkpointing=false", "--cluster.learners.count=1",
                              "--cluster.samplers.count=1", *learner.fix])
    again = next(r for r in P.plan(fixed, "a10g-24gb", P.arch_of(fixed.model, "sd15")) if r.name == "learner")
    assert again.total <= P.usable_bytes("a10g-24gb", 1.0)


def test_memory_rules():
    cfg = load_config(str(ROOT / "jobs/configs/sd15-aesthetic-lora.yaml"))
    arch = P.arch_of(cfg.model, "sd15")
    base = {r.name: r for r in P.plan(cfg, "h100-80gb", arch)}

    def learner(*ov):
        c = load_config(str(ROOT / "jobs/configs/sd15-aesthetic-lora.yaml"), list(ov))
        return next(r for r in P.plan(c, "h100-80gb", arch) if r.name == "learner")

    h1, h4 = learner("--estimator.h=1", "--model.gradient_checkpointing=false"), \
        learner("--estimator.h=4", "--model.gradient_checkpointing=false")
    # h trained calls + h − 1 reference calls (the exact KL's, differentiated in x only: they hold less)
    prec = "bf16" if cfg.model.mixed_precision == "bf16" or cfg.deepspeed.bf16 else "fp32"
    prof, _ = P.unet_profile(arch)
    r = prof.saved_bytes(prec, "frozen") / prof.saved_bytes(prec, "lora")
    assert 0.3 < r < 1 and h4.memory["activations"] == pytest.approx((4 + 3 * r) * h1.memory["activations"])
    full0 = learner("--model.finetune=full", "--deepspeed.zero_stage=0")
    full3 = learner("--model.finetune=full", "--deepspeed.zero_stage=3")
    assert full3.memory["optimizer state"] == pytest.approx(full0.memory["optimizer state"] / 4)   # 4 learners
    assert full0.memory["reference unet (full fine-tuning)"] > 3e9
    assert base["reward"].memory["vae decode activations"] > 10e9     # ∂R/∂x₀ through the VAE at 512x512
    assert learner("--model.lora.rank=32").memory["optimizer state"] == pytest.approx(
        2 * base["learner"].memory["optimizer state"])


def test_reward_decodes_only_the_frames_it_reads():
    path = str(ROOT / "jobs/configs/zeroscope-aesthetic-lora.yaml")
    arch = P.arch_of(load_config(path).model, "zeroscope")

    def reward(*ov):
        c = load_config(path, ["--estimator.fo=true", *ov])  # with ∂R/∂x₀: decode activations are counted
        return next(r for r in P.plan(c, "h100-80gb", arch) if r.name == "reward")

    unsliced = "--model.vae_slicing=false"
    four, every = reward(unsliced), reward(unsliced, "--reward.temporal_weight=0.1")  # a temporal term reads all 16
    assert "4 image(s) decoded" in four.notes[0] and "16 image(s) decoded" in every.notes[0]
    assert every.memory["vae decode activations"] == pytest.approx(4 * four.memory["vae decode activations"])
    # vae_slicing (the config's): ∂R/∂images first, then the VAE one image at a time — one image's activations
    sliced = reward()
    assert sliced.memory["vae decode activations"] == pytest.approx(four.memory["vae decode activations"] / 4)
    assert any("one image at a time" in n for n in sliced.notes)


def test_plan_errors_name_the_fix(capsys):
    assert cli(["plan", str(ROOT / "jobs/configs/sd15-aesthetic-lora.yaml"), "--gpu", "h100-80gb"]) == 2
    assert "--arch" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_model_config_loads_with_tiny_stand_ins(name, tiny, tiny_aesthetic, s3_server, tmp_path):
    """load_config + the pipeline's preflight with the weights replaced by tiny saved models, then one
    sampling + scoring call of the config's model and reward."""
    from rlr_dist.models import load_model
    from rlr_dist.pipeline.run import preflight
    from rlr_dist.rewards import build_scorer
    from rlr_dist.train import step
    from rlr_dist.train.config import load_config

    video = name.startswith("zeroscope")
    clip = f"clip={tiny_aesthetic / 'clip'}"
    head = f"head={tiny_aesthetic / 'head.safetensors'}"
    key = "reward.reward" if video else "reward"
    cfg = load_config(ROOT / "jobs/configs" / name, [
        f"--model.path={tiny['t2v' if video else 'sd']}", "--model.resolution=32", "--model.num_frames=4",
        "--model.num_inference_steps=3", f"--{key}.{clip}", f"--{key}.{head}", "--cluster.address=null",
        f"--checkpoint.dir={s3_server}/ckpt", f"--export={s3_server}/model", f"--output_dir={tmp_path / 'out'}"])
    preflight(cfg)
    assert cfg.model.mixed_precision == "bf16" and cfg.model.gradient_checkpointing and cfg.deepspeed.bf16
    assert cfg.model.lora.rank == 16 and cfg.deepspeed.zero_stage == 2
    assert all(r.num_gpus >= 0.5 for r in (cfg.cluster.samplers, cfg.cluster.rewards, cfg.cluster.learners))
    model = load_model(cfg.model)
    est = cfg.make_estimator()
    work = step.with_plan(step.Work(["a cat"] * 2, [0, 0], seed=0), est, model.schedule())
    chunk = step.rollout(model, work, version=0)
    assert chunk.traj.x0.shape == ((2, 4, 4, 16, 16) if video else (2, 4, 16, 16))
    scorer = build_scorer(cfg.reward, model.decoder())
    chunk = step.score(scorer, chunk, need_grad=est.needs_reward_grad)
    assert torch.isfinite(chunk.reward).all() and chunk.reward.shape == (2,)
    if video:
        assert cfg.reward.params["num_frames"] == 4 and cfg.model.vae_slicing and not est.needs_reward_grad


def test_model_resolution_sets_the_latent_size(tiny):
    from rlr_dist.config import ConfigError
    from rlr_dist.models import ModelError, load_model

    m = load_model({"path": str(tiny["t2v"]), "resolution": [32, 48], "num_frames": 2})
    assert m.latent_shape() == (4, 2, 16, 24)        # the tiny VAE downsamples by 2
    with pytest.raises(ModelError, match="model.resolution"):
        load_model({"path": str(tiny["sd"]), "resolution": 33})
    with pytest.raises(ModelError, match="model.resolution: pixel layouts"):
        load_model({"path": "toy:digits", "resolution": 16})
    with pytest.raises(ConfigError, match="model.resolution"):
        load_model({"path": str(tiny["sd"]), "resolution": [1, 2, 3]})
