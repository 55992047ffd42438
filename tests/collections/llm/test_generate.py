"""Sampling from a GPT: greedy equals argmax decoding, padded vocab slots are never produced."""

from __future__ import annotations

import pytest
import torch

from cupola.collections.llm.generate import generate
from cupola.collections.llm.models.gpt import GPT, gpt_config


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("tiny")).eval()


def test_greedy_is_argmax_of_the_full_forward() -> None:
    model = _model()
    prompt = [256, 84, 104, 101]
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(model, prompt, 12) == ids[len(prompt) :]


def test_sampling_is_seeded_and_respects_the_tokenizer_vocab() -> None:
    model = _model()
    with torch.no_grad():  # make the padded ids (>= 259) the most likely ones
        model.output.weight[259:] += 5 * model.output.weight[259:].sign()
        model.output.weight[259:] *= 50
    unrestricted = generate(model, [256], 40, temperature=1.0, seed=1)
    assert any(t >= 259 for t in unrestricted)
    restricted = generate(model, [256], 40, temperature=1.0, top_p=0.9, seed=1, vocab_size=259)
    assert all(t < 259 for t in restricted)
    assert restricted == generate(model, [256], 40, temperature=1.0, top_p=0.9, seed=1, vocab_size=259)


def test_generation_stops_at_eos() -> None:
    model = _model()
    first = generate(model, [256], 1)[0]
    assert generate(model, [256], 10, eos_id=first) == [first]


def test_kv_cache_prefill_then_steps_equal_the_full_forward():
    """Incremental decoding with the KV cache gives the full forward's logits, position by position."""
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny"))
    tokens = torch.randint(0, 256, (2, 20))
    full = model(tokens)
    cache = model.new_kv_cache(32)
    outs = [model.forward_embeddings(model.embed(tokens[:, :12]), kv_cache=cache)]
    for i in range(12, 20):
        outs.append(model.forward_embeddings(model.embed(tokens[:, i : i + 1]), kv_cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit the cache of 32"):
        model.forward_embeddings(model.embed(tokens[:, :13]), kv_cache=cache)
