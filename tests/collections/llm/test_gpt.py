"""GPT model: meta-device init, flavors and their published sizes, FLOPs, config errors, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cupola.collections.llm.models.gpt import (
    FLAVORS,
    GPT,
    GPTConfig,
    gpt_config,
    num_flops_per_token,
    num_matmul_params,
)
from cupola.toolkit.config import ConfigError


def _meta_init(cfg: GPTConfig, seed: int) -> GPT:
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_meta_init_is_finite_and_deterministic(tied):
    cfg = gpt_config("tiny", tie_embeddings=tied)
    a, b, c = _meta_init(cfg, 0), _meta_init(cfg, 0), _meta_init(cfg, 1)
    assert (a.output.weight is a.tok_embeddings.weight) == tied
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(sd_a["layers.0.attention.wq.weight"], sd_c["layers.0.attention.wq.weight"])
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    logits = a(tokens)
    assert logits.shape == (2, 24, cfg.vocab_size) and torch.isfinite(logits).all()
    # The RoPE tables (non-persistent buffers) were rebuilt: same logits as an eagerly built model.
    eager = GPT(cfg)
    eager.load_state_dict(sd_a)
    torch.testing.assert_close(eager(tokens), logits, rtol=0, atol=0)


def test_positions_embed_split_and_length_check():
    torch.manual_seed(0)
    cfg = gpt_config("tiny", norm="layernorm1p", mlp="squared_relu", rotary_percent=0.5)
    model = GPT(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(tokens)
    torch.testing.assert_close(model.forward_embeddings(model.embed(tokens)), logits, rtol=0, atol=0)
    positions = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(model(tokens, positions), logits, rtol=0, atol=0)
    # RoPE only encodes relative positions: a constant offset leaves the logits unchanged.
    torch.testing.assert_close(model(tokens, positions + 100), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len=256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_packed_documents_do_not_see_each_other():
    """With document_ids, each packed sample's logits equal those of the sample alone."""
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny"))
    a, b = torch.randint(0, 200, (1, 10)), torch.randint(0, 200, (1, 6))
    pad = torch.full((1, 4), 258)
    tokens = torch.cat([a, b, pad], 1)
    positions = torch.cat([torch.arange(10), torch.arange(6), torch.arange(4)])[None]
    documents = torch.tensor([[0] * 10 + [1] * 6 + [-1] * 4])
    packed = model(tokens, positions, documents)
    torch.testing.assert_close(packed[:, :10], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 10:16], model(b), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed).all()  # padding attends to itself, never to an empty row
    unmasked = model(tokens, positions)  # without document_ids the second sample sees the first
    assert not torch.allclose(unmasked[:, 10:16], model(b), atol=1e-3)


def test_unknown_flavor_suggests_close_name():
    with pytest.raises(ConfigError, match=r"'tny'.*Did you mean: tiny\?.*llama3_8b"):
        gpt_config("tny")
    with pytest.raises(ConfigError, match=r"'n_layer'.*Did you mean: n_layers"):
        gpt_config("tiny", n_layer=4)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"n_kv_heads": 3}, r"GPTConfig.n_kv_heads=3 .* divide n_heads \(4\)"),
        ({"mlp": "gelu"}, r"GPTConfig.mlp='gelu' .*swiglu"),
        ({"norm": "batchnorm"}, r"GPTConfig.norm='batchnorm' .*rmsnorm"),
        ({"rotary_percent": 0.1}, r"GPTConfig.rotary_percent=0.1 .*even"),
        ({"dim": 66}, r"GPTConfig.dim=66 .*n_heads \(4\)"),
    ],
)
def test_invalid_configs_name_field_value_and_allowed(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        gpt_config("tiny", **overrides)


@pytest.mark.parametrize(
    ("flavor", "expected"),
    [
        ("llama3_8b", 8_030_261_248),  # HF meta-llama/Meta-Llama-3-8B: 8.03B
        ("llama3_2_1b", 1_235_814_400),  # HF meta-llama/Llama-3.2-1B: 1.24B (tied embeddings)
        ("nemotron4_15b", 15.6e9),  # arXiv 2402.16819: 15B (15.6B with embeddings)
    ],
)
def test_flavor_parameter_counts_match_published_sizes(flavor, expected):
    with torch.device("meta"):
        model = GPT(gpt_config(flavor))
    n_params = sum(p.numel() for p in model.parameters())
    if isinstance(expected, int):
        assert n_params == expected
    else:
        assert round(n_params / 1e9, 1) == expected / 1e9
    # FLOPs convention: 6 per matmul weight (every nn.Linear, output included) + attention term.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert num_matmul_params(model.cfg) == linear
    cfg = model.cfg
    expected_flops = 6 * linear + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 4096
    assert num_flops_per_token(cfg, 4096) == expected_flops


def test_flavors_are_valid_and_sourced():
    assert {"tiny", "llama3_2_1b", "llama3_8b", "nemotron4_15b"} <= set(FLAVORS)
    assert FLAVORS["tiny"].vocab_size >= 259  # room for a byte tokenizer with specials
    nemotron = gpt_config("nemotron4_15b")
    assert (nemotron.mlp, nemotron.norm, nemotron.rotary_percent) == ("squared_relu", "layernorm1p", 0.5)


def test_tiny_overfits_a_batch_quickly():
    torch.manual_seed(0)
    cfg = gpt_config("tiny")
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33))
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(6.24, abs=0.1)  # ln(512): small init gives uniform predictions
    assert losses[-1] < 0.5 * losses[0]
