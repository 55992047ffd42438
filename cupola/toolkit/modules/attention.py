"""Causal self-attention with grouped-query heads, on ``F.scaled_dot_product_attention``.

Head counts are read from the projection outputs (``view(B, T, -1, head_dim)``), so the same
module runs unchanged when tensor parallelism has sharded ``wq``/``wk``/``wv`` by heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cupola.toolkit.modules.rope import apply_rope


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    ``k[layer]``/``v[layer]``: ``[B, Hkv, max_len, D]`` buffers, allocated at a layer's first
    :meth:`update` in the dtype and device of its keys (the compute dtype under mixed precision);
    ``length`` tokens are filled. The model advances ``length`` once per forward (:meth:`advance`).
    Made by ``GPT.new_kv_cache``.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k_B_H_T_D: torch.Tensor, v_B_H_T_D: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values after the cached ones; return all of them so far."""
        start, end = self.length, self.length + k_B_H_T_D.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache: {end} tokens do not fit the cache of {self.max_len}; make it longer "
                "(max_len) or start a new one"
            )
        if self.k[layer] is None:
            B, H, _, D = k_B_H_T_D.shape
            self.k[layer] = k_B_H_T_D.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v_B_H_T_D.new_zeros(B, H, self.max_len, D)
        self.k[layer][:, :, start:end] = k_B_H_T_D
        self.v[layer][:, :, start:end] = v_B_H_T_D
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def positions(self, batch: int, n: int, device: torch.device | str) -> torch.Tensor:
        """RoPE positions ``[batch, n]`` of ``n`` tokens that continue the cached ones."""
        return torch.arange(self.length, self.length + n, device=device).expand(batch, n)

    def attend(
        self,
        layer: int,
        q_B_H_T_D: torch.Tensor,
        k_B_H_T_D: torch.Tensor,
        v_B_H_T_D: torch.Tensor,
        *,
        causal: bool = True,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the new tokens' queries over the cached keys and their own (stored in slot
        ``layer``); causal among the new tokens unless ``mask`` (``[.., T, length + T]``) says otherwise."""
        past, T = self.length, q_B_H_T_D.shape[2]
        k_B_H_T_D, v_B_H_T_D = self.update(layer, k_B_H_T_D, v_B_H_T_D)
        is_causal = False
        if mask is None and causal and T > 1:
            if past == 0:  # a prefill: the fused causal kernels, no T x T mask
                is_causal = True
            else:  # query i (absolute past + i) sees keys <= past + i
                keys = torch.arange(past + T, device=q_B_H_T_D.device)
                mask = keys[None, :] <= (past + torch.arange(T, device=q_B_H_T_D.device))[:, None]
        # (one new token, or non-causal: every key is visible, no mask)
        return F.scaled_dot_product_attention(
            q_B_H_T_D,
            k_B_H_T_D,
            v_B_H_T_D,
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=q_B_H_T_D.shape[1] != k_B_H_T_D.shape[1],
        )


class StaticKVCache(KVCache):
    """A :class:`KVCache` whose one-token decode steps have static shapes, for CUDA-graph capture.

    A multi-token call (the prefill) works as in :class:`KVCache`. A one-token call writes its key and
    value at :attr:`position` — a device tensor, not a Python int — and attends over the whole
    ``max_len`` buffer with the keys after it masked, so every decode step runs the same kernels on
    the same buffers: capture one step in a graph and replay it, calling :meth:`step` (inside the
    graph) to move on. ``length`` (Python) is kept for the prefill and for bookkeeping only.
    """

    def __init__(self, n_layers: int, max_len: int, device: torch.device | str) -> None:
        super().__init__(n_layers, max_len)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._keys = torch.arange(max_len, device=device)

    def advance(self, n: int) -> None:
        super().advance(n)
        self.position.fill_(self.length)

    def step(self) -> None:
        """The device-side advance of one decode step (captured with it)."""
        self.position.add_(1)

    def attend(
        self,
        layer: int,
        q_B_H_T_D: torch.Tensor,
        k_B_H_T_D: torch.Tensor,
        v_B_H_T_D: torch.Tensor,
        *,
        causal: bool = True,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if q_B_H_T_D.shape[2] != 1 or mask is not None or self.k[layer] is None:
            return super().attend(layer, q_B_H_T_D, k_B_H_T_D, v_B_H_T_D, causal=causal, mask=mask)
        self.k[layer].index_copy_(2, self.position, k_B_H_T_D)
        self.v[layer].index_copy_(2, self.position, v_B_H_T_D)
        visible = (self._keys <= self.position)[None, None, None, :]  # a query sees itself and the past
        return F.scaled_dot_product_attention(
            q_B_H_T_D,
            self.k[layer],
            self.v[layer],
            attn_mask=visible,
            enable_gqa=q_B_H_T_D.shape[1] != k_B_H_T_D.shape[1],
        )


def document_causal_mask(document_ids_B_T: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T, T]`` for packed sequences: token i attends to j when
    ``j <= i`` and both belong to the same document (``document_ids`` equal; padding, any id such
    as -1, only attends within its own run, so no row is empty).

    Dense ``T x T`` per row: fine for the packed SFT lengths it serves; the sequence-parallel
    attention backends take document boundaries without materialising it.
    """
    T = document_ids_B_T.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids_B_T.device).tril()
    same = document_ids_B_T[:, :, None] == document_ids_B_T[:, None, :]
    return (same & causal)[:, None]


