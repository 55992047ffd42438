"""Sampling text from a GPT: greedy or nucleus (top-p), with a KV cache (the prompt is run once,
then one token per step). :func:`decode` takes prompt *embeddings*, so the VLM's chat reuses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from cupola.collections.llm.models.gpt import GPT


def sample_next(
    logits_V: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from next-token logits: argmax when ``temperature <= 0``, else nucleus sampling
    (the smallest set of tokens whose probability reaches ``top_p``). Ids at or beyond ``vocab_size``
    (a padded embedding table) are never produced."""
    logits_V = logits_V.float().clone()
    if vocab_size is not None:
        logits_V[vocab_size:] = float("-inf")
    if temperature <= 0:
        return int(logits_V.argmax())
    probs_V = torch.softmax(logits_V / temperature, dim=-1)
    sorted_p, order = probs_V.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p
    sorted_p = sorted_p * keep
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


@torch.no_grad()
def decode(
    model: GPT,
    prompt_embeds_1_T_C: torch.Tensor,
    max_new_tokens: int,
    *,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    seed: int | None = None,
    sp=None,
    prompt_len: int | None = None,
) -> list[int]:
    """New token ids after a prompt given as embeddings ``[1, T, dim]``: one prefill forward fills a
    KV cache, then each step embeds the last token (``embed``, default ``model.embed``) and runs one
    position. Stops at ``eos_id`` or when the model's ``max_seq_len`` is reached.

    Sequence-parallel (``sp``, a :class:`~cupola.toolkit.parallel.sequence.SequenceParallel`; call
    on every rank): ``prompt_embeds`` is this rank's part (``sp.shard``) of the prompt padded to a
    multiple of ``sp.layout.multiple``, ``prompt_len`` the real length. The cache stays sharded
    (:class:`~cupola.toolkit.parallel.sequence.decode.SequenceParallelKVCache`); every rank returns
    the same tokens (rank 0's choice, broadcast, so sampling agrees without a shared seed).
    """
    if sp is not None and prompt_len is None:
        raise ValueError("decode(sp=...) needs prompt_len: the real prompt length before padding")
    T = prompt_embeds_1_T_C.shape[1] if sp is None else prompt_len
    limit = model.cfg.max_seq_len
    if T >= limit:
        raise ValueError(
            f"the prompt has {T} tokens but the model's max_seq_len is {limit}: nothing can be generated; "
            "shorten the prompt (fewer frames) or use a model with a longer context"
        )
    embed = embed or model.embed
    device = prompt_embeds_1_T_C.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    steps = min(max_new_tokens, limit - T)
    if sp is None:
        cache = model.new_kv_cache(min(limit, T + max_new_tokens))
        h = model.forward_embeddings(prompt_embeds_1_T_C, kv_cache=cache, logits=False)[0, -1]
    else:
        from cupola.toolkit.parallel.sequence.decode import SequenceParallelKVCache

        cache = SequenceParallelKVCache(model.cfg.n_layers, sp, prompt_len, steps)
        h = model.forward_embeddings(prompt_embeds_1_T_C, kv_cache=cache, logits=False)
        h = _prompt_last(h, cache, sp)
    logits_V = model.head(h)
    new: list[int] = []
    for _ in range(steps):
        token = sample_next(
            logits_V, temperature=temperature, top_p=top_p, vocab_size=vocab_size, generator=generator
        )
        if sp is not None and sp.sp_group is not None:  # one choice for all ranks
            chosen = torch.tensor([token], device=device)
            dist.broadcast(chosen, src=dist.get_global_rank(sp.sp_group, 0), group=sp.sp_group)
            token = int(chosen)
        new.append(token)
        if token == eos_id or cache.length >= cache.max_len:
            break
        logits_V = model.forward_embeddings(embed(torch.tensor([[token]], device=device)), kv_cache=cache)[
            0, -1
        ]
    return new


def _prompt_last(h_1_T_C: torch.Tensor, cache, sp) -> torch.Tensor:
    """The hidden state of the prompt's last real token, on every rank (it lives on one)."""
    last = cache.prompt_len - 1
    where = sp.positions(cache.padded_len, h_1_T_C.device) == last
    row = h_1_T_C[0, where].sum(0) if bool(where.any()) else h_1_T_C.new_zeros(h_1_T_C.shape[-1])
    if sp.sp_group is not None:
        dist.all_reduce(row, group=sp.sp_group)
    return row


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """New token ids after ``prompt_ids`` (stops early at ``eos_id``); ``temperature=0`` is greedy.

    ``vocab_size``: the tokenizer's vocabulary when the model's embedding table is larger (padded
    vocabularies): ids at or beyond it are never produced, so every id decodes.
    """
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; give at least one token (e.g. the BOS id)")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)[:, -(model.cfg.max_seq_len - 1) :]
    return decode(
        model,
        model.embed(ids),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=eos_id,
        vocab_size=vocab_size,
        seed=seed,
    )
