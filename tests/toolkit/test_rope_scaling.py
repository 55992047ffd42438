"""RoPE frequency scaling kinds (linear, NTK-aware, YaRN) against transformers' ``ROPE_INIT_FUNCTIONS``
and ``LlamaRotaryEmbedding``, and their config errors. Llama 3 scaling is covered in test_modules.py."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cupola.collections.llm.models.gpt import GPT, GPTConfig, gpt_config
from cupola.toolkit.config import ConfigError, from_yaml, to_yaml
from cupola.toolkit.modules import RopeScaling, RotaryEmbedding, rope_inv_freq


def _hf_config(head_dim: int, max_len: int, **rope_parameters) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_len,
        rope_parameters=rope_parameters,
    )


# (head_dim, theta, factor, original length, beta_fast, beta_slow)
YARN_CASES = [
    (16, 10000.0, 4.0, 64, 32.0, 1.0),  # the tiny model: the ramp starts at channel 0
    (64, 10000.0, 4.0, 4096, 32.0, 1.0),
    (128, 1_000_000.0, 16.0, 32768, 32.0, 1.0),  # a Qwen2-like base
    (128, 500_000.0, 8.0, 8192, 16.0, 2.0),  # non-default betas
]


@pytest.mark.parametrize(("head_dim", "theta", "factor", "original", "beta_fast", "beta_slow"), YARN_CASES)
def test_yarn_matches_transformers(head_dim, theta, factor, original, beta_fast, beta_slow):
    hf = _hf_config(
        head_dim,
        int(original * factor),
        rope_type="yarn",
        rope_theta=theta,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
    )
    expected, expected_attention = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    scaling = RopeScaling(
        kind="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
    )
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    assert torch.equal(inv_freq, expected)
    assert scaling.attention_scaling == expected_attention == 0.1 * math.log(factor) + 1
    # Fast frequencies are kept (extrapolated), slow ones divided by the factor (interpolated).
    plain = rope_inv_freq(head_dim, theta)
    assert inv_freq[0] == plain[0]
    torch.testing.assert_close(inv_freq[-1], plain[-1] / factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("head_dim", "theta", "factor"), [(16, 10000.0, 4.0), (128, 500_000.0, 8.0)])
def test_linear_matches_transformers(head_dim, theta, factor):
    hf = _hf_config(head_dim, 4096, rope_type="linear", rope_theta=theta, factor=factor)
    expected, attention = ROPE_INIT_FUNCTIONS["linear"](hf, "cpu")
    scaling = RopeScaling(kind="linear", factor=factor)
    assert torch.equal(rope_inv_freq(head_dim, theta, scaling), expected)
    assert attention == scaling.attention_scaling == 1.0
    torch.testing.assert_close(expected, rope_inv_freq(head_dim, theta) / factor, rtol=0, atol=0)


@pytest.mark.parametrize(("head_dim", "theta", "factor"), [(16, 10000.0, 4.0), (128, 1_000_000.0, 8.0)])
def test_ntk_is_the_static_ntk_aware_base(head_dim, theta, factor):
    """``ntk``: base ``theta * factor ** (d / (d - 2))``, the lowest frequency divided by exactly ``factor``."""
    scaling = RopeScaling(kind="ntk", factor=factor)
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    new_base = theta * factor ** (head_dim / (head_dim - 2))
    assert torch.equal(inv_freq, rope_inv_freq(head_dim, new_base))
    plain = rope_inv_freq(head_dim, theta)
    assert inv_freq[0] == plain[0] == 1.0
    torch.testing.assert_close(inv_freq[-1], plain[-1] / factor, rtol=1e-6, atol=0)
    # HF's dynamic NTK, frozen at `factor` times its length with its own factor at 1, is the same base.
    original = 4096
    hf = _hf_config(head_dim, original, rope_type="dynamic", rope_theta=theta, factor=1.0)
    expected, attention = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=int(original * factor))
    assert torch.equal(inv_freq, expected)
    assert attention == scaling.attention_scaling == 1.0


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "linear", "factor": 4.0},
    ],
)
def test_cos_sin_tables_match_transformers_rotary_embedding(rope_parameters):
    """YaRN's attention factor multiplies cos and sin, as in ``LlamaRotaryEmbedding``."""
    head_dim, max_len, theta = 16, 256, 10000.0
    params = dict(rope_parameters)
    kind = params.pop("rope_type")
    rope = RotaryEmbedding(head_dim, max_len, theta=theta, scaling=RopeScaling(kind=kind, **params))
    hf_rope = LlamaRotaryEmbedding(_hf_config(head_dim, max_len, rope_theta=theta, **rope_parameters))
    positions = torch.arange(max_len)[None]
    hf_cos, hf_sin = hf_rope(torch.zeros(1, max_len, head_dim), positions)
    cos, sin = rope(max_len)
    torch.testing.assert_close(torch.cat([cos, cos], -1)[None], hf_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([sin, sin], -1)[None], hf_sin, rtol=1e-6, atol=1e-6)
    if kind == "yarn":
        assert cos[0, 0] == pytest.approx(0.1 * math.log(4.0) + 1)


def test_gpt_config_with_yarn_builds_runs_and_round_trips_yaml():
    cfg = gpt_config(
        "tiny", rope_scaling={"kind": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    )
    assert cfg.rope_scaling == RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=64)
    logits = GPT(cfg)(torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len)))
    assert torch.isfinite(logits).all()
    assert from_yaml(GPTConfig, to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "dynamic"}, r"RopeScaling.kind='dynamic'.*\['llama3', 'linear', 'ntk', 'yarn'\]"),
        ({"kind": "yarn", "factor": 0.5}, r"RopeScaling.factor=0.5 .*must be >= 1"),
        # A field the kind does not read is an error, not silently ignored.
        ({"kind": "linear", "beta_fast": 16.0}, r"RopeScaling.beta_fast=16.0 .*only kind 'yarn' reads it"),
        ({"kind": "ntk", "low_freq_factor": 2.0}, r"RopeScaling.low_freq_factor=2.0 .*only kind 'llama3'"),
        (
            {"kind": "linear", "original_max_position_embeddings": 64},
            r"original_max_position_embeddings=64 .*only kind 'llama3' / 'yarn' reads it",
        ),
        ({"kind": "yarn", "beta_slow": 40.0}, r"RopeScaling.beta_slow=40.0 .*0 < beta_slow < beta_fast"),
        (
            {"kind": "yarn", "original_max_position_embeddings": 0},
            r"original_max_position_embeddings=0 .*> 0",
        ),
        ({"kind": "llama3", "low_freq_factor": 5.0}, r"RopeScaling.low_freq_factor=5.0"),
    ],
)
def test_scaling_errors_name_the_field(kwargs, message):
    scaling = RopeScaling(**kwargs)
    with pytest.raises(ConfigError, match=message):
        scaling.validate()
    with pytest.raises(ConfigError, match=message):  # also when a model is built from it
        GPT(_tiny_with(scaling))


def _tiny_with(scaling: RopeScaling) -> GPTConfig:
    cfg = gpt_config("tiny")
    cfg.rope_scaling = scaling
    return cfg


def test_ntk_needs_more_than_one_frequency_pair():
    with pytest.raises(ConfigError, match=r"kind='ntk' .*rotary dim > 2 \(got 2\)"):
        rope_inv_freq(2, 10000.0, RopeScaling(kind="ntk", factor=2.0))
