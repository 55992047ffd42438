"""The causal video tokenizers: parity with diffusers' AutoencoderKLCosmos through the converter,
causality (a prefix encodes the same whatever follows; the first frame alone), chunked encode/decode
equal to one shot, FSQ's codebook, the flavors' shapes, and clear input errors."""

from __future__ import annotations

import pytest
import torch

from cupola.collections.world.tokenizers import TOKENIZER_FLAVORS, VideoTokenizer, tokenizer_config
from cupola.collections.world.tokenizers.chunked import decode_video, encode_video
from cupola.collections.world.tokenizers.convert import (
    diffusers_config,
    from_diffusers_state_dict,
    load_diffusers_tokenizer,
)
from cupola.toolkit.config import ConfigError
from cupola.toolkit.modules.fsq import FSQ


def _video(T: int, H: int = 32, W: int = 32, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, T, H, W, generator=g, dtype=dtype) * 2 - 1).clamp(-1, 1)


def _tiny(flavor: str = "tiny") -> VideoTokenizer:
    torch.manual_seed(0)
    model = VideoTokenizer(tokenizer_config(flavor)).double().eval()
    with torch.no_grad():  # move norms and biases off their init, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize(
    "t,s,decoder_channels", [(4, 8, (16, 32, 32, 32)), (8, 8, (16, 32, 32, 32)), (8, 16, (32, 32, 48, 48))]
)
def test_diffusers_autoencoder_kl_cosmos_loads_and_matches(tmp_path, t, s, decoder_channels):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    ref = diffusers.AutoencoderKLCosmos(
        latent_channels=4,
        encoder_block_out_channels=(16, 32, 32, 32),
        decode_block_out_channels=decoder_channels,
        attention_resolutions=(16,),
        resolution=64,
        num_layers=1,
        spatial_compression_ratio=s,
        temporal_compression_ratio=t,
    ).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.eval()
    for haar in (ref.encoder.patch_embed, ref.decoder.unpatch_embed):  # its table holds fp32-rounded 1/sqrt 2
        haar.wavelets = torch.full((2,), 0.5**0.5, dtype=torch.float64)
    ours = from_diffusers_state_dict(diffusers_config(dict(ref.config)), ref.state_dict()).double().eval()
    x = _video(1 + 2 * t, 32, 64)
    with torch.no_grad():
        z_ref = ref.encode(x).latent_dist.mode()
        z = ours.encode(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.decode(z_ref), ref.decode(z_ref).sample, rtol=1e-10, atol=1e-10)
    # from a saved diffusers folder, and from a pipeline folder holding it under vae/
    ref.float().save_pretrained(tmp_path / "pipeline" / "vae")
    for folder in (tmp_path / "pipeline" / "vae", tmp_path / "pipeline"):
        loaded = load_diffusers_tokenizer(folder)
        assert loaded.cfg.temporal_compression == t and loaded.cfg.spatial_compression == s
        assert loaded.cfg.extra["latents_mean"] == list(ref.config.latents_mean)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x.float()), z_ref.float(), rtol=1e-4, atol=1e-4)


