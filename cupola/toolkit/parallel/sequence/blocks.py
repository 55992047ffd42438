"""Attention over one block of queries and one block of keys/values, returning the log-sum-exp of
each query's scores, plus its backward from the *final* output and log-sum-exp — the two pieces
ring attention is built from (FlashAttention's decomposition, arXiv 2205.14135 / 2307.08691).

Shapes: ``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]`` (the same head count: the caller expands
grouped KV heads), ``lse [B, H, Tq]`` in fp32 (float64 for float64 inputs). ``mask`` is ``None``
(every query sees every key), ``"causal"`` (``Tq == Tk``, query i sees keys ``<= i``) or a boolean
tensor broadcastable to ``[B, H, Tq, Tk]`` (True = may attend). A query that sees no key in the
block gets output 0 and lse ``-inf``; :func:`merge` folds such blocks away.

Kernels: on CUDA in bf16/fp16, FlashAttention for ``None``/``"causal"`` and memory-efficient
attention (with a bias) for tensor masks; everywhere else (CPU, fp32/fp64 — what the multi-process
tests use) an exact math path.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Mask", "block_backward", "block_forward", "merge"]

Mask = torch.Tensor | str | None


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bool_mask(mask: Mask, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal" or tq != tk:
            raise ValueError(
                f"mask={mask!r} with Tq={tq}, Tk={tk}: the string mask is 'causal' on a square block"
            )
        return torch.ones(tq, tk, dtype=torch.bool, device=device).tril()
    return mask


def _fast(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _bias(mask: torch.Tensor, q: torch.Tensor, tk: int) -> torch.Tensor:
    """An additive bias for memory-efficient attention (its last dim padded to a multiple of 16)."""
    B, H, tq = q.shape[0], q.shape[1], q.shape[2]
    pad = -tk % 16
    bias = torch.zeros(B, H, tq, tk + pad, dtype=q.dtype, device=q.device)
    bias[..., :tk].masked_fill_(~mask.expand(B, H, tq, tk), float("-inf"))
    return bias[..., :tk]


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Tq, D] in q's dtype, lse [B, H, Tq])`` of softmax attention within the block."""
    s = _scale(q, scale)
    tq, tk = q.shape[2], k.shape[2]
    if _fast(q):
        if mask is None or isinstance(mask, str):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, _bool_mask(mask, tq, tk, q.device) is not None, False, scale=s
            )[:2]
            return out, lse
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _bias(mask, q, tk), True, 0.0, False, scale=s
        )[:2]
        lse = lse[..., :tq]
        dead = torch.isneginf(lse)
        return out.masked_fill(dead[..., None], 0.0), lse
    acc = _acc_dtype(q)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * s
    m = _bool_mask(mask, tq, tk, q.device)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no key: lse -inf, p 0
    return torch.matmul(p, v.to(acc)).to(q.dtype), lse


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: Mask = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of this block's share of the attention, given the gradient and
    value of the *whole* attention output (``dout``, ``out``) and its log-sum-exp ``lse`` (finite:
    every query attends to at least one key overall)."""
    s = _scale(q, scale)
    tq, tk = q.shape[2], k.shape[2]
    if _fast(q):
        lse = lse.float().contiguous()
        if mask is None or isinstance(mask, str):
            causal = _bool_mask(mask, tq, tk, q.device) is not None
            cum = torch.empty(0, dtype=torch.int32, device=q.device)
            seed = torch.zeros(2, dtype=torch.int64, device=q.device)
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, cum, cum, tq, tk, 0.0, causal, seed[0], seed[1], scale=s
            )
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        pad = -tq % 32
        lse_padded = torch.nn.functional.pad(lse, (0, pad)) if pad else lse
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout,
            q,
            k,
            v,
            _bias(mask, q, tk),
            out,
            lse_padded,
            seed,
            seed,
            0.0,
            [True, True, True, False],
            False,
            scale=s,
        )
        return dq, dk, dv
    acc = _acc_dtype(q)
    qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    scores = torch.matmul(qa, ka.transpose(-1, -2)) * s
    m = _bool_mask(mask, tq, tk, q.device)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    p = torch.exp(scores - lse.to(acc)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), da)
    dp = torch.matmul(da, va.transpose(-1, -2))
    delta = (da * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O) of the whole attention
    ds = p * (dp - delta) * s
    dq = torch.matmul(ds, ka)
    dk = torch.matmul(ds.transpose(-1, -2), qa)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's ``(out, lse)`` into the running ones (``None`` at the start); the running
    output is kept in the accumulation dtype (fp32, or float64)."""
    acc = _acc_dtype(block_out) if block_out.dtype == torch.float64 else torch.float32
    block_lse = block_lse.to(acc)
    if out is None:
        return block_out.to(acc), block_lse
    new = torch.logaddexp(lse, block_lse)
    finite = torch.isfinite(new)
    a = torch.where(finite, torch.exp(lse - new), 0.0)[..., None]
    b = torch.where(finite, torch.exp(block_lse - new), 0.0)[..., None]
    return out * a + block_out.to(acc) * b, new
