"""Model adapters: one conformance test every layout passes, export/load round trips, and clear errors."""
import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from rlr_dist.chain.trajectory import Plan, sample
from rlr_dist.config import ConfigError
from rlr_dist.estimators import ESTIMATORS
from rlr_dist.estimators.base import Batch, backward_terms
from rlr_dist.models import ModelError, load_model
from rlr_dist.models.tiny import TINY_LAYOUTS, build_tiny
from rlr_dist.regularisers import REGULARISERS
from rlr_dist.rewards.base import Reward, RewardScorer

T = 4
PROMPTS = {"pixel": ["zero", "one"], "pixel_video": ["a one", "0"], "sd": ["a cat", "a red dog"],
           "t2v": ["a cat walking", "waves"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {layout: build_tiny(layout, root / layout, seed=i) for i, layout in enumerate(TINY_LAYOUTS)}


def _load(tiny, layout, **kw):
    cfg = {"path": str(tiny[layout]), "num_inference_steps": T, "guidance_scale": 2.0, **kw}
    torch.manual_seed(0)
    return load_model(cfg)


class MeanRed(Reward):
    """Differentiable test reward: mean of the first channel (all frames)."""

    differentiable = True
    modality = "any"

    def forward(self, images, prompts=None):
        return images[:, 0].flatten(1).mean(1)


def _full_plan(T):
    every = frozenset(range(1, T + 1))
    return Plan(states=every, noises=every)


# ------------------------------------------------------------------------------------------ conformance
@pytest.mark.parametrize("layout", TINY_LAYOUTS)
def test_sampling_records_match_the_scheduler(tiny, layout):
    """x_{k-1} = DDIMScheduler.step(guided UNet output, τ_k, x_k, η_k, variance_noise=ε_k): μ, σ and ε recorded
    by the chain are the scheduler's own; at LoRA init the reference equals the model."""
    m = _load(tiny, layout)
    chain = m.chain()
    cond = m.encode_prompts(PROMPTS[layout])
    x_T = m.initial_noise(2, torch.Generator().manual_seed(1))
    traj = sample(chain, x_T, _full_plan(T), cond, torch.Generator().manual_seed(2), with_reference=True)
    assert traj.x0.shape == x_T.shape == (2, *m.latent_shape())
    assert traj.delta.abs().max() < 1e-10  # LoRA starts at B = 0: model == reference

    sched = DDIMScheduler.from_config(m.scheduler_config)
    sched.set_timesteps(T)
    null = m.null_cond()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            k = T - i
            x = traj.state(k)
            tt = torch.full((2,), int(t))
            u = null.expand(2, *null.shape[1:]) if null.dim() else null.expand(2)
            out_u, out_c = m.denoiser(x, tt, u), m.denoiser(x, tt, cond)
            guided = out_u + 2.0 * (out_c - out_u)
            eta = 0.0 if k == 1 else 1.0
            want = sched.step(guided, t, x, eta=eta, variance_noise=traj.noise(k)).prev_sample
            got = traj.state(k - 1) if k > 1 else traj.x0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert (float(traj.sigma[k]) > 0) == (k > 1)
    images = m.decode(traj.x0)
    assert images.min() >= 0 and images.max() <= 1
    assert images.dim() == (5 if m.video else 4)


def _snapshot(m):
    out = {f"unet.{k}": v.clone() for k, v in m.unet.state_dict().items()}
    for name, mod in m.frozen_modules().items():
        out.update({f"{name}.{k}": v.clone() for k, v in mod.state_dict().items()})
    return out


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("layout", TINY_LAYOUTS)
def test_one_rlr_step_changes_trainable_weights_only(tiny, layout, finetune):
    m = _load(tiny, layout, finetune=finetune)
    chain, est = m.chain(), ESTIMATORS.build("rlr", h=1)
    cond = m.encode_prompts(PROMPTS[layout])
    x_T = m.initial_noise(2, torch.Generator().manual_seed(3))
    plan = est.plan(chain.schedule, torch.Generator().manual_seed(4))
    traj = sample(chain, x_T, plan, cond, torch.Generator().manual_seed(5), with_reference=True)
    R, dR = RewardScorer(MeanRed(), m.decoder()).score(traj.x0, PROMPTS[layout], need_grad=True)
    assert dR.shape == traj.x0.shape  # ∂R/∂x_0 with respect to the latent the chain produced

    probe_x = m.initial_noise(2, torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_before = chain.ref_mean(probe_x, T, cond)
        mean_before = chain.mean(probe_x, T, cond)
    before = _snapshot(m)
    trainable = {id(p) for p in m.trainable_parameters()}
    names = {id(p): n for n, p in m.unet.named_parameters()}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    opt.zero_grad()
    batch = Batch(traj=traj, chain=chain, reward=R, reward_grad=dR, regulariser=REGULARISERS.build("kl_exact", beta=0.1))
    stats = backward_terms(est.terms(batch))
    assert {"loss/fo", "loss/ho"} <= set(stats)
    grads = [p.grad for p in m.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    opt.step()

    after = _snapshot(m)
    trained_keys = {f"unet.{names[i]}" for i in trainable if i in names}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "no weight changed"
    assert changed <= trained_keys, f"frozen weights changed: {sorted(changed - trained_keys)[:5]}"
    if finetune == "lora":
        assert all("lora_" in k for k in changed)
    with torch.no_grad():
        torch.testing.assert_close(chain.ref_mean(probe_x, T, cond), ref_before)  # the reference did not move
        assert not torch.allclose(chain.mean(probe_x, T, cond), mean_before)      # the model did


# ------------------------------------------------------------------------------------------ knobs
def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for gc in (False, True):
        m = _load(tiny, "t2v", finetune="full", gradient_checkpointing=gc)
        chain = m.chain()
        x = m.initial_noise(1, torch.Generator().manual_seed(0))
        chain.mean(x, T, m.encode_prompts(["a cat"])).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.trainable_parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_gradient_checkpointing_covers_the_reference_model(tiny, finetune):
    """The exact KL back-propagates through the reference model's calls (pathwise in x): with
    gradient_checkpointing they are checkpointed like the trained model's — the same gradient, a fraction of the
    saved bytes; the LoRA reference's recompute runs with its adapters off again (perturbed adapters would
    change the gradient if it did not)."""
    from rlr_dist.memory import SavedTensorMeter

    out = []
    for gc in (False, True):
        m = _load(tiny, "t2v", finetune=finetune, gradient_checkpointing=gc)
        if finetune == "lora":
            _perturb_lora(m)
        cond = m.encode_prompts(["a cat"])
        x = m.initial_noise(1, torch.Generator().manual_seed(0)).requires_grad_(True)
        nets = [m.unet] + ([m.reference_unet] if m.reference_unet is not None else [])
        static = [t for n in nets for t in (*n.parameters(), *n.buffers())]
        with SavedTensorMeter(static + [x, cond]) as meter:
            ref = m.chain().ref_mean(x, T, cond)
        ref.square().sum().backward()
        out.append((x.grad.clone(), meter.peak))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-6)
    assert out[1][1] < 0.2 * out[0][1], (out[0][1], out[1][1])


def test_bf16_autocast_returns_fp32_close_to_fp32(tiny):
    outs = []
    for mp in ("no", "bf16"):
        m = _load(tiny, "sd", mixed_precision=mp)
        x = m.initial_noise(2, torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs.append(m.chain().mean(x, T, m.encode_prompts(["a cat", "a dog"])))
    assert outs[1].dtype == torch.float32
    assert not torch.equal(outs[0], outs[1])  # autocast really ran
    torch.testing.assert_close(outs[1], outs[0], rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------ export / load
def _perturb_lora(m):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _mean(m, layout, x):
    with torch.no_grad():
        return m.chain().mean(x, T, m.encode_prompts(PROMPTS[layout]))


@pytest.mark.parametrize("layout", TINY_LAYOUTS)
def test_export_merged_lora_loads_back_with_the_same_outputs(tiny, layout, tmp_path):
    m = _load(tiny, layout)
    _perturb_lora(m)
    x = m.initial_noise(2, torch.Generator().manual_seed(0))
    want = _mean(m, layout, x)
    m.export(tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    back = _load({layout: tmp_path / "out"}, layout, finetune="full")
    torch.testing.assert_close(_mean(back, layout, x), want, rtol=1e-4, atol=1e-5)
    # and the adapter alone restores the same model on top of the base
    again = _load(tiny, layout)
    from safetensors.torch import load_file

    state = {k[len("unet."):]: v for k, v in load_file(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").items()}
    again.load_trained_state(state)
    torch.testing.assert_close(_mean(again, layout, x), want, rtol=1e-4, atol=1e-5)


def test_exported_sd_folder_is_a_diffusers_pipeline_and_lora_loads(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    m = _load(tiny, "sd")
    _perturb_lora(m)
    m.export(tmp_path / "out")
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    base = StableDiffusionPipeline.from_pretrained(tiny["sd"])
    base.load_lora_weights(tmp_path / "out" / "lora")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([50])
    emb = m.encode_prompts(["a cat"])
    with torch.no_grad():
        a = merged.unet(x, t, encoder_hidden_states=emb).sample
        b = base.unet(x, t, encoder_hidden_states=emb).sample
        c = m.denoiser(x, t, emb)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


def test_s3_round_trip_full_finetune(tiny, s3_server):
    m = _load(tiny, "pixel", finetune="full")
    with torch.no_grad():
        for p in m.unet.parameters():
            p.mul_(1.01)
    uri = f"{s3_server}/models/pixel-ft"
    m.export(uri)
    back = load_model({"path": uri, "num_inference_steps": T, "guidance_scale": 2.0})
    x = m.initial_noise(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(_mean(back, "pixel", x), _mean(m, "pixel", x), rtol=1e-4, atol=1e-5)


def test_base_model_loads_from_s3(tiny, s3_server):
    from rlr_dist import storage

    storage.upload(tiny["t2v"], f"{s3_server}/models/t2v")
    m = load_model({"path": f"{s3_server}/models/t2v", "num_inference_steps": T})
    assert m.layout == "t2v" and m.latent_shape() == (4, 3, 8, 8)


# ------------------------------------------------------------------------------------------ errors
def test_errors_name_the_thing(tiny, tmp_path):
    with pytest.raises(ModelError, match="nowhere/model.*does not exist"):
        load_model("nowhere/model")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        load_model(str(tmp_path / "empty"))
    for cls, pattern in (("UNetMotionModel", "UNetMotionModel"), ("UNetSpatioTemporalConditionModel",
                                                                  "unsupported denoiser class")):
        folder = tmp_path / cls
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", cls]}))
        with pytest.raises(ModelError, match=pattern):
            load_model(str(folder))
    with pytest.raises(ModelError, match="model.layout.*'sd'"):
        load_model({"path": str(tiny["pixel"]), "layout": "sd"})
    with pytest.raises(ConfigError, match="model.lora.target_modules.*nonexistent"):
        load_model({"path": str(tiny["pixel"]), "lora": {"target_modules": ["nonexistent"]}})
    with pytest.raises(ConfigError, match="model.finetune"):
        load_model({"path": str(tiny["pixel"]), "finetune": "qlora"})
    m = _load(tiny, "pixel")
    with pytest.raises(ModelError, match="'a seven'.*names no class"):
        m.encode_prompts(["a seven"])
    broken = tmp_path / "broken"
    shutil.copytree(tiny["sd"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="vae"):
        load_model(str(broken))
