"""Flow-matching transformer adapters (sd3, flux, wan, pixel_flow; rlr_dist/models/transformers.py): the ODE
sampler against diffusers' own pipelines, conformance (sampling, per-step log-probs, LoRA on/off reference, one
learner step touching only trained weights, export and reload), on-policy log-probabilities, per-block
checkpointing, bf16 weights, the prompt cache, Wan's frame-prefix decoding, config errors, windows drawn with
the plans and the estimator's coverage statement."""
import json

import pytest
import torch

from rlr_dist.chain.flow import FlowSchedule, log_prob, recompute_log_prob, rollout
from rlr_dist.chain.trajectory import Plan, sample
from rlr_dist.config import ConfigError, build
from rlr_dist.estimators import ESTIMATORS
from rlr_dist.estimators.base import Batch, backward_terms
from rlr_dist.models import ModelError, load_model
from rlr_dist.models.tiny import TINY_FLOW_LAYOUTS, T5_TOKENS, build_tiny
from rlr_dist.regularisers import REGULARISERS
from rlr_dist.rewards.base import Reward, RewardScorer
from rlr_dist.train.config import TrainConfig

T = 4
PROMPTS = {"sd3": ["a cat", "a red dog"], "flux": ["a cat", "a red dog"], "wan": ["a cat walking", "waves"],
           "pixel_flow": ["zero", "one"], "pixel_video_flow": ["zero moving right", "moving left"]}
