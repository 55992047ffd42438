"""The attention blocks ring/Ulysses are built from, on CUDA in bf16: FlashAttention (no mask, causal)
and memory-efficient attention (tensor masks), forward with log-sum-exp and backward from the whole
attention's output, against SDPA's autograd; plus split-and-merge equal to the whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cupola.toolkit.parallel.sequence import block_backward, block_forward, merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {"rtol": 2e-2, "atol": 2e-2}


@pytest.mark.parametrize("mask", [None, "causal", "tensor"])
def test_cuda_blocks_match_sdpa_autograd(mask):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 256, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    m = mask
    if mask == "tensor":
        m = torch.rand(2, 1, 256, 256, generator=g, device="cuda") < 0.5
        m[..., 0] = True
    dense = (
        None
        if m is None
        else (torch.ones(256, 256, dtype=torch.bool, device="cuda").tril() if m == "causal" else m)
    )
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    out, lse = block_forward(q.detach(), k.detach(), v.detach(), m)
    torch.testing.assert_close(out, ref.detach(), **TOL)
    grads = block_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, m)
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_cuda_split_blocks_merge_to_the_whole():
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (
        torch.randn(1, 8, 512, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    ref = F.scaled_dot_product_attention(q, k, v)
    a = block_forward(q, k[:, :, :256], v[:, :, :256])
    b = block_forward(q, k[:, :, 256:], v[:, :, 256:])
    out, _ = merge(*merge(None, None, *a), *b)
    torch.testing.assert_close(out.to(torch.bfloat16), ref, **TOL)


@pytest.mark.parametrize("new", [1, 3])
def test_cuda_decode_step_folds_grouped_heads_into_the_query(new):
    """What a sequence-parallel decoding step runs on each rank's part of the cache: the query's
    grouped heads folded into its length (no copy of the cache per head), against SDPA with
    grouped-query attention; and two parts of the cache merged equal the whole (bf16)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    B, Hq, Hkv, L, D = 1, 32, 8, 3000, 128
    q = torch.randn(B, Hq, 1, D, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, L, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    folded = q.reshape(B, Hkv, Hq // Hkv, D)
    parts = [block_forward(folded, k[:, :, s], v[:, :, s]) for s in (slice(0, 1234), slice(1234, L))]
    out, _ = merge(*merge(None, None, *parts[0]), *parts[1])
    torch.testing.assert_close(out.reshape(B, Hq, 1, D).to(torch.bfloat16), ref, **TOL)
    if new > 1:  # several new tokens on the rank that stores them: causal among themselves
        qn = torch.randn(B, Hq, new, D, generator=g, device="cuda", dtype=torch.bfloat16)
        dense = torch.ones(new, L, dtype=torch.bool, device="cuda")
        dense[:, L - new :] = torch.ones(new, new, dtype=torch.bool, device="cuda").tril()
        ref = F.scaled_dot_product_attention(qn, k, v, attn_mask=dense, enable_gqa=True)
        rows = torch.arange(new, device="cuda").repeat(Hq // Hkv)
        mask = torch.arange(L, device="cuda")[None, :] <= (L - new + rows)[:, None]
        got, _ = block_forward(qn.reshape(B, Hkv, Hq // Hkv * new, D), k, v, mask)
        torch.testing.assert_close(got.reshape(B, Hq, new, D), ref, **TOL)
