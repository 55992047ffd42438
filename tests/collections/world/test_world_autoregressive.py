"""The autoregressive world model: causality, 3D RoPE, KV-cached decoding equal to the full forward
(with and without cross-attention), seeded sampling, video continuation through a DV tokenizer, the
Cosmos 4B size, and a tiny CPU training run whose loss falls."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cupola.collections.world.autoregressive import ARWorldModel, ar_config, continue_video, generate
from cupola.collections.world.text import TextEncoderConfig
from cupola.toolkit.modules.attention import StaticKVCache
from cupola.toolkit.testing import spawn

GRID = (3, 4, 4)


def _model(cross: bool = False, dtype=torch.float64, seed: int = 0) -> ARWorldModel:
    torch.manual_seed(seed)
    text = TextEncoderConfig(dim=32, n_layers=1, n_heads=2) if cross else None
    model = ARWorldModel(ar_config("tiny", cross_attention=cross, text=text))
    model.init_weights()
    with torch.no_grad():  # larger than init so that differences are not washed out
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5)
    return model.to(dtype).eval()


def _tokens(B: int = 2, n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 125, (B, n), generator=torch.Generator().manual_seed(seed))


def _context(model: ARWorldModel):
    ctx, mask = model.encode_text(["a red cube", "two discs collide on the floor"])
    return ctx.double(), mask


def test_changing_a_later_token_never_changes_earlier_logits():
    model = _model()
    x = _tokens()
    y = x.clone()
    y[:, 30] = (y[:, 30] + 1) % 125
    a, b = model(x, GRID), model(y, GRID)
    assert torch.equal(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_positions_are_3d_over_the_grid():
    model = _model()
    x = _tokens()
    # the same 48 tokens read as a 3x4x4 or a 1x6x8 grid get different positions, hence logits
    assert not torch.allclose(model(x, (3, 4, 4)), model(x, (1, 6, 8)))
    # transposing h and w inside each frame is not a mere permutation of the outputs
    perm = torch.arange(48).view(3, 4, 4).transpose(1, 2).reshape(-1)
    assert not torch.allclose(model(x[:, perm], GRID)[:, perm], model(x, GRID))
    with pytest.raises(ValueError, match="max_latent"):
        model(x[:, :10], (9, 1, 10))


@pytest.mark.parametrize("cross", [False, True])
def test_kv_cached_decoding_equals_the_full_forward(cross):
    model = _model(cross)
    x = _tokens()
    extra = dict(zip(("context", "context_mask"), _context(model), strict=True)) if cross else {}
    full = model(x, GRID, **extra)
    cache = model.new_kv_cache()
    parts = [model(x[:, :20], GRID, kv_cache=cache, **extra)]  # prefill (first frame and a bit)
    parts += [model(x[:, i : i + 1], GRID, kv_cache=cache, **extra) for i in range(20, 40)]
    parts.append(model(x[:, 40:], GRID, kv_cache=cache, **extra))  # a chunk after single tokens
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="context"):
        model(x, GRID) if cross else model(x, GRID, context=torch.zeros(2, 3, 32, dtype=torch.float64))


def test_greedy_top_k_1_and_seeds():
    model = _model(dtype=torch.float32)
    prefix = _tokens(n=16)
    greedy = generate(model, prefix, GRID, 32, temperature=0)
    assert greedy.shape == (2, 48) and torch.equal(greedy[:, :16], prefix)
    assert torch.equal(greedy, generate(model, prefix, GRID, 32, temperature=0))
    assert torch.equal(greedy, generate(model, prefix, GRID, 32, temperature=0.7, top_k=1, seed=3))
    a = generate(model, prefix, GRID, 32, temperature=1.0, seed=1)
    b = generate(model, prefix, GRID, 32, temperature=1.0, seed=1)
    c = generate(model, prefix, GRID, 32, temperature=1.0, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = generate(model, prefix, GRID, 32, temperature=1.0, top_p=0.5, seed=1)
    assert d.min() >= 0 and d.max() < 125
    # top_p keeps only the most likely token when its mass alone reaches top_p
    assert torch.equal(greedy, generate(model, prefix, GRID, 32, temperature=1e-4, top_p=0.1, seed=5))


@pytest.mark.parametrize("cross", [False, True])
def test_static_decode_steps_give_the_eager_tokens_and_logits(cross):
    # the fixed-shape step a CUDA graph captures (a device-side position, the whole cache masked)
    model = _model(cross)
    extra = dict(zip(("context", "context_mask"), _context(model), strict=True)) if cross else {}
    prefix = _tokens(n=16)
    eager = generate(model, prefix, GRID, 32, temperature=1.0, seed=4, decode="eager", **extra)
    assert torch.equal(
        eager, generate(model, prefix, GRID, 32, temperature=1.0, seed=4, decode="static", **extra)
    )
    # step by step: each static step's logits are the full forward's at that position
    cache = StaticKVCache(model.cfg.n_layers, 48, "cpu")
    table = model.rope(GRID, 0, 48, "cpu")
    model(eager[:, :16], GRID, kv_cache=cache, **extra)
    full = model(eager, GRID, **extra)
    for i in range(16, 47):
        logits = model.decode_step(eager[:, i : i + 1], cache, table, **extra)
        torch.testing.assert_close(logits, full[:, i], rtol=0, atol=1e-10)
    assert int(cache.position) == 47
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, prefix, GRID, 4, decode="graph", **extra)
    with pytest.raises(ValueError, match="decode="):
        generate(model, prefix, GRID, 4, decode="fast", **extra)


def test_the_4b_flavor_has_4b_parameters():
    with torch.device("meta"):
        n4 = sum(p.numel() for p in ARWorldModel(ar_config("cosmos_ar_4b")).parameters())
        n12 = sum(p.numel() for p in ARWorldModel(ar_config("cosmos_ar_12b")).parameters())
    assert 3.9e9 < n4 < 4.1e9 and 11.9e9 < n12 < 12.2e9


def test_continue_video_keeps_the_given_frames_tokens():
    from cupola.collections.world.tokenizers.model import VideoTokenizer, tokenizer_config

    torch.manual_seed(0)
    tok = VideoTokenizer(tokenizer_config("tiny_dv")).eval()
    model = _model(dtype=torch.float32)
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1  # 5 frames -> 2 latent frames
    out, idx = continue_video(model, tok, video, 13, temperature=1.0, top_k=20, seed=0)
    assert out.shape == (2, 3, 13, 32, 32) and idx.shape == (2, 4, 4, 4)
    assert torch.equal(idx[:, :2], tok.encode(video)[1])
    with pytest.raises(ValueError, match="1 \\+ k"):
        continue_video(model, tok, video, 12)


def test_continue_video_with_text():
    from cupola.collections.world.tokenizers.model import VideoTokenizer, tokenizer_config

    tok = VideoTokenizer(tokenizer_config("tiny_dv")).eval()
    model = _model(cross=True, dtype=torch.float32)
    video = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    out, idx = continue_video(model, tok, video, 9, prompts=["a cube"], temperature=0)
    assert out.shape == (1, 3, 9, 32, 32) and torch.equal(idx[:, :1], tok.encode(video)[1])


# training ----------------------------------------------------------------------------------------


def _train_tokenizer(rank: int, world: int, out: str) -> None:
    from cupola.collections.world.data import VideoClipDataModule
    from cupola.collections.world.tokenizers import api
    from cupola.collections.world.tokenizers.model import tokenizer_config
    from cupola.toolkit.training.configs import OptimConfig, TrainerConfig

    data = VideoClipDataModule(train="synthetic:shapes", num_frames=9, size=32, micro_batch_size=4)
    trainer = TrainerConfig(max_steps=4, precision="32", output_dir=out, log_every_n_steps=2)
    api.train(tokenizer_config("tiny_dv"), data, trainer, OptimConfig(lr=2e-3, warmup_steps=1))


def _train_both(rank: int, world: int, tok: str, out: str, steps: int, cross: bool) -> None:
    _train_tokenizer(rank, world, tok)
    _train_ar(rank, world, out, tok, steps, cross)


def _train_ar(rank: int, world: int, out: str, tokenizer: str, steps: int, cross: bool) -> None:
    from cupola.collections.world.autoregressive import api
    from cupola.collections.world.data import VideoClipDataModule
    from cupola.collections.world.data.environments import EnvironmentDataModule
    from cupola.toolkit.training.configs import OptimConfig, TrainerConfig

    if cross:
        data = EnvironmentDataModule(
            kind="push", num_frames=9, size=32, micro_batch_size=4, train_episodes=32
        )
        model = ar_config("tiny", cross_attention=True, text=TextEncoderConfig(dim=32, n_layers=1, n_heads=2))
    else:
        data = VideoClipDataModule(train="synthetic:shapes", num_frames=9, size=32, micro_batch_size=4)
        model = ar_config("tiny")
    trainer = TrainerConfig(max_steps=steps, precision="32", output_dir=out, log_every_n_steps=1)
    api.train(model, data, trainer, OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2), tokenizer=tokenizer)


def _series(run: Path, key: str) -> list[float]:
    rows = csv.DictReader((run / "logs" / "metrics.csv").open())
    return [float(r[key]) for r in rows if r.get(key)]


def test_tiny_training_loss_falls_and_the_run_loads_for_generation(tmp_path):
    from cupola.collections.world.autoregressive.lightning import load_ar

    tok, ar = tmp_path / "tok", tmp_path / "ar"
    spawn(_train_both, 1, str(tok), str(ar), 30, True)  # one process: a DV tokenizer, then the AR model
    loss = _series(ar, "train/loss")
    print("AR loss", [round(v, 3) for v in loss])
    assert len(loss) == 30
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5])
    model, tokenizer = load_ar(ar)
    video = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    out, _ = continue_video(model, tokenizer, video, 9, prompts=["push the red disc"], temperature=0)
    assert out.shape == (1, 3, 9, 32, 32) and torch.isfinite(out).all()
