"""cupola GPT against HF transformers (fp32, CPU, tiny random models), through the real converters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, NemotronConfig, NemotronForCausalLM

from cupola.collections.llm.models.gpt import (
    GPT,
    gpt_config,
    gpt_to_hf_llama_config,
    gpt_to_hf_llama_state_dict,
    hf_llama_config_to_gpt,
    hf_llama_to_gpt_state_dict,
    load_hf_llama,
    save_hf_llama,
)
from cupola.toolkit import hub

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # small, so the tiny model's positions cross all three bands
}
CASES = {
    "gqa_untied": {"rope_theta": 10000.0, "tie_word_embeddings": False},
    "llama3_scaling_tied": {
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_SCALING,
        "tie_word_embeddings": True,
    },
}


def _hf_llama(case: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **CASES[case],
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1 in HF; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 48), generator=g)
    positions = torch.arange(48).expand(2, 48) + torch.tensor([[0], [150]])  # second row offset
    return tokens, positions


@pytest.mark.parametrize("case", list(CASES))
def test_hf_llama_to_cupola_logits_match(case, tmp_path):
    hf = _hf_llama(case)
    hf.save_pretrained(tmp_path)
    cfg, state_dict = load_hf_llama(str(tmp_path))
    assert cfg.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in CASES[case])
    model = GPT(cfg).eval()
    model.load_state_dict(state_dict, strict=True)
    tokens, positions = _inputs(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
        expected = hf(tokens, position_ids=positions).logits
        torch.testing.assert_close(model(tokens, positions), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_cupola_to_hf_from_pretrained_logits_match(case, tmp_path):
    cfg = hf_llama_config_to_gpt(_hf_llama(case).config.to_dict())
    torch.manual_seed(2)
    model = GPT(cfg).eval()
    # Several shards for the tied case, so from_pretrained reads an index too.
    max_shard = 64 * 1024 if cfg.tie_embeddings else 5 * 2**30
    save_hf_llama(model, cfg, tmp_path, max_shard_size=max_shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == cfg.tie_embeddings
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens, positions = _inputs(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            hf(tokens, position_ids=positions).logits, model(tokens, positions), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_cupola_to_hf_round_trip_is_exact(case, tmp_path):
    hf = _hf_llama(case)
    hf.save_pretrained(tmp_path)
    hf_sd = hub.load_state_dict(tmp_path)
    cfg = hf_llama_config_to_gpt(hub.read_config(tmp_path))
    back = gpt_to_hf_llama_state_dict(hf_llama_to_gpt_state_dict(hf_sd, cfg), cfg)
    assert back.keys() == hf_sd.keys()
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    assert hf_llama_config_to_gpt(gpt_to_hf_llama_config(cfg)) == cfg


def test_converters_are_strict_and_name_the_keys():
    cfg = gpt_config("tiny")
    sd = GPT(cfg).state_dict()
    hf_sd = gpt_to_hf_llama_state_dict(sd, cfg)
    with pytest.raises(KeyError, match=r"unknown keys \['model.layers.0.self_attn.q_norm.weight'\]"):
        hf_llama_to_gpt_state_dict({**hf_sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, cfg)
    missing = {k: v for k, v in hf_sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        hf_llama_to_gpt_state_dict(missing, cfg)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(65,\), the config expects \(64,\)"):
        hf_llama_to_gpt_state_dict({**hf_sd, "model.norm.weight": torch.ones(65)}, cfg)
    with pytest.raises(KeyError, match=r"missing keys \['output.weight'\]"):
        gpt_to_hf_llama_state_dict({k: v for k, v in sd.items() if k != "output.weight"}, cfg)
    with pytest.raises(ValueError, match=r"mlp='squared_relu' is not supported; Llama needs 'swiglu'"):
        gpt_to_hf_llama_config(gpt_config("tiny", mlp="squared_relu"))
    with pytest.raises(
        ValueError, match=r"rope_type='longrope' is not supported; supported: 'default', 'llama3'"
    ):
        hf_llama_config_to_gpt(
            {**gpt_to_hf_llama_config(cfg), "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}
        )


def test_nemotron_architecture_matches_hf_nemotron():
    """squared-ReLU MLP, zero-centered LayerNorm with bias and partial rotary equal HF's NemotronForCausalLM."""
    torch.manual_seed(0)
    hf_config = NemotronConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )
    hf = NemotronForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = gpt_config(
        "nemotron4_15b",
        vocab_size=300,
        dim=64,
        ffn_hidden_size=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
    )
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.up_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state_dict = {}
    for key, tensor in hf.state_dict().items():
        key = key.replace("model.embed_tokens", "tok_embeddings").replace("lm_head", "output")
        key = key.replace("model.norm", "norm").replace("model.layers", "layers")
        for hf_name, ours in names.items():
            key = key.replace(hf_name, ours)
        state_dict[key] = tensor
    model = GPT(cfg).eval()
    model.load_state_dict(state_dict, strict=True)
    tokens, _ = _inputs(300)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "yarn", "ntk"])
def test_context_extended_rope_exports_to_transformers(kind, tmp_path):
    """A config extended with linear / YaRN / NTK RoPE scaling exports to a Llama folder whose
    transformers logits equal ours, and (linear, YaRN) reads back to the same scaling."""
    from cupola.collections.llm.models.gpt import RopeScaling, save_hf_llama
    from cupola.collections.llm.models.gpt.convert import hf_llama_config_to_gpt

    extra = {"original_max_position_embeddings": 64} if kind == "yarn" else {}
    cfg = gpt_config("tiny", max_seq_len=256, rope_scaling=RopeScaling(kind=kind, factor=4.0, **extra))
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    save_hf_llama(ours.state_dict(), cfg, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=2e-4, atol=2e-4)
    back = hf_llama_config_to_gpt(hub.read_config(tmp_path))
    if kind != "ntk":  # NTK is written as the equivalent larger rope_theta
        assert back.rope_scaling == cfg.rope_scaling
