"""The diffusion WFM core: EDM maths, samplers against the exact ODE solution, the DiT's
conditioning contracts (Video2World frames, actions, guidance, fps-aware RoPE), flavor sizes,
and a tiny model that learns to generate what it was trained on."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cupola.collections.world.diffusion import (
    Conditioning,
    DiffusionWFM,
    WFMConfig,
    dit_config,
    edm_loss_weight,
    edm_scalings,
    karras_sigmas,
    sample_heun,
    sample_multistep,
)
from cupola.collections.world.diffusion.samplers import guided
from cupola.collections.world.text import TextEncoderConfig
from cupola.toolkit.config import ConfigError
from cupola.toolkit.modules.rope import rope3d_cos_sin


def test_edm_preconditioning_gives_unit_variance_input_and_target():
    sd = 0.5
    torch.manual_seed(0)
    x0 = sd * torch.randn(200_000, dtype=torch.float64)
    for s in (0.01, 0.5, 3.0, 80.0):
        sigma = torch.tensor(s, dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
        x = x0 + sigma * torch.randn_like(x0)
        assert (c_in * x).std().item() == pytest.approx(1.0, rel=0.02)
        target = (x0 - c_skip * x) / c_out  # what the network must output
        assert target.std().item() == pytest.approx(1.0, rel=0.02)
        assert float(c_noise) == pytest.approx(0.25 * math.log(s))
        # the weighting makes the loss on D equal the unit-weighted loss on F
        assert float(edm_loss_weight(sigma, sd) * c_out**2) == pytest.approx(1.0)


def test_karras_schedule_ends_at_zero_and_is_decreasing():
    s = karras_sigmas(10, 0.002, 80.0)
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002) and s[-1] == 0
    assert bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("sampler", [sample_heun, sample_multistep])
def test_samplers_follow_the_exact_probability_flow_at_second_order(sampler):
    # Gaussian data N(0, s^2): the ideal denoiser is x s^2 / (s^2 + sigma^2); the ODE scales x by
    # sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)) down to sigma_min, and the last step returns D there.
    s, lo, hi = 0.5, 0.002, 80.0

    def denoise(x, sigma):
        return x * s**2 / (s**2 + sigma**2)

    x_T = hi * torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = x_T * math.sqrt((s**2 + lo**2) / (s**2 + hi**2)) * s**2 / (s**2 + lo**2)
    errors = []
    for steps in (20, 40, 80):
        out = sampler(denoise, x_T, karras_sigmas(steps, lo, hi))
        errors.append(((out - exact).abs() / exact.abs()).max().item())
    assert errors[2] < 5e-3
    assert errors[1] < errors[0] / 3.5 and errors[2] < errors[1] / 3.5  # halving the step quarters the error


def test_guidance_one_is_the_conditional_model_and_zero_the_unconditional():
    cond, uncond = (lambda x, s: x + 1), (lambda x, s: x - 1)
    x = torch.zeros(3)
    assert torch.equal(guided(cond, uncond, 1.0)(x, 1.0), x + 1)
    assert torch.equal(guided(cond, uncond, 0.0)(x, 1.0), x - 1)
    assert torch.equal(guided(cond, uncond, 3.0)(x, 1.0), x + 5)  # u + 3 (c - u)


def test_flavor_sizes_on_the_meta_device():
    from diffusers.models.transformers.transformer_cosmos import CosmosTransformer3DModel

    for name, dim, layers, heads, rope in (
        ("cosmos_dit_7b", 4096, 28, 32, (2.0, 1.0, 1.0)),
        ("cosmos_dit_14b", 5120, 36, 40, (2.0, 2.0, 2.0)),
    ):
        cfg = dit_config(name)
        assert (cfg.dim, cfg.n_layers, cfg.n_heads) == (dim, layers, heads)
        assert cfg.text.dim == 1024  # Cosmos-1.0 reads T5-11B's encoder
        with torch.device("meta"):
            model = DiffusionWFM(WFMConfig(dit=cfg))
            # Cosmos-1.0's transformer of the same shape (diffusers' configs for the released models)
            peer = CosmosTransformer3DModel(
                in_channels=16,
                out_channels=16,
                num_attention_heads=heads,
                attention_head_dim=128,
                num_layers=layers,
                text_embed_dim=1024,
                adaln_lora_dim=256,
                max_size=(128, 240, 240),
                rope_scale=rope,
                concat_padding_mask=True,
                extra_pos_embed_type="learnable",
            )
        ours, theirs = (sum(p.numel() for p in m.parameters()) for m in (model, peer))
        assert model.text_encoder is None  # T5 stays outside the model
        # the blocks are the same; cupola's final layer keeps its own shared AdaLN term (2 dim^2)
        assert abs(ours - 2 * dim * dim - theirs) / theirs < 2e-3, (name, ours, theirs)
        # the flavor's own target: 121 frames at 704 x 1280 through an 8x8x8 tokenizer fits its tables
        model.dit.absolute_positions(16, 44, 80)


def _wfm(seed: int = 0, dtype=torch.float64, **dit) -> DiffusionWFM:
    torch.manual_seed(seed)
    model = DiffusionWFM(WFMConfig(dit=dit_config("tiny", **dit))).to(dtype)
    model.init_weights()
    return model


def _randomize(model: DiffusionWFM) -> None:
    # move off adaLN-Zero so every path (text, actions, gates) is live
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _cond(model, prompts, **kw) -> Conditioning:
    ctx, mask = model.encode_text(prompts)
    return Conditioning(context=ctx, context_mask=mask, **kw)


def test_a_fresh_model_is_its_skip_path():
    model = _wfm()
    x = torch.randn(2, 4, 2, 4, 4, dtype=torch.float64)
    sigma = torch.full((2, 2), 2.0, dtype=torch.float64)
    c_skip = edm_scalings(sigma, 0.5)[0][0, 0]
    out = model.denoise(x, sigma, _cond(model, ["a", "b"]))
    assert torch.allclose(out, c_skip * x)


def test_text_guidance_and_fps_reach_the_output():
    model = _wfm()
    _randomize(model)
    x = torch.randn(1, 4, 2, 4, 4, dtype=torch.float64)
    sigma = torch.full((1, 2), 1.0, dtype=torch.float64)
    a = model.denoise(x, sigma, _cond(model, ["a red disc"]))
    b = model.denoise(x, sigma, _cond(model, ["a blue square"]))
    assert not torch.allclose(a, b)
    c24 = model.denoise(x, sigma, _cond(model, ["a red disc"], fps=torch.tensor([24.0])))
    c12 = model.denoise(x, sigma, _cond(model, ["a red disc"], fps=torch.tensor([12.0])))
    assert torch.allclose(a, c24) and not torch.allclose(c24, c12)


def test_rope3d_time_positions_follow_fps():
    full = rope3d_cos_sin(4, 2, 3, 16)[0].view(4, 2, 3, 8)
    half = rope3d_cos_sin(2, 2, 3, 16, fps=12.0)[0].view(2, 2, 3, 8)
    assert torch.allclose(half[1], full[2])  # at half the frame rate, frame 1 is time 2
    # height and width channels do not depend on time
    assert torch.equal(full[0, :, :, 4:], full[3, :, :, 4:])


def test_video2world_keeps_the_given_frames_and_leaves_them_out_of_the_loss():
    model = _wfm(video2world=True)
    _randomize(model)
    x0 = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64)
    cond = _cond(model, ["a", "b"], cond_latents=x0, cond_frames=1)
    sigma = torch.full((2, 3), 5.0, dtype=torch.float64)
    out = model.denoise(x0 + 5 * torch.randn_like(x0), sigma, cond)
    assert torch.equal(out[:, :, :1], x0[:, :, :1])
    gen = torch.Generator().manual_seed(0)
    lat = model.generate((2, 4, 3, 4, 4), cond, steps=3, generator=gen)
    assert torch.equal(lat[:, :, :1], x0[:, :, :1].float())
    # the loss only scores generated frames: the same seed with a different first-frame target (also
    # the conditioning, so the model sees it) but identical later frames gives a different loss only
    # through the model's input, never through a term on frame 0
    loss = model.training_loss(x0, cond, torch.Generator().manual_seed(1))
    assert loss.item() > 0 and math.isfinite(loss.item())


def test_actions_condition_each_latent_frame_on_the_transitions_into_it():
    model = _wfm(video2world=True, action_dim=2, actions_per_latent=4)
    x = torch.randn(1, 4, 3, 4, 4, dtype=torch.float64)
    sigma = torch.full((1, 3), 1.0, dtype=torch.float64)
    acts = torch.randn(1, 8, 2, dtype=torch.float64)
    cond = _cond(model, ["p"], cond_latents=x, cond_frames=1, actions=acts)
    base = model.denoise(x, sigma, cond)
    # zero-initialised action embedding: a new action model starts as its base model
    other = dataclasses.replace(cond, actions=torch.randn_like(acts))
    assert torch.allclose(base, model.denoise(x, sigma, other))
    _randomize(model)
    emb = model.dit.embed_actions(acts, 3)
    changed = acts.clone()
    changed[0, 5] += 1.0  # transition 5 leads into latent frame 2 (frames 1..4 -> latent 1, 5..8 -> latent 2)
    diff = (model.dit.embed_actions(changed, 3) - emb).abs().sum(-1)[0]
    assert diff[0] == 0 and diff[1] == 0 and diff[2] > 0
    assert not torch.allclose(
        model.denoise(x, sigma, cond), model.denoise(x, sigma, dataclasses.replace(cond, actions=changed))
    )
    with pytest.raises(ValueError, match=r"expected \[B, 8, 2\]"):
        model.dit.embed_actions(acts[:, :7], 3)


def test_camera_model_needs_and_uses_plucker_rays():
    model = _wfm(video2world=True, camera=True)
    _randomize(model)
    x = torch.randn(1, 4, 2, 4, 4, dtype=torch.float64)
    sigma = torch.full((1, 2), 1.0, dtype=torch.float64)
    rays = torch.randn(1, 6, 2, 4, 4, dtype=torch.float64)
    cond = _cond(model, ["p"], cond_latents=x, cond_frames=1)
    with pytest.raises(ValueError, match="Plücker"):
        model.denoise(x, sigma, cond)
    a = model.denoise(x, sigma, dataclasses.replace(cond, plucker=rays))
    b = model.denoise(x, sigma, dataclasses.replace(cond, plucker=-rays))
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="video2world"):
        WFMConfig(dit=dit_config("tiny", action_dim=2)).validate()
    with pytest.raises(ConfigError, match="path"):
        TextEncoderConfig(kind="t5").validate()
    with pytest.raises(ValueError, match="patches"):
        _wfm().denoise(torch.randn(1, 4, 1, 3, 4), torch.ones(1, 1), _cond(_wfm(dtype=torch.float32), ["x"]))


def test_tiny_model_learns_to_generate_its_training_latents():
    # two prompts, two fixed latent "videos": after training, sampling from noise with a prompt
    # lands near that prompt's latents
    torch.manual_seed(0)
    model = _wfm(dtype=torch.float32, latent_channels=16)  # Cosmos' latent width
    targets = 0.5 * torch.randn(2, 16, 2, 4, 4)
    prompts = ["a red disc", "a blue square"]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=200, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):  # a batch of 8: each target 4 times, at different noise levels
        cond = _cond(model, prompts * 4)
        loss = model.training_loss(targets.repeat(4, 1, 1, 1, 1), cond, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert sum(losses[-30:]) / 30 < 0.3 * sum(losses[:30]) / 30, losses[::30]
    model.eval()
    cond = _cond(model, prompts)
    for sampler in ("heun", "multistep"):
        out = model.generate(
            targets.shape,
            cond,
            steps=12,
            sampler=sampler,
            generator=torch.Generator().manual_seed(5),
        )
        err = (out - targets).square().mean(dim=(1, 2, 3, 4))
        swapped = (out - targets.flip(0)).square().mean(dim=(1, 2, 3, 4))
        # near its own prompt's latents: far closer than to the other prompt's, and than to their mean
        assert bool((err < 0.2 * swapped).all()), (sampler, err, swapped)
        assert bool((err < 0.3 * targets.var()).all()), (sampler, err)
