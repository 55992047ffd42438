"""Sequence-parallel KV-cached decoding (the prompt prefilled across ranks, the cache left sharded,
each step merged by log-sum-exp) gives the one-process model's logits at every step, in float64,
on 2 (Ulysses, zigzag ring) and 4 (2x2 hybrid, 4-way ring) gloo processes — with a prompt that does
not split evenly (its padding must never be attended), grouped KV heads, one-token steps and a
several-token step; and `decode` returns the same tokens, greedy and sampled."""

from __future__ import annotations

import pytest
import torch

from cupola.collections.llm.generate import decode
from cupola.collections.llm.models.gpt import GPT, gpt_config
from cupola.collections.llm.models.gpt.parallelize import apply_sp
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence.decode import SequenceParallelKVCache
from cupola.toolkit.testing import spawn

PROMPT, STEPS = 29, [1, 1, 3, 1]  # new tokens fed per step after the prompt


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("tiny", n_heads=4, n_kv_heads=2)).double().eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 512, (1, PROMPT + sum(STEPS)), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _check(rank: int, world: int, ulysses_list: tuple[int, ...]) -> None:
    reference = _model()
    tokens = _tokens()
    full = reference(tokens)[0]  # [T, vocab]: each position's logits seeing everything before it
    expected_new = decode(reference, reference.embed(tokens[:, :PROMPT]), 6, temperature=0.8, seed=5)
    greedy_new = decode(reference, reference.embed(tokens[:, :PROMPT]), 6)
    for ulysses in ulysses_list:
        dims = ParallelDims(sp=world, sp_ulysses=ulysses)
        dims.build_mesh("cpu")
        sp = dims.sequence_parallel()
        model = _model()
        apply_sp(model, sp)
        cache = SequenceParallelKVCache(model.cfg.n_layers, sp, PROMPT, sum(STEPS))
        padded = torch.cat([tokens[:, :PROMPT], tokens.new_zeros(1, cache.padded_len - PROMPT)], 1)
        assert cache.padded_len > PROMPT  # the padding case is exercised
        hidden = model.forward_embeddings(sp.shard(model.embed(padded)), kv_cache=cache, logits=False)
        mine = sp.positions(cache.padded_len) < PROMPT
        torch.testing.assert_close(
            model.head(hidden[0, mine]), full[sp.positions(cache.padded_len)[mine]], rtol=0, atol=1e-11
        )
        # the cache holds only this rank's real tokens: 1/sp of the prompt, not the whole
        assert cache.k[0].shape[2] == cache.held[sp.rank] + sum(STEPS)
        assert sum(cache.held) == PROMPT
        at = PROMPT
        for n in STEPS:
            logits = model.forward_embeddings(model.embed(tokens[:, at : at + n]), kv_cache=cache)[0]
            torch.testing.assert_close(logits, full[at : at + n], rtol=0, atol=1e-11)
            at += n
        assert cache.length == at and sum(cache.held) == at
        for temperature, want in ((0.0, greedy_new), (0.8, expected_new)):
            got = decode(
                model,
                sp.shard(model.embed(padded)),
                6,
                temperature=temperature,
                seed=5 if temperature else None,
                sp=sp,
                prompt_len=PROMPT,
            )
            assert got == want, (ulysses, temperature, got, want)


@pytest.mark.slow
def test_decode_sequence_parallel_on_2_processes_matches_one():
    spawn(_check, 2, (2, 1))


@pytest.mark.slow
def test_decode_sequence_parallel_on_4_processes_matches_one():
    spawn(_check, 4, (2, 1))
