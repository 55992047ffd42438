"""Attention over one block of queries and one block of keys/values, returning the log-sum-exp of
each query's scores, plus its backward from the *final* output and log-sum-exp — the two pieces
ring attention is built from (FlashAttention's decomposition, arXiv 2205.14135 / 2307.08691).

Shapes: ``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]`` (the same head count: the caller expands
grouped KV heads), ``lse [B, H, Tq]`` in fp32 (float64 for float64 inputs). ``mask`` is ``None``
(every query sees every key), ``"causal"`` (``Tq == Tk``, query i sees keys ``<= i``) or a boolean
tensor broadcastable to ``[B, H, Tq, Tk]`` (True = may attend). A query that sees no key in the
block gets output 0 and lse ``-inf``; :func:`merge` folds such blocks away.

Kernels: on CUDA in bf16/fp16, cuDNN attention (FlashAttention where cuDNN's is unavailable)
for ``None``/``"causal"``; tensor masks (packed
rows) and everything else (CPU, fp32/fp64 — what the multi-process tests use) take an exact math
path whose memory is quadratic in the block (a variable-length flash path for packed long rows on
GPU is future work).
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


def _flash(q: torch.Tensor, mask: Mask) -> bool:
    return (
        q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and (mask is None or isinstance(mask, str))
    )


_KERNELS: dict[tuple, tuple] = {}


def _kernel(q: torch.Tensor) -> tuple:
    """The fused kernel for this device and dtype — ``("cudnn", aux)`` where cuDNN attention runs
    forward and backward (the fastest on Hopper), else ``("flash", aux)`` — with the placeholder
    tensors its backward takes for "no variable-length batch, no dropout", taken once from a tiny
    forward (and a backward, to prove the kernel works here)."""
    key = (q.device, q.dtype, q.shape[-1])
    if key not in _KERNELS:
        tiny = torch.randn(1, 1, 64, q.shape[-1], device=q.device, dtype=q.dtype)
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                tiny, tiny, tiny, None, True, 0.0, True, False
            )
            aux = (res[2], res[3], res[6], res[7])
            _KERNELS[key] = ("cudnn", aux)
            block_backward(tiny, tiny, tiny, tiny, res[0], res[1].reshape(1, 1, 64).float(), "causal")
        except Exception:  # no usable cuDNN attention here: FlashAttention
            res = torch.ops.aten._scaled_dot_product_flash_attention(tiny, tiny, tiny, 0.0, False, False)
            _KERNELS[key] = ("flash", (res[2], res[3], res[6], res[7]))
    return _KERNELS[key]


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Tq, D] in q's dtype, lse [B, H, Tq])`` of softmax attention within the block."""
    s = _scale(q, scale)
    tq, tk = q.shape[2], k.shape[2]
    if _flash(q, mask):
        q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
        if _kernel(q)[0] == "cudnn":
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, mask is not None, False, scale=s
            )[:2]
            return out, lse.reshape(q.shape[:3]).float()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, mask is not None, False, scale=s
        )[:2]
        return out, lse
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
    if _flash(q, mask):
        causal = mask is not None
        if causal and tq != tk:
            raise ValueError(f"mask='causal' with Tq={tq}, Tk={tk}: a causal block is square")
        q, k, v, out, dout = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v, out, dout))
        kind, (cum_q, cum_k, rng, unused) = _KERNELS.get((q.device, q.dtype, q.shape[-1])) or _kernel(q)
        if kind == "cudnn":
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dout,
                q,
                k,
                v,
                out,
                lse.float().reshape(*q.shape[:3], 1).contiguous(),
                rng,
                unused,
                None,
                cum_q,
                cum_k,
                tq,
                tk,
                0.0,
                causal,
                scale=s,
            )
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse.float().contiguous(),
            cum_q,
            cum_k,
            tq,
            tk,
            0.0,
            causal,
            rng,
            unused,
            scale=s,
        )
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