def test_converter_is_strict(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLCosmos

    ref = AutoencoderKLCosmos(
        latent_channels=4,
        encoder_block_out_channels=(16, 32, 32, 32),
        decode_block_out_channels=(16, 32, 32, 32),
        attention_resolutions=(16,),
        resolution=64,
        num_layers=1,
        temporal_compression_ratio=4,
    )
    cfg = diffusers_config(dict(ref.config))
    state = ref.state_dict()
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        from_diffusers_state_dict(cfg, {k: v for k, v in state.items() if k != "quant_conv.bias"})
    with pytest.raises(ValueError, match=r"'encoder\.extra\.weight'.*has no place"):
        from_diffusers_state_dict(cfg, {**state, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a diffusers AutoencoderKLCosmos"):
        diffusers_config({"_class_name": "AutoencoderKL"})


@pytest.mark.parametrize("flavor", ["tiny", "tiny_dv"])
def test_causal_a_prefix_encodes_the_same_whatever_follows(flavor):
    model = _tiny(flavor)
    x = _video(17)
    other = x.clone()
    other[:, :, 9:] = _video(8, seed=5)  # a different future after frame 8
    latent = (lambda v: model.encode(v)[0]) if flavor == "tiny_dv" else model.encode
    with torch.no_grad():
        whole, changed, prefix = latent(x), latent(other), latent(x[:, :, :9])
        image = latent(x[:, :, :1])
    assert whole.shape[2] == 5 and prefix.shape[2] == 3 and image.shape[2] == 1
    torch.testing.assert_close(changed[:, :, :3], whole[:, :, :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(prefix, whole[:, :, :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(image, whole[:, :, :1], rtol=0, atol=1e-12)  # frame 0 alone = the image
    assert (changed[:, :, 3:] - whole[:, :, 3:]).abs().max() > 1e-3  # the future does change later latents
    with torch.no_grad():  # the decoder is causal too
        z = model.encode(x)
        z = z[0] if flavor == "tiny_dv" else z
        torch.testing.assert_close(model.decode(z[:, :, :3]), model.decode(z)[:, :, :9], rtol=0, atol=1e-12)


@pytest.mark.parametrize("flavor", ["tiny", "tiny_dv"])
def test_chunked_encode_and_decode_equal_one_shot(flavor):
    model = _tiny(flavor)
    x = _video(29, 32, 48)
    with torch.no_grad():
        one_shot = model.encode(x)
    chunked = encode_video(model, x, chunk_frames=8)
    if flavor == "tiny_dv":
        assert torch.equal(chunked[1], one_shot[1])  # the same token indices
        z, chunked_z = one_shot[0], chunked[0]
    else:
        z, chunked_z = one_shot, chunked
    torch.testing.assert_close(chunked_z, z, rtol=0, atol=1e-12)
    with torch.no_grad():
        pixels = model.decode(z)
    for per in (1, 2, 3):
        torch.testing.assert_close(decode_video(model, z, chunk_latents=per), pixels, rtol=0, atol=1e-11)
    # tiles as large as the frame are the one-shot computation; smaller ones blend to the frame's size
    torch.testing.assert_close(encode_video(model, x, tile=48, tile_overlap=16, chunk_frames=12), chunked)
    tiled = decode_video(model, z, tile=32, tile_overlap=16)
    assert tiled.shape == pixels.shape and torch.isfinite(tiled).all()


def test_fsq_codebook_and_straight_through():
    fsq = FSQ([8, 8, 8, 5, 5, 5])
    assert fsq.codebook_size == 64000
    every = torch.arange(64000).view(1, -1)
    codes = fsq.indices_to_codes(every)
    assert codes.shape == (1, 6, 64000) and codes.min() == -1 and codes.max() == 1
    assert torch.unique(codes[0].T, dim=0).shape[0] == 64000  # every index its own code
    assert torch.equal(fsq.codes_to_indices(codes), every)
    z = (torch.randn(2, 6, 3, 4, 4) * 4).requires_grad_()
    q, idx = fsq(z)
    assert torch.equal(fsq.indices_to_codes(idx), q.detach())
    for i, levels in enumerate(fsq.levels):  # each channel takes exactly its number of values
        assert (
            len(torch.unique(fsq(torch.linspace(-20, 20, 4001).view(1, 1, -1).expand(1, 6, -1))[0][0, i]))
            == levels
        )
    q.sum().backward()
    assert z.grad is not None and (z.grad != 0).any()  # gradients pass the rounding
    with pytest.raises(ValueError, match=r"FSQ indices must lie in \[0, 64000\)"):
        fsq.indices_to_codes(torch.tensor([[64000]]))


@pytest.mark.parametrize(
    "flavor,video,latent",
    [
        ("cv4x8x8", (17, 512, 512), (5, 64, 64)),
        ("cv8x8x8", (121, 720, 1280), (16, 90, 160)),
        ("cv8x16x16", (121, 720, 1280), (16, 45, 80)),
        ("dv4x8x8", (17, 512, 512), (5, 64, 64)),
        ("dv8x8x8", (33, 256, 256), (5, 32, 32)),
        ("dv8x16x16", (121, 720, 1280), (16, 45, 80)),
        ("ci8x8", (1, 512, 512), (1, 64, 64)),
        ("di16x16", (1, 512, 512), (1, 32, 32)),
    ],
)
def test_flavors_compress_as_named(flavor, video, latent):
    with torch.device("meta"):
        model = VideoTokenizer(tokenizer_config(flavor))
        z = model.encode(torch.empty(1, 3, *video))
    z = z[0] if isinstance(z, tuple) else z
    channels = 6 if flavor.startswith("d") else 16
    assert tuple(z.shape) == (1, channels, *latent) == (1, channels, *model.latent_shape(*video))
    if flavor.startswith("d"):
        assert model.fsq.codebook_size == 64000


def test_every_flavor_is_listed_and_valid():
    assert {
        "cv4x8x8",
        "cv8x8x8",
        "cv8x16x16",
        "dv4x8x8",
        "dv8x8x8",
        "dv8x16x16",
        "ci8x8",
        "di16x16",
        "tiny",
    } <= set(TOKENIZER_FLAVORS)
    with pytest.raises(ConfigError, match=r"unknown tokenizer flavor 'cv4x8'.*Did you mean: cv4x8x8"):
        tokenizer_config("cv4x8")


def test_bad_inputs_name_the_fix():
    model = _tiny()
    with pytest.raises(
        ValueError, match=r"10 frames: a 4x temporal tokenizer takes 1 \+ 4k frames.*trim the video to 9"
    ):
        model.encode(_video(10))
    with pytest.raises(ValueError, match=r"frame size 30x32 is not a multiple of the 8x spatial compression"):
        model.encode(_video(5, 30, 32))
    with pytest.raises(ValueError, match=r"expected a video \[B, 3, T, H, W\]"):
        model.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match="tile=20, tile_overlap=0: both must be multiples of 8"):
        encode_video(model, _video(5), tile=20)
    image = VideoTokenizer(
        tokenizer_config("ci8x8", encoder_channels=(8, 8, 8, 8), decoder_channels=(8, 8, 8, 8))
    )
    with pytest.raises(ValueError, match="an image tokenizer takes T = 1 frame"):
        image.encode(torch.zeros(1, 3, 5, 32, 32))


def test_chunked_encode_takes_uint8_pixels_and_keeps_results_where_the_video_is():
    model = _tiny()
    pixels = torch.randint(0, 256, (1, 3, 9, 32, 32), dtype=torch.uint8)
    as_float = pixels.double() / 127.5 - 1.0
    z = encode_video(model, pixels, chunk_frames=4)
    torch.testing.assert_close(z, encode_video(model, as_float), rtol=0, atol=1e-12)
    assert z.device == pixels.device and z.dtype == torch.float64


def test_adversarial_losses_route_each_gradient_to_its_own_player():
    """One backward of the combined loss gives the tokenizer exactly grad(w L_G) and the
    discriminator exactly grad(L_D), as two separate optimizers would."""
    from cupola.collections.world.tokenizers.adversarial import PatchDiscriminator3D, adversarial_losses

    model = _tiny()
    torch.manual_seed(3)
    disc = PatchDiscriminator3D(channels=8, layers=2).double()
    x, w = _video(5), 0.7
    tok_params, disc_params = list(model.parameters()), list(disc.parameters())

    total, terms = adversarial_losses(disc, x, model(x), w)
    got = torch.autograd.grad(total, tok_params + disc_params, allow_unused=True)

    y = model(x)
    want_tok = torch.autograd.grad(-w * disc(y).mean(), tok_params, allow_unused=True)
    d_loss = torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(y.detach())).mean()
    want_disc = torch.autograd.grad(d_loss, disc_params)
    for g, want in zip(got, [*want_tok, *want_disc], strict=True):
        if want is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms["adversarial_d"], d_loss.detach())


def test_perceptual_and_gram_losses_with_local_vgg_weights(tmp_path, caplog):
    import logging

    from cupola.collections.world.tokenizers.losses import (
        ReconstructionLoss,
        ReconstructionLossConfig,
        VGGFeatures,
    )

    torch.manual_seed(0)
    vgg_file, lpips_file = tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"
    torch.save({f"features.{k}": v for k, v in VGGFeatures().features.state_dict().items()}, vgg_file)
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
        lpips_file,
    )
    cfg = ReconstructionLossConfig(
        perceptual=0.1, gram=0.5, gram_start_step=10, vgg_weights=str(vgg_file), lpips_weights=str(lpips_file)
    )
    loss = ReconstructionLoss(cfg)
    x = _video(3, dtype=torch.float32)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_()
    total, terms = loss(x, y, step=0)
    assert set(terms) == {"l1", "perceptual"} and terms["perceptual"] > 0  # Gram not yet
    total, terms = loss(x, y, step=10)
    assert set(terms) == {"l1", "perceptual", "gram"} and terms["gram"] > 0
    torch.testing.assert_close(total, terms["l1"] + 0.1 * terms["perceptual"] + 0.5 * terms["gram"])
    total.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    _, same_terms = loss(x, x.clone(), step=10)
    assert all(float(v) < 1e-6 for v in same_terms.values())
    with caplog.at_level(logging.WARNING):  # without weights: L1 only, said once
        _, terms = ReconstructionLoss(ReconstructionLossConfig(perceptual=0.1))(x, y, 0)
    assert set(terms) == {"l1"} and "perceptual and Gram losses are skipped" in caplog.text
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="is not a torchvision vgg16 state dict"):
        ReconstructionLoss(ReconstructionLossConfig(vgg_weights=str(tmp_path / "bad.pth")))
    with pytest.raises(ConfigError, match=r"vgg_weights=.*is not a file"):
        ReconstructionLoss(ReconstructionLossConfig(vgg_weights=str(tmp_path / "missing.pth")))