RES = {"sd3": 32, "flux": 32, "wan": 32, "pixel_flow": None, "pixel_video_flow": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flow")
    return {layout: build_tiny(layout, root / layout, seed=i) for i, layout in enumerate(TINY_FLOW_LAYOUTS)}


def _load(tiny, layout, **kw):
    flow = kw.pop("flow", {})
    cfg = {"path": str(tiny[layout]), "sampler": "flow", "num_inference_steps": T, "guidance_scale": 2.0, "eta": 0.7,
           "resolution": RES[layout], "flow": flow, **kw}
    torch.manual_seed(0)
    return load_model(cfg)


def _every(T):
    s = frozenset(range(1, T + 1))
    return Plan(states=s, noises=s)


class MeanRed(Reward):
    differentiable = True
    modality = "any"

    def forward(self, images, prompts=None):
        return images[:, 0].flatten(1).mean(1)


def _perturb_lora(m, scale=0.2, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------- = diffusers
@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_ode_sampler_equals_the_diffusers_pipeline(tiny, layout):
    """Text encoding, CFG (FLUX: true CFG on top of the distilled guidance 3.5), packing, timesteps, the flow
    grid (FLUX: linspace(1, 1/N) with resolution-dependent shift) and the Euler steps: x_0 of our ODE chain ==
    the pipeline's latents from the same x_T."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    m = _load(tiny, layout, flow={"transition": "ode"})
    prompts = PROMPTS[layout]
    x = m.initial_noise(2, torch.Generator().manual_seed(0))
    ours = sample(m.chain(), x, Plan(), m.encode_prompts(prompts), None).x0
    common = dict(num_inference_steps=T, output_type="latent", height=32, width=32, max_sequence_length=T5_TOKENS)
    with torch.no_grad():
        if layout == "sd3":
            out = StableDiffusion3Pipeline.from_pretrained(tiny[layout])(prompts, guidance_scale=2.0, latents=x,
                                                                         **common).images
        else:
            out = FluxPipeline.from_pretrained(tiny[layout])(prompts, negative_prompt=["", ""], true_cfg_scale=2.0,
                                                             guidance_scale=3.5, latents=m.pack(x), **common).images
            out = m.unpack(out, 16, 16)
    torch.testing.assert_close(ours, out, rtol=0, atol=5e-6)


def test_wan_text_grid_and_guided_velocity_match_the_pipeline(tiny):
    """Wan: UMT5 embeddings (trimmed, zero-padded) == WanPipeline.encode_prompt; flow times == the UniPC
    scheduler's flow sigmas; one guided step == the transformer under the pipeline's CFG + an Euler step."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    m = _load(tiny, "wan", flow={"transition": "ode"})
    pipe = WanPipeline.from_pretrained(tiny["wan"])
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(PROMPTS["wan"], negative_prompt=["", ""], max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(m.encode_prompts(PROMPTS["wan"]), pos.float(), rtol=0, atol=0)
    torch.testing.assert_close(m.null_cond()[0], neg[0].float(), rtol=0, atol=0)
    uni = UniPCMultistepScheduler.from_pretrained(tiny["wan"], subfolder="scheduler")
    uni.set_timesteps(T)
    s = m.schedule()
    torch.testing.assert_close(s.flow_t.flip(0)[:-1].float()[1:], uni.sigmas[1:-1].float(), rtol=0, atol=1e-6)
    assert abs(float(s.flow_t[-1]) - 1.0) < 1e-12 and float(uni.sigmas[0]) == pytest.approx(1.0, abs=2e-6)
    x = m.initial_noise(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 2, 4, 4)
    with torch.no_grad():
        t = torch.full((2,), float(s.timesteps[T]))
        v_c = pipe.transformer(x, t, pos).sample
        v_u = pipe.transformer(x, t, neg).sample
        want = x + (v_u + 2.0 * (v_c - v_u)) * float(s.flow_t[T - 1] - s.flow_t[T])
        torch.testing.assert_close(m.chain().mean(x, T, pos.float()), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("layout", TINY_FLOW_LAYOUTS)
def test_flow_adapter_samples_with_exact_log_probs_and_a_lora_reference(tiny, layout):
    m = _load(tiny, layout)
    chain = m.chain()
    assert isinstance(chain.schedule, FlowSchedule) and chain.schedule.transition == "flow_sde"
    cond = m.encode_prompts(PROMPTS[layout])
    x_T = m.initial_noise(2, torch.Generator().manual_seed(1))
    traj = sample(chain, x_T, _every(T), cond, torch.Generator().manual_seed(2), with_reference=True)
    assert traj.x0.shape == x_T.shape == (2, *m.latent_shape())
    assert traj.delta.abs().max() < 1e-10  # LoRA starts at B = 0: model == reference
    # every recorded transition is x' = μ + σ ε, and its exact log-density is finite
    for k in range(1, T + 1):
        with torch.no_grad():
            mu = chain.mean(traj.state(k), k, cond)
        nxt = traj.state(k - 1)
        torch.testing.assert_close(nxt, mu + float(traj.sigma[k]) * traj.noise(k), rtol=1e-5, atol=1e-6)
        lp = log_prob(nxt, mu, float(traj.sigma[k]))
        assert lp.shape == (2,) and torch.isfinite(lp).all()
    images = m.decode(traj.x0)
    assert images.min() >= 0 and images.max() <= 1 and images.dim() == (5 if m.video else 4)
    # LoRA on/off: a perturbed adapter moves the model, not the reference
    with torch.no_grad():
        ref0 = chain.ref_mean(x_T, T, cond)
        _perturb_lora(m)
        assert not torch.allclose(chain.mean(x_T, T, cond), ref0)
        torch.testing.assert_close(chain.ref_mean(x_T, T, cond), ref0)


def _snapshot(m):
    out = {f"unet.{k}": v.clone() for k, v in m.unet.state_dict().items()}
    for name, mod in m.frozen_modules().items():
        out.update({f"{name}.{k}": v.clone() for k, v in mod.state_dict().items()})
    return out


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("layout", TINY_FLOW_LAYOUTS)
def test_one_rlr_step_on_an_sde_window_changes_trainable_weights_only(tiny, layout, finetune):
    """RLR (h = 2, deterministic='absorb') + exact KL on a 2-step SDE window: every step covered, the
    gradient reaches the trained weights only."""
    m = _load(tiny, layout, finetune=finetune, flow={"window": {"kind": "fixed", "start": 1, "length": 2}})
    chain, est = m.chain(), ESTIMATORS.build("rlr", h=2, deterministic="absorb")
    assert [k for k in range(1, T + 1) if chain.schedule.stochastic(k)] == [2, 3]
    est.check(chain.schedule)
    assert est.describe()["fixed_steps"] == []
    cond = m.encode_prompts(PROMPTS[layout])
    x_T = m.initial_noise(2, torch.Generator().manual_seed(3))
    plan = est.plan(chain.schedule, torch.Generator().manual_seed(4))
    traj = sample(chain, x_T, plan, cond, torch.Generator().manual_seed(5), with_reference=True)
    R, dR = RewardScorer(MeanRed(), m.decoder()).score(traj.x0, PROMPTS[layout], need_grad=True)
    before = _snapshot(m)
    trainable = {id(p) for p in m.trainable_parameters()}
    names = {id(p): n for n, p in m.unet.named_parameters()}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    stats = backward_terms(est.terms(Batch(traj=traj, chain=chain, reward=R, reward_grad=dR,
                                           regulariser=REGULARISERS.build("kl_exact", beta=0.1))))
    assert {"loss/fo", "loss/ho"} <= set(stats)
    grads = [p.grad for p in m.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    opt.step()
    after = _snapshot(m)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {f"unet.{names[i]}" for i in trainable if i in names}
    if finetune == "lora":
        assert all("lora_" in k for k in changed)


@pytest.mark.parametrize("layout", TINY_FLOW_LAYOUTS)
def test_export_merged_lora_loads_back_with_the_same_outputs(tiny, layout, tmp_path):
    m = _load(tiny, layout)
    _perturb_lora(m)
    x = m.initial_noise(2, torch.Generator().manual_seed(0))
    cond = m.encode_prompts(PROMPTS[layout])
    with torch.no_grad():
        want = m.chain().mean(x, T, cond)
    m.export(tmp_path / "out")
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    back = _load({layout: tmp_path / "out"}, layout, finetune="full")
    with torch.no_grad():
        torch.testing.assert_close(back.chain().mean(x, T, back.encode_prompts(PROMPTS[layout])), want,
                                   rtol=1e-4, atol=1e-5)
    from safetensors.torch import load_file

    again = _load(tiny, layout)
    state = {k[len("unet."):]: v for k, v in load_file(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").items()}
    again.load_trained_state(state)
    with torch.no_grad():
        torch.testing.assert_close(again.chain().mean(x, T, cond), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- on-policy
@pytest.mark.parametrize("transition", ["flow_sde", "cps"])
@pytest.mark.parametrize("layout", ["sd3", "flux", "pixel_video_flow"])
def test_learner_recomputes_the_samplers_log_probs(tiny, layout, transition):
    """Sampler and learner are separate model instances (weights synced through trained_state): the learner's
    per-step log-prob recomputed from the record (the same chunk, as the pipeline ships it) equals the
    sampler's in fp32 (importance ratio 1, to 1e-6 nats). The same sample drawn in a batch of 1 instead of 8
    gets the same mean to fp32 rounding (CPU GEMMs block by batch size, so not bitwise): |Δμ| ≤ 2e-6 (a few
    ulps of |μ| ≈ 5), which 1/σ² amplifies to an importance ratio within 1e-3 of 1 (values printed)."""
    learner = _load(tiny, layout, flow={"transition": transition})
    _perturb_lora(learner)
    sampler = _load(tiny, layout, flow={"transition": transition})
    sampler.load_trained_state(learner.trained_state())
    prompts = (PROMPTS[layout] * 4)[:8]
    cond = sampler.encode_prompts(prompts)
    x_T = sampler.initial_noise(8, torch.Generator().manual_seed(11))
    rec = rollout(sampler.chain(), x_T, cond, torch.Generator().manual_seed(12))
    chain = learner.chain()
    worst, worst_batch, worst_mu = 0.0, 0.0, 0.0
    for k in range(1, T + 1):
        if not chain.schedule.stochastic(k):
            continue
        with torch.no_grad():
            lp = recompute_log_prob(chain, rec.x[k], rec.x[k - 1], k, learner.encode_prompts(prompts))
            one = recompute_log_prob(chain, rec.x[k][3:4], rec.x[k - 1][3:4], k, learner.encode_prompts(prompts[3:4]))
            mu8 = chain.mean(rec.x[k], k, learner.encode_prompts(prompts))[3:4]
            mu1 = chain.mean(rec.x[k][3:4], k, learner.encode_prompts(prompts[3:4]))
        worst = max(worst, float((lp - rec.log_prob[:, k]).abs().max()))
        worst_batch = max(worst_batch, float((one - lp[3:4]).abs().max()))
        worst_mu = max(worst_mu, float((mu8 - mu1).abs().max()))
    print(f"\n[on-policy] {layout} {transition}: max |Δ log p| learner vs sampler {worst:.2e}; batch 1 vs 8: "
          f"|Δμ| {worst_mu:.2e}, |Δ log p| {worst_batch:.2e}")
    assert worst <= 1e-6
    assert worst_mu <= 2e-6 and abs(torch.tensor(worst_batch).exp().item() - 1) <= 1e-3


def test_bf16_weights_keep_lora_and_log_probs_in_fp32(tiny):
    """bf16: the frozen transformer and text encoders in bf16, the LoRA weights fp32, means fp32, close to the
    fp32 model; the drift of a per-step log-prob recomputed in bf16 against fp32 is printed."""
    fp32 = _load(tiny, "sd3")
    bf16 = _load(tiny, "sd3", mixed_precision="bf16")
    assert next(bf16.unet.pos_embed.parameters()).dtype == torch.bfloat16
    assert bf16.text_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.trainable_parameters())
    bf16.load_trained_state(fp32.trained_state())
    cond = fp32.encode_prompts(PROMPTS["sd3"])
    x_T = fp32.initial_noise(2, torch.Generator().manual_seed(0))
    rec = rollout(fp32.chain(), x_T, cond, torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu = bf16.chain().mean(rec.x[T], T, bf16.encode_prompts(PROMPTS["sd3"]))
        assert mu.dtype == torch.float32
        drift = max(float((recompute_log_prob(bf16.chain(), rec.x[k], rec.x[k - 1], k, cond) - rec.log_prob[:, k]).abs().max())
                    for k in range(1, T + 1) if fp32.schedule().stochastic(k))
    torch.testing.assert_close(mu, fp32.chain().mean(rec.x[T], T, cond), rtol=0.05, atol=0.05)
    print(f"\n[bf16] sd3 tiny: max per-step |Δ log p| bf16 vs fp32 = {drift:.3g} nats")
    assert drift > 0


# ------------------------------------------------------------------------------------------- knobs
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_per_block_checkpointing_gives_the_same_gradients_and_saves_memory(tiny, finetune):
    """gradient_checkpointing on a transformer layout checkpoints each block (not the call); gradients of the
    model and of the LoRA reference (its recompute keeps the adapters off) are unchanged."""
    from rlr_dist.memory import SavedTensorMeter

    out = []
    for gc in (False, True):
        m = _load(tiny, "sd3", finetune=finetune, gradient_checkpointing=gc, guidance_scale=1.0)
        if finetune == "lora":
            _perturb_lora(m)
        assert m.unet.gradient_checkpointing is gc and not m.denoiser.checkpointed
        if finetune == "full":  # the frozen reference copy is checkpointed per block too
            assert m.reference_unet.gradient_checkpointing is gc
        chain = m.chain()
        cond = m.encode_prompts(["a cat"])
        x = m.initial_noise(1, torch.Generator().manual_seed(0)).requires_grad_(True)
        static = [*m.unet.parameters(), *m.unet.buffers()]
        with SavedTensorMeter(static) as meter:
            loss = chain.mean(x, T, cond).square().sum() + chain.ref_mean(x, T, cond).square().sum()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in m.trainable_parameters() if p.grad is not None])
        out.append((grads, x.grad.clone(), meter.peak))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)
    assert out[1][2] < out[0][2]


def test_text_embeddings_are_computed_once_per_prompt(tiny, monkeypatch):
    m = _load(tiny, "sd3")
    calls = []
    real = m.encode_text
    monkeypatch.setattr(m, "encode_text", lambda prompts: calls.append(list(prompts)) or real(prompts))
    a = m.encode_prompts(["a cat", "a dog", "a cat"])
    b = m.encode_prompts(["a dog", "a cat"])
    m.null_cond(), m.null_cond()
    assert calls == [["a cat", "a dog"], [""]]
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)


def test_wan_decodes_only_the_frame_prefix_the_reward_reads(tiny):
    """Wan's VAE is causal in time: decoding the latent prefix gives the same leading frames, and a reward
    reading frames {0, 1} of 5 decodes only latent frame 0..1."""
    from rlr_dist.rewards import REWARDS

    m = _load(tiny, "wan")
    dec = m.decoder()
    z = m.initial_noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = dec(z)
        assert full.shape == (1, 3, 5, 32, 32)
        torch.testing.assert_close(dec.decode_frames(z, [0, 1]), full[:, :, [0, 1]], rtol=1e-4, atol=1e-5)
    seen = []
    real = m.vae.decode
    m.vae.decode = lambda zz, *a, **k: seen.append(zz.shape[2]) or real(zz, *a, **k)
    every = REWARDS.build("video_frames", {"reward": {"name": "brightness"}})              # frames 0..4
    first = REWARDS.build("video_frames", {"reward": {"name": "brightness"}, "num_frames": 1})  # frame 0
    RewardScorer(every, dec).score(z)
    R, _ = RewardScorer(first, dec).score(z)
    assert seen == [2, 1] and torch.isfinite(R).all()


def test_mean_compat_scales_every_likelihood_ratio_and_kl_term_by_one_over_D(tiny):
    m_sum = _load(tiny, "pixel_flow", finetune="full")
    m_mean = _load(tiny, "pixel_flow", finetune="full", flow={"log_prob_reduction": "mean_compat"})
    D = 64
    assert m_mean.schedule().log_prob_scale == pytest.approx(1 / D) and m_sum.schedule().log_prob_scale == 1.0
    est = ESTIMATORS.build("lr")
    plan = est.plan(m_sum.schedule(), torch.Generator().manual_seed(0))
    cond = m_sum.encode_prompts(["zero", "one"])
    traj = sample(m_sum.chain(), m_sum.initial_noise(2, torch.Generator().manual_seed(1)), plan, cond,
                  torch.Generator().manual_seed(2), with_reference=True)
    R = torch.tensor([1.0, -0.5])
    reg = REGULARISERS.build("kl_exact", beta=0.3)
    with torch.no_grad():
        a = dict(est.terms(Batch(traj=traj, chain=m_sum.chain(), reward=R, regulariser=reg)))
        b = dict(est.terms(Batch(traj=traj, chain=m_mean.chain(), reward=R, regulariser=reg)))
    for k in a:
        assert float(b[k]) == pytest.approx(float(a[k]) / D, rel=1e-9, abs=1e-12), k


# ------------------------------------------------------------------------------------------- config
def test_flow_config_errors_name_the_field(tiny):
    with pytest.raises(ConfigError, match="model.flow.window.length"):
        build(TrainConfig, {"model": {"sampler": "flow", "flow": {"window": {"kind": "fixed"}}}})
    with pytest.raises(ConfigError, match="model.eta"):
        build(TrainConfig, {"model": {"sampler": "flow", "eta": 1.5, "flow": {"transition": "cps"}}})
    with pytest.raises(ConfigError, match="model.flow.transition"):
        build(TrainConfig, {"model": {"sampler": "flow", "flow": {"transition": "sde"}}})
    with pytest.raises(ConfigError, match="model.flow.log_prob_reduction"):
        build(TrainConfig, {"model": {"sampler": "flow", "flow": {"log_prob_reduction": "mean"}}})
    with pytest.raises(ModelError, match="model.sampler.*use sampler: flow"):
        load_model({"path": str(tiny["sd3"]), "resolution": 32})
    from rlr_dist.models import folder_schedule
    from rlr_dist.models.config import ModelConfig

    with pytest.raises(ConfigError, match="model.sampler.*use sampler: flow"):
        folder_schedule(tiny["pixel_flow"], ModelConfig(path=str(tiny["pixel_flow"])))
    with pytest.raises(ModelError, match="model.num_frames.*1 \\+ 4k"):
        _load(tiny, "wan", num_frames=6)
    with pytest.raises(ModelError, match="model.resolution.*multiple of 4.*2×2 packing"):
        _load(tiny, "flux", resolution=34)      # the tiny VAE downsamples by 2
    with pytest.raises(ConfigError, match="model.flow.window.start"):
        _load(tiny, "sd3", flow={"window": {"kind": "fixed", "start": 3, "length": 2}}).schedule()


def _train_cfg(tiny, tmp_path, window, estimator=None, **over):
    data = {"model": {"path": str(tiny["pixel_flow"]), "sampler": "flow", "num_inference_steps": 6, "eta": 0.7,
                      "finetune": "full", "flow": {"window": window}},
            "estimator": estimator or {"name": "rlr", "h": 1, "deterministic": "absorb"},
            "regulariser": {"name": "kl_exact", "beta": 0.1}, "reward": {"name": "brightness"},
            "data": {"prompts": ["zero", "one"]},
            "train": {"iterations": 3, "prompts_per_iteration": 2, "samples_per_prompt": 2, "eval_every": 0},
            "cluster": {f"{r}": {"count": 1} for r in ("samplers", "rewards", "learners")},
            "output_dir": str(tmp_path / "run"), **over}
    return build(TrainConfig, data)


def test_varying_windows_are_drawn_with_the_plans_and_reach_the_chain(tiny, tmp_path):
    """Sliding / random windows: the learner draws each iteration's window (deterministic in the seed), puts it
    in the plans, and the sampler's trajectory and the learner's chain use exactly that window."""
    from rlr_dist.models import load_model as load
    from rlr_dist.train import step
    from rlr_dist.train.learner import Learner

    cfg = _train_cfg(tiny, tmp_path, {"kind": "random", "length": 2})
    model = load(cfg.model)
    learner = Learner(cfg, model.schedule())
    windows = [learner.window(it) for it in range(8)]
    assert windows == [Learner(cfg, model.schedule()).window(it) for it in range(8)]   # same on every learner
    assert len(set(windows)) > 1 and all(len(w) == 2 for w in windows)
    for it in range(3):
        works = learner.works(it, 1)
        chunk = step.rollout(model, works[0], 0)
        stoch = {k for k in range(1, 7) if float(chunk.traj.sigma[k]) > 0}
        assert works[0].plan.window == windows[it] == stoch
        assert model.chain(window=chunk.traj.plan.window).schedule.sigma.tolist() == chunk.traj.sigma.tolist()
    sliding = _train_cfg(tiny, tmp_path, {"kind": "sliding", "length": 2, "every": 2})
    lw = Learner(sliding, model.schedule())
    assert [6 - max(lw.window(it)) for it in range(0, 12, 2)] == [0, 1, 2, 3, 4, 4]


def test_one_learner_step_on_each_flow_adapter(tiny, tmp_path):
    """train_local, one iteration, for every tiny flow adapter (RLR absorb + exact KL on a random window)."""
    from rlr_dist.train.local import train_local

    for layout in TINY_FLOW_LAYOUTS:
        cfg = _train_cfg(tiny, tmp_path, {"kind": "random", "length": 2})
        cfg.model.path, cfg.model.resolution, cfg.model.finetune = str(tiny[layout]), RES[layout], "lora"
        cfg.data.prompts = PROMPTS[layout]
        model, hist = train_local(cfg, iterations=1)
        h = hist[0]
        assert torch.isfinite(torch.tensor(h["loss/total"])) and h["plan/fixed_steps"] == 0 and "plan/window_start" in h
        assert any(float(p.detach().abs().sum()) > 0 for n, p in model.unet.named_parameters() if "lora_B" in n), layout


def test_coverage_states_the_fixed_steps_and_the_bias(tiny, tmp_path):
    from rlr_dist.models import folder_schedule

    skip = _train_cfg(tiny, tmp_path, {"kind": "fixed", "start": 2, "length": 2},
                      {"name": "rlr", "h": 1, "fo": False, "deterministic": "skip"})
    cov = skip.check_schedule(folder_schedule(tiny["pixel_flow"], skip.model))
    assert cov["stochastic_steps"] == [3, 4] and cov["fixed_steps"] == [1, 2, 5, 6] and cov["bias"].startswith("biased")
    absorb = _train_cfg(tiny, tmp_path, {"kind": "random", "length": 2})
    cov = absorb.check_schedule(folder_schedule(tiny["pixel_flow"], absorb.model))
    assert cov["fixed_steps"] == [] and cov["bias"].startswith("none") and cov["windows"] == 5
    with pytest.raises(ConfigError, match="estimator: .*deterministic.*window random"):
        bad = _train_cfg(tiny, tmp_path, {"kind": "random", "length": 2}, {"name": "rlr", "h": 1})
        bad.check_schedule(folder_schedule(tiny["pixel_flow"], bad.model))
    from rlr_dist.pipeline.run import preflight
    from rlr_dist.pipeline.tracking import headline

    tags, text = headline(skip, preflight(skip))
    assert tags["rlr.fixed_steps"] == "[1, 2, 5, 6]" and "biased" in tags["rlr.bias"] and "biased" in text
    assert json.loads(json.dumps(cov))
