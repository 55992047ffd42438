"""VLM vision side: SigLIP tower parity with HF transformers (fp32, CPU, tiny random models) through
the real converter, the mlp_downsample projector's 2 x 2 merge, config errors, meta-device init."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from cupola.collections.vlm.models.convert_siglip import (
    load_siglip_vision,
    siglip_vision_sources,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_state_dict_from_hf,
    vision_state_dict_to_hf,
)
from cupola.collections.vlm.models.projector import MLPDownsampleProjector, merge_2x2
from cupola.collections.vlm.models.vision import VisionConfig, VisionTower, vision_config
from cupola.toolkit import hub
from cupola.toolkit.config import ConfigError

# 36 px with 8 px patches: a 4 x 4 grid that leaves 4 pixel rows/columns unseen, as so400m at 384 px does.
HF_VISION = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=36,
    patch_size=8,
    layer_norm_eps=1e-6,
)


def _perturb(model: torch.nn.Module) -> None:
    """HF starts norms at 1 and biases near 0; move every tensor so a swapped one shows."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _hf_vision(attn: str = "eager") -> SiglipVisionModel:
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**HF_VISION, attn_implementation=attn)).eval()
    _perturb(model)
    return model


def _pixels(n: int = 2, size: int = 36) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _hf_features(hf: torch.nn.Module, pixels: torch.Tensor, select_layer: int, n_layers: int) -> torch.Tensor:
    out = hf(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == n_layers + 1
    return out.last_hidden_state if select_layer == -1 else out.hidden_states[select_layer]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1, 0])
def test_features_match_hf_hidden_states(select_layer, attn):
    hf = _hf_vision(attn)
    cfg = vision_config_from_hf(hf.config, select_layer=select_layer)
    assert (cfg.grid, cfg.num_patches, cfg.n_layers) == (4, 16, 3)
    tower = VisionTower(cfg).eval()
    tower.load_state_dict(vision_state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    pixels = _pixels()
    with torch.no_grad():
        ours = tower(pixels)
        expected = _hf_features(hf, pixels, select_layer, cfg.n_layers)
    assert ours.shape == (2, 16, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_round_trip_and_export_load_in_hf(tmp_path):
    hf = _hf_vision()
    hf_sd = hf.state_dict()
    cfg = vision_config_from_hf(hf.config)
    ours = vision_state_dict_from_hf(hf_sd, cfg)
    assert not any("head" in k for k in ours)  # the attention-pooling head is dropped
    # Unprefixed (transformers 5.x state_dict) and prefixed (checkpoint files) both round-trip exactly.
    back = vision_state_dict_to_hf(ours, cfg, prefix="")
    assert back.keys() == {k for k in hf_sd if not k.startswith("head.")}
    assert all(torch.equal(back[k], hf_sd[k]) for k in back)
    prefixed = {f"vision_model.{k}": v for k, v in hf_sd.items()}
    again = vision_state_dict_to_hf(vision_state_dict_from_hf(prefixed, cfg), cfg)
    assert again.keys() == {k for k in prefixed if ".head." not in k}
    assert all(torch.equal(again[k], prefixed[k]) for k in again)
    # The export (prefixed keys + a head-less config) loads in transformers and gives the same features.
    tower = VisionTower(vision_config_from_hf(hf.config, select_layer=-1)).eval()
    tower.load_state_dict(ours)
    hub.save_checkpoint(tmp_path, vision_state_dict_to_hf(tower.state_dict(), cfg), vision_config_to_hf(cfg))
    reloaded = SiglipVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert not reloaded.config.vision_use_head
    with torch.no_grad():
        torch.testing.assert_close(tower(_pixels()), reloaded(pixel_values=_pixels()).last_hidden_state)


def test_strict_conversion_names_the_tensor():
    hf = _hf_vision()
    cfg = vision_config_from_hf(hf.config)
    sd = dict(hf.state_dict())
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.2.mlp.fc2.bias"}
    with pytest.raises(KeyError, match=r"missing keys \['encoder\.layers\.2\.mlp\.fc2\.bias'\]"):
        vision_state_dict_from_hf(missing, cfg)
    extra = {**sd, "encoder.layers.3.mlp.fc1.weight": torch.zeros(96, 64)}
    with pytest.raises(KeyError, match=r"unknown keys \['encoder\.layers\.3\.mlp\.fc1\.weight'\]"):
        vision_state_dict_from_hf(extra, cfg)
    wrong = {**sd, "embeddings.position_embedding.weight": torch.zeros(17, 64)}
    with pytest.raises(ValueError, match=r"embeddings\.position_embedding\.weight has shape \(17, 64\)"):
        vision_state_dict_from_hf(wrong, cfg)
    ours = vision_state_dict_from_hf(sd, cfg)
    with pytest.raises(KeyError, match=r"missing keys \['post_layernorm\.bias'\]"):
        vision_state_dict_to_hf({k: v for k, v in ours.items() if k != "post_layernorm.bias"}, cfg)
    # A config whose tower is deeper than the checkpoint: every absent layer is named.
    deeper = vision_config_from_hf({**HF_VISION, "num_hidden_layers": 4})
    with pytest.raises(KeyError, match=r"encoder\.layers\.3\.layer_norm1\.bias"):
        vision_state_dict_from_hf(sd, deeper)


def test_load_local_folders_vision_model_and_full_siglip(tmp_path):
    # A SiglipVisionModel folder as transformers writes it.
    hf = _hf_vision()
    hf.save_pretrained(tmp_path / "vision")
    tower = load_siglip_vision(tmp_path / "vision").eval()
    assert tower.cfg.select_layer == -2
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), _hf_features(hf, pixels, -2, 3), rtol=1e-5, atol=1e-5)

    # A full SiglipModel folder (text tower, logit scale/bias, vision_model.* keys, nested config).
    torch.manual_seed(3)
    text = dict(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    full = SiglipModel(SiglipConfig(text_config=text, vision_config=HF_VISION)).eval()
    _perturb(full)
    sd = full.state_dict()
    assert any(k.startswith("text_model.") for k in sd) and "logit_scale" in sd
    folder = tmp_path / "full"
    hub.save_checkpoint(folder, sd, {"model_type": "siglip", "vision_config": HF_VISION, "text_config": text})
    tower = load_siglip_vision(folder, select_layer=-1).eval()
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(tower(pixels), expected, rtol=1e-5, atol=1e-5)

    # Lazy sources for sharded loading: the same tensors; an architecture mismatch names the field.
    sources = siglip_vision_sources(folder, tower.cfg)
    assert sources.keys() == tower.state_dict().keys()
    src = sources["layers.1.attention.wk.weight"]
    assert torch.equal(src[(slice(0, 8), slice(None))], tower.layers[1].attention.wk.weight[:8])
    with pytest.raises(ConfigError, match=r"'n_layers': \(3, 2\)"):
        siglip_vision_sources(folder, vision_config_from_hf({**HF_VISION, "num_hidden_layers": 2}))


def test_missing_checkpoint_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="cupola never downloads"):
        load_siglip_vision(tmp_path / "nowhere")


