"""Sequence-parallel attention against single-process attention, in float64 on gloo: Ulysses, ring
(contiguous and zigzag) and the 2D hybrid, with GQA, causal, bidirectional and packed sequences;
outputs and the gradients of q, k and v to ~1e-12."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cupola.toolkit.modules.attention import document_causal_mask
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence import (
    SPLayout,
    block_backward,
    block_forward,
    merge,
)
from cupola.toolkit.testing import spawn

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _reference(q, k, v, causal: bool, documents: torch.Tensor | None) -> torch.Tensor:
    mask = None
    if documents is not None:
        mask = documents[:, :, None] == documents[:, None, :]
        mask = document_causal_mask(documents) if causal else mask[:, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=True
    )


def _documents(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Packed rows: documents of random lengths (ids increase along the row)."""
    cuts = torch.rand(B, T, generator=g) < 0.15
    cuts[:, 0] = False
    return cuts.cumsum(1)


# --- one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, "causal", "tensor"])
def test_block_forward_backward_match_autograd(mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    m = torch.rand(2, 1, 10, 10, generator=g) < 0.6 if mask == "tensor" else mask
    if mask == "tensor":
        m[..., 0] = True  # every query sees a key
    dense = None if m is None else (torch.ones(10, 10, dtype=torch.bool).tril() if m == "causal" else m)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    out, lse = block_forward(q.detach(), k.detach(), v.detach(), m)
    torch.testing.assert_close(out, ref.detach(), **TOL)
    grads = block_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, m)
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_merging_blocks_gives_the_whole_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    o1, l1 = block_forward(q, k[:, :, :2], v[:, :, :2])
    o2, l2 = block_forward(q, k[:, :, 2:], v[:, :, 2:])
    blind = torch.zeros(1, 1, 6, 4, dtype=torch.bool)  # a block nobody sees changes nothing
    o3, l3 = block_forward(q, k[:, :, :4], v[:, :, :4], blind)
    assert torch.isneginf(l3).all() and not o3.any()
    out, lse = merge(*merge(*merge(None, None, o1, l1), o2, l2), o3, l3)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 2.0, -1), **TOL)


@pytest.mark.parametrize(
    "ring,ulysses,zigzag", [(1, 4, True), (4, 1, False), (4, 1, True), (2, 2, True), (2, 3, True)]
)
def test_layout_partitions_the_sequence(ring, ulysses, zigzag):
    layout = SPLayout(ring=ring, ulysses=ulysses, zigzag=zigzag)
    T = 4 * layout.multiple
    parts = [layout.indices(T, r) for r in range(layout.size)]
    assert sorted(torch.cat(parts).tolist()) == list(range(T))
    assert len({p.numel() for p in parts}) == 1
    x = torch.arange(2 * T).view(2, T)
    assert torch.equal(layout.unshard([layout.shard(x, r) for r in range(layout.size)]), x)
    for j in range(ring):  # a ring rank's Ulysses slices, in rank order, are its share in order
        share = torch.cat(parts[j * ulysses : (j + 1) * ulysses])
        assert torch.equal(share, layout.ring_share(T, j))
        assert torch.equal(share, share.sort().values)
    if zigzag and ring > 1:
        n = T // (2 * ring)
        assert layout.ring_share(T, 0)[:n].tolist() == list(range(n))
        assert layout.ring_share(T, 0)[n:].tolist() == list(range(T - n, T))
    with pytest.raises(ValueError, match=f"not a multiple of {layout.multiple}"):
        layout.indices(layout.multiple + 1, 0)


# --- several processes ---------------------------------------------------------------------


def _check(ring: int, ulysses: int, zigzag: bool, hq: int, hkv: int, causal: bool, packed: bool) -> None:
    dims = ParallelDims(sp=ring * ulysses, sp_ulysses=ulysses, sp_zigzag=zigzag)
    dims.build_mesh("cpu")
    sp = dims.sequence_parallel()
    B, T, D = 2, 4 * sp.layout.multiple, 8
    g = torch.Generator().manual_seed(0)  # the same tensors on every rank
    q = torch.randn(B, hq, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, hkv, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, hkv, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, hq, T, D, generator=g, dtype=torch.float64)
    documents = _documents(B, T, g) if packed else None
    ref = _reference(q, k, v, causal, documents)
    (ref * w).sum().backward()

    local = [sp.shard(t.detach(), dim=2).requires_grad_() for t in (q, k, v)]
    out = sp.attention(
        *local, causal=causal, document_ids_B_T=None if documents is None else sp.shard(documents)
    )
    (out * sp.shard(w, dim=2)).sum().backward()
    what = f"ring={ring} ulysses={ulysses} zigzag={zigzag} hq={hq} hkv={hkv} causal={causal} packed={packed}"
    torch.testing.assert_close(out, sp.shard(ref.detach(), dim=2), **TOL, msg=lambda m: f"{what} out: {m}")
    for name, t, full in zip("qkv", local, (q, k, v), strict=True):
        torch.testing.assert_close(
            t.grad, sp.shard(full.grad, dim=2), **TOL, msg=lambda m, n=name: f"{what} d{n}: {m}"
        )


def _two(rank: int, world: int) -> None:
    for (ring, ulysses, zigzag), (hq, hkv), causal, packed in itertools.product(
        [(1, 2, True), (2, 1, False), (2, 1, True)], [(4, 2), (4, 1)], [True, False], [False, True]
    ):
        _check(ring, ulysses, zigzag, hq, hkv, causal, packed)


def _four(rank: int, world: int) -> None:
    for (ring, ulysses, zigzag), (hq, hkv), causal, packed in itertools.product(
        [(1, 4, True), (4, 1, True), (2, 2, True), (2, 2, False)],
        [(8, 2), (4, 4)],
        [True, False],
        [False, True],
    ):
        _check(ring, ulysses, zigzag, hq, hkv, causal, packed)


def test_ulysses_and_ring_on_2_processes_match_one():
    spawn(_two, 2)


def test_ulysses_ring_and_2x2_hybrid_on_4_processes_match_one():
    spawn(_four, 4)
