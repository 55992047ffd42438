"""Sampling from the autoregressive world model with a KV cache: :func:`generate` continues a token
sequence, :func:`continue_video` continues a video from its first frames (encode -> generate -> decode)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cupola.collections.world.autoregressive.model import ARWorldModel
from cupola.toolkit.modules.attention import StaticKVCache

__all__ = ["DECODE_MODES", "continue_video", "generate", "sample_next"]

# eager: a growing KV cache, one forward per token; static: a fixed-shape cache and decode step;
# graph: that step captured once in a CUDA graph and replayed per token (no per-kernel launch cost);
# auto: graph on CUDA, eager elsewhere
DECODE_MODES = ("auto", "eager", "static", "graph")


def sample_next(
    logits_B_V: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens ``[B]``: argmax at ``temperature=0``, else a draw from the tempered softmax restricted
    to the ``top_k`` most likely tokens and then to the smallest set holding ``top_p`` of the mass."""
    logits = logits_B_V.float()
    if temperature == 0:
        return logits.argmax(-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the most likely always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: ARWorldModel,
    prefix_tokens_B_P: torch.Tensor,
    grid: tuple[int, int, int],
    num_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    decode: str = "auto",
) -> torch.Tensor:
    """``[B, P + num_new_tokens]``: the prefix (the grid's first ``P >= 1`` tokens) and the sampled
    continuation. One prefill over the prefix, then one token per step through the KV cache, as
    ``decode`` says (:data:`DECODE_MODES`; all give the same tokens). ``seed`` (or a ``generator``
    on the model's device) makes sampling reproducible."""
    B, P = prefix_tokens_B_P.shape
    T, H, W = grid
    if P < 1:
        raise ValueError("generate needs a prefix of at least one token (e.g. the first latent frame)")
    if P + num_new_tokens > T * H * W:
        raise ValueError(
            f"{P} + {num_new_tokens} tokens do not fit the {T}x{H}x{W} grid ({T * H * W} tokens)"
        )
    device = prefix_tokens_B_P.device
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: choose one of {DECODE_MODES}")
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "eager"
    if decode == "graph" and device.type != "cuda":
        raise ValueError("decode='graph' captures a CUDA graph: the model must be on a CUDA device")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.empty(B, P + num_new_tokens, dtype=torch.long, device=device)
    tokens[:, :P] = prefix_tokens_B_P
    if num_new_tokens == 0:
        return tokens
    extra = {"context": context, "context_mask": context_mask}
    n = P + num_new_tokens
    cache = model.new_kv_cache(n) if decode == "eager" else StaticKVCache(model.cfg.n_layers, n, device)
    logits = model(prefix_tokens_B_P, grid, kv_cache=cache, **extra)[:, -1]  # the prefill
    if decode == "eager":

        def step(token_B_1: torch.Tensor) -> torch.Tensor:
            return model(token_B_1, grid, kv_cache=cache, **extra)[:, -1]

    else:
        table = model.rope(grid, 0, T * H * W, device)
        token = torch.zeros(B, 1, dtype=torch.long, device=device)  # the step's input, overwritten

        def static_step() -> torch.Tensor:
            return model.decode_step(token, cache, table, **extra)

        replay = _captured(static_step, cache) if decode == "graph" else static_step

        def step(token_B_1: torch.Tensor) -> torch.Tensor:
            token.copy_(token_B_1)
            return replay()

    for i in range(P, P + num_new_tokens):
        tokens[:, i] = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if i + 1 < P + num_new_tokens:
            logits = step(tokens[:, i : i + 1])
    return tokens


def _captured(step: Callable[[], torch.Tensor], cache: StaticKVCache) -> Callable[[], torch.Tensor]:
    """``step`` captured in a CUDA graph: each call replays it and returns its (reused) output. Two
    warm-up runs on a side stream first (they write the next slot, which the real step rewrites
    before reading, and the position is put back)."""
    start = cache.position.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
            cache.position.copy_(start)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


@torch.no_grad()
def continue_video(
    model: ARWorldModel,
    tokenizer,
    video_B_3_T_H_W: torch.Tensor,
    num_frames: int,
    *,
    prompts: list[str] | None = None,
    text_encoder: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    decode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue the clip ``video_B_3_T_H_W`` (in [-1, 1]) to ``num_frames`` frames; returns
    ``(video_B_3_num_frames_H_W, indices_B_t_h_w)``.

    The causal DV tokenizer encodes the first pixel frame alone into the first latent frame and each
    later ``temporal_compression`` frames into one more, so the given clip must have ``1 + k * t``
    frames and ``num_frames`` must be ``1 + m * t`` with ``m >= k``; the given latent frames are kept
    token for token and the model samples the rest. ``prompts`` (and ``text_encoder`` for a T5 model)
    for a model with cross-attention. ``decode``: see :func:`generate`.
    """
    t = tokenizer.cfg.temporal_compression
    T_in = video_B_3_T_H_W.shape[2]
    for name, frames in (("the given video", T_in), ("num_frames", num_frames)):
        if (frames - 1) % t:
            raise ValueError(f"{name} has {frames} frames: must be 1 + k * {t} for this tokenizer")
    if num_frames < T_in:
        raise ValueError(f"num_frames={num_frames} is shorter than the given {T_in} frames")
    device = next(model.parameters()).device
    _, given = tokenizer.encode(video_B_3_T_H_W.to(device, next(tokenizer.parameters()).dtype))
    B, t_in, h, w = given.shape
    grid = tokenizer.latent_shape(num_frames, video_B_3_T_H_W.shape[3], video_B_3_T_H_W.shape[4])
    context = context_mask = None
    if model.cfg.cross_attention:
        if prompts is None:
            raise ValueError("this model reads text (cross_attention): pass prompts=")
        context, context_mask = model.encode_text(prompts, text_encoder)
    prefix = given.reshape(B, -1).long()
    tokens = generate(
        model,
        prefix,
        grid,
        (grid[0] - t_in) * h * w,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        generator=generator,
        context=context,
        context_mask=context_mask,
        decode=decode,
    )
    indices = tokens.view(B, *grid)
    return tokenizer.decode_indices(indices), indices