def repeat_kv(x_B_H_T_D: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each KV head ``n_rep`` times: ``[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]``."""
    if n_rep == 1:
        return x_B_H_T_D
    B, H, T, D = x_B_H_T_D.shape
    return x_B_H_T_D[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


class Attention(nn.Module):
    """``wo(softmax(q k^T / sqrt(d) [+ causal mask]) v)`` with RoPE on q and k.

    ``causal=False`` gives bidirectional attention (vision towers, diffusion transformers);
    ``bias=True`` adds biases to the four projections (SigLIP-style towers). Decoders use the
    defaults: causal, no biases.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        causal: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"Attention: dim ({dim}) must divide by n_heads ({n_heads}) and n_heads by n_kv_heads ({n_kv_heads})"
            )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.causal = causal
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        # Sequence parallelism (set by parallelize functions): a SequenceParallel whose attention
        # sees the whole sequence while this rank holds a part of it; None for local attention.
        self.sp = None

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(linear.weight, mean=0.0, std=out_std if linear is self.wo else std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(
        self,
        x_B_T_C: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rope``: ``(cos, sin)`` looked up for the positions of ``x`` (see ``RotaryEmbedding``), or None.
        ``mask``: boolean ``[B, 1, T, T]`` (True = may attend), replacing the causal rule, e.g.
        :func:`document_causal_mask` for packed samples. ``kv_cache``: attend to the cached tokens
        too (``x`` continues them; causal), storing this call's keys/values in slot ``layer``.
        Under sequence parallelism (``self.sp``), ``x`` is this rank's part of the sequence and
        ``document_ids`` (this rank's tokens' ids) replaces ``mask`` for packed samples."""
        B, T, _ = x_B_T_C.shape
        q = self.wq(x_B_T_C).view(B, T, -1, self.head_dim)  # local heads under TP
        k = self.wk(x_B_T_C).view(B, T, -1, self.head_dim)
        v = self.wv(x_B_T_C).view(B, T, -1, self.head_dim)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q_B_H_T_D, k_B_H_T_D, v_B_H_T_D = (t.transpose(1, 2) for t in (q, k, v))
        if self.sp is not None and kv_cache is None:
            out_B_H_T_D = self.sp.attention(
                q_B_H_T_D, k_B_H_T_D, v_B_H_T_D, causal=self.causal, document_ids_B_T=document_ids
            )
            return self.wo(out_B_H_T_D.transpose(1, 2).reshape(B, T, -1))
        if kv_cache is not None:  # incremental decoding (sequence-parallel too: the cache's own attend)
            out_B_H_T_D = kv_cache.attend(
                layer, q_B_H_T_D, k_B_H_T_D, v_B_H_T_D, causal=self.causal, mask=mask
            )
            return self.wo(out_B_H_T_D.transpose(1, 2).reshape(B, T, -1))
        # Grouped-query heads go to SDPA as they are (enable_gqa): the fused kernels read each KV head
        # for its query group, with no repeated copy of K and V (10% faster on an H100 with cuDNN).
        out_B_H_T_D = F.scaled_dot_product_attention(
            q_B_H_T_D,
            k_B_H_T_D,
            v_B_H_T_D,
            attn_mask=mask,
            is_causal=self.causal and mask is None,
            enable_gqa=q_B_H_T_D.shape[1] != k_B_H_T_D.shape[1],
        )
        return self.wo(out_B_H_T_D.transpose(1, 2).reshape(B, T, -1))
