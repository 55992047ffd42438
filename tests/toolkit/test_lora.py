"""LoRA adapters: a fresh adapter changes nothing, merged weights compute what the adapters did, only
the adapters (and, LongLoRA-style, embeddings and norms) train, and bad configs name the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cupola.collections.llm.models.gpt import GPT, gpt_config
from cupola.toolkit.config import ConfigError
from cupola.toolkit.modules.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    init_lora,
    merge_lora_weights,
    set_lora_trainable,
)


def _tokens(cfg, n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(3))


def _gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("tiny", **overrides))


def test_fresh_adapters_leave_the_model_unchanged():
    plain = _gpt()
    adapted = _gpt()
    names = apply_lora(adapted, LoRAConfig())
    assert len(names) == 4 * plain.cfg.n_layers and "layers.0.attention.wq" in names
    tokens = _tokens(plain.cfg)
    torch.testing.assert_close(adapted(tokens), plain(tokens), rtol=0, atol=0)
    # base weights keep their names: a plain checkpoint loads into the adapted model
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.rsplit(".", 1)[-1].startswith("lora_") for k in missing)


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ("wq", "wv", "w1", "w2", "w3")])
def test_merged_weights_compute_what_the_adapters_did(targets):
    adapted = _gpt(tie_embeddings=False)
    apply_lora(adapted, LoRAConfig(rank=4, alpha=8.0, targets=targets))
    with torch.no_grad():  # as if trained: non-zero B
        for m in adapted.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.05)
    merged = merge_lora_weights(adapted.state_dict())
    assert not any("lora" in k for k in merged)
    plain = GPT(adapted.cfg)
    plain.load_state_dict(merged, strict=True)
    tokens = _tokens(plain.cfg)
    adapted_logits = adapted(tokens)
    assert not torch.allclose(adapted_logits, GPT(adapted.cfg)(tokens))  # the adapters matter
    torch.testing.assert_close(plain(tokens), adapted_logits, rtol=1e-5, atol=1e-5)


def test_lora_linear_with_bias_and_scale():
    torch.manual_seed(0)
    base = nn.Linear(12, 6, bias=True)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(5, 12)
    expected = F.linear(x, base.weight, base.bias) + 2.0 * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(lora(x), expected)
    merged = merge_lora_weights({f"l.{k}": v for k, v in lora.state_dict().items()})
    torch.testing.assert_close(F.linear(x, merged["l.weight"], merged["l.bias"]), expected)
    assert lora.weight is base.weight  # the base parameter is reused, not copied


def test_only_adapters_embeddings_and_norms_train():
    model = _gpt(tie_embeddings=False)
    cfg = LoRAConfig()
    apply_lora(model, cfg)
    set_lora_trainable(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 2)
        expect = (
            name.endswith((".lora_a", ".lora_b"))
            or name.startswith("tok_embeddings.")
            or "norm." in name
            or name == "norm.weight"
        )
        assert (name in trainable) == expect, (name, leaf)
    assert "output.weight" not in trainable and "layers.0.attention.wq.weight" not in trainable
    # a step moves only those: frozen weights get no gradient at all
    loss = F.cross_entropy(model(_tokens(model.cfg)).flatten(0, 1), _tokens(model.cfg).flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name

    set_lora_trainable(model, LoRAConfig(train_embeddings=False, train_norms=False))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in trainable if "lora_" in n
    }


def test_meta_built_adapters_initialise_after_materialisation():
    with torch.device("meta"):
        model = GPT(gpt_config("tiny"))
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
    model.to_empty(device="cpu")
    model.init_weights()
    init_lora(model)
    wq = model.layers["0"].attention.wq
    assert float(wq.lora_scale) == 2.0 and torch.count_nonzero(wq.lora_b) == 0
    assert torch.isfinite(wq.lora_a).all() and wq.lora_a.abs().sum() > 0


def test_bad_lora_configs_name_the_fix():
    with pytest.raises(ConfigError, match=r"targets.*match no linear layer.*'w1'.*'wq'"):
        apply_lora(_gpt(), LoRAConfig(targets=("q_proj",)))
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0).validate()
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(dropout=1.0).validate()
    with pytest.raises(KeyError, match="lora_b"):
        merge_lora_weights({"l.weight": torch.zeros(2, 2), "l.lora_a": torch.zeros(1, 2)})
