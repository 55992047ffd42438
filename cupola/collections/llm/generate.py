"""Sampling text from a GPT: greedy or nucleus (top-p), with a KV cache (the prompt is run once,
then one token per step). :func:`decode` takes prompt *embeddings*, so the VLM's chat reuses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
) -> list[int]:
    """New token ids after a prompt given as embeddings ``[1, T, dim]``: one prefill forward fills a
    KV cache, then each step embeds the last token (``embed``, default ``model.embed``) and runs one
    position. Stops at ``eos_id`` or when the model's ``max_seq_len`` is reached."""
    T = prompt_embeds_1_T_C.shape[1]
    limit = model.cfg.max_seq_len
    if T >= limit:
        raise ValueError(
            f"the prompt has {T} tokens but the model's max_seq_len is {limit}: nothing can be generated; "
            "shorten the prompt (fewer frames) or use a model with a longer context"
        )
    embed = embed or model.embed
    device = prompt_embeds_1_T_C.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_kv_cache(min(limit, T + max_new_tokens))
    logits = model.forward_embeddings(prompt_embeds_1_T_C, kv_cache=cache)
    new: list[int] = []
    for _ in range(min(max_new_tokens, limit - T)):
        token = sample_next(
            logits[0, -1], temperature=temperature, top_p=top_p, vocab_size=vocab_size, generator=generator
        )
        new.append(token)
        if token == eos_id or cache.length >= cache.max_len:
            break
        logits = model.forward_embeddings(embed(torch.tensor([[token]], device=device)), kv_cache=cache)
    return new


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