def test_hf_config_reading():
    # Full-SigLIP config.json files omit SiglipVisionConfig's defaults (eps, channels, act).
    so400m = {
        "model_type": "siglip",
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 384,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
        },
    }
    assert vision_config_from_hf(so400m) == vision_config("siglip_so400m_384")
    assert vision_config_from_hf(so400m["vision_config"]) == vision_config("siglip_so400m_384")
    assert vision_config_from_hf(SiglipVisionConfig(**HF_VISION)).dim == 64
    assert vision_config_from_hf({**HF_VISION, "image_size": [36, 36]}).image_size == 36
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        vision_config_from_hf({**HF_VISION, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match=r"image_size=\[36, 40\]"):
        vision_config_from_hf({**HF_VISION, "image_size": [36, 40]})
    with pytest.raises(ConfigError, match="model_type='clip_vision_model'"):
        vision_config_from_hf({**HF_VISION, "model_type": "clip_vision_model"})


def test_config_errors_name_the_field():
    cases = {
        "VisionConfig.dim=66": dict(dim=66),
        "VisionConfig.select_layer=3": dict(select_layer=3),
        r"VisionConfig.select_layer=-4 .*\[-3, 2\]": dict(select_layer=-4),
        r"VisionConfig.patch_size=40 .*image_size \(32\)": dict(patch_size=40),
        "VisionConfig.n_heads=0": dict(n_heads=0),
        "VisionConfig.layer_norm_eps=0.0": dict(layer_norm_eps=0.0),
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            vision_config("tiny", **overrides)
    with pytest.raises(ConfigError, match="Did you mean: select_layer"):
        vision_config("tiny", select_layers=-2)
    with pytest.raises(ConfigError, match="unknown vision flavor 'siglip'"):
        vision_config("siglip")
    with pytest.raises(ValueError, match=r"pixels \[N, 3, 32, 32\].*got \[2, 3, 36, 36\]"):
        VisionTower(vision_config("tiny"))(_pixels())


def _meta_init(cfg: VisionConfig, seed: int) -> tuple[VisionTower, MLPDownsampleProjector]:
    with torch.device("meta"):
        tower, projector = VisionTower(cfg), MLPDownsampleProjector(cfg.dim, 48)
    tower.to_empty(device="cpu")
    projector.to_empty(device="cpu")
    with torch.no_grad():  # whatever init_weights leaves untouched stays NaN
        for p in [*tower.parameters(), *projector.parameters()]:
            p.fill_(float("nan"))
    torch.manual_seed(seed)
    tower.init_weights()
    projector.init_weights()
    return tower, projector


def test_meta_init_is_deterministic():
    cfg = vision_config("tiny")
    (a, pa), (b, pb), (c, _) = _meta_init(cfg, 0), _meta_init(cfg, 0), _meta_init(cfg, 1)
    for x, y in ((a, b), (pa, pb)):
        sx, sy = x.state_dict(), y.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
    assert not torch.equal(a.layers[0].attention.wq.weight, c.layers[0].attention.wq.weight)
    features = a(_pixels(size=32))
    tokens = pa(features)
    assert features.shape == (2, 16, 64) and tokens.shape == (2, 4, 48)
    assert all(torch.isfinite(p).all() for p in [*a.parameters(), *pa.parameters()])
    assert torch.isfinite(tokens).all()
    # init_weights does not depend on what the tensors held: an eager tower re-initialised from seed 0 matches.
    eager = VisionTower(cfg)
    torch.manual_seed(0)
    eager.init_weights()
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in eager.state_dict().items())


def test_so400m_shapes_on_meta():
    cfg = vision_config("siglip_so400m_384")
    assert (cfg.grid, cfg.num_patches, MLPDownsampleProjector.tokens_out(cfg.num_patches)) == (27, 729, 196)
    with torch.device("meta"):
        tower, projector = VisionTower(cfg), MLPDownsampleProjector(cfg.dim, 4096)
        tokens = projector(tower(torch.empty(2, 3, 384, 384)))
    assert tokens.shape == (2, 196, 4096)
    assert len(tower.layers) == 27  # all layers are built though the forward stops at 26


def _coordinates(g: int) -> torch.Tensor:
    """Features [1, g*g, 2] holding each patch's (row + 1, column + 1), so zero padding stands out."""
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(1, g * g, 2).float() + 1


@pytest.mark.parametrize("g", [4, 5, 27])
@pytest.mark.parametrize("token_order", ["column", "row"])
def test_merge_groups_each_2x2_block(g, token_order):
    merged = merge_2x2(_coordinates(g), token_order)
    h = (g + 1) // 2
    assert merged.shape == (1, h * h, 8)
    for bi in range(h):
        for bj in range(h):
            token = bj * h + bi if token_order == "column" else bi * h + bj
            expected = []
            for r, c in (
                (2 * bi, 2 * bj),
                (2 * bi, 2 * bj + 1),
                (2 * bi + 1, 2 * bj),
                (2 * bi + 1, 2 * bj + 1),
            ):
                expected += [r + 1, c + 1] if r < g and c < g else [0, 0]  # padding: bottom row, right column
            assert merged[0, token].tolist() == expected, (bi, bj)


def test_projector_shapes_and_errors():
    torch.manual_seed(0)
    projector = MLPDownsampleProjector(8, 16)
    for g, tokens in ((27, 196), (4, 4), (5, 9), (1, 1)):
        assert MLPDownsampleProjector.tokens_out(g * g) == tokens
        assert projector(torch.randn(3, g * g, 8)).shape == (3, tokens, 16)
    # The forward is merge -> LayerNorm -> fc1 -> GELU -> fc2, on the merged tokens.
    x = torch.randn(2, 25, 8)
    manual = projector.fc2(torch.nn.functional.gelu(projector.fc1(projector.norm(merge_2x2(x)))))
    torch.testing.assert_close(projector(x), manual, rtol=0, atol=0)
    for bad in (10, 0):
        with pytest.raises(ValueError, match=f"{bad} patches is not a perfect square"):
            MLPDownsampleProjector.tokens_out(bad)
    with pytest.raises(ValueError, match="10 patches is not a perfect square"):
        projector(torch.randn(1, 10, 8))
    with pytest.raises(ConfigError, match="token_order='diagonal'"):
        MLPDownsampleProjector(8, 16, token_order="diagonal")


def test_load_transformers4_layout_folder(tmp_path):
    """VILA 1.5 ships its tower as a transformers 4.x SiglipVisionModel folder: vision_model.* keys, head included."""
    (tmp_path / "config.json").write_text(json.dumps({**HF_VISION, "model_type": "siglip_vision_model"}))
    hf = _hf_vision()
    save_file(
        {f"vision_model.{k}": v.contiguous() for k, v in hf.state_dict().items()},
        tmp_path / "model.safetensors",
    )
    tower = load_siglip_vision(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(_pixels()), _hf_features(hf, _pixels(), -2, 3), rtol=1e-5, atol=1e-5)
