"""Sequence-parallel KV-cached decoding: a long prompt (a long video) is prefilled across the ``sp``
ranks and its keys/values *stay* sharded — no rank ever holds the whole cache.

    prefill   every rank runs its part of the padded prompt through the SP attention (Ulysses,
              ring or the hybrid) and keeps the keys/values of its own real tokens;
    decode    the new token is the same on every rank; each rank attends its query to the keys it
              holds, giving ``(out, lse)``; one all-gather of those (``[B, H, T, D]`` — tiny) and a
              log-sum-exp merge in rank order give every rank the same exact attention output. The
              new token's key/value is stored on one rank: the one holding the fewest (balance).

The per-step communication is a few kilobytes per layer whatever the prompt length, and each
rank's memory is its ``1/sp`` of the cache.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cupola.toolkit.parallel.sequence.blocks import block_forward, merge

__all__ = ["SequenceParallelKVCache"]


class SequenceParallelKVCache:
    """The KV cache of one sequence-parallel rank (drop-in for
    :class:`~cupola.toolkit.modules.attention.KVCache` in ``GPT.forward_embeddings``).

    ``prompt_len``: the real prompt length (the prompt given to the first forward is this rank's part
    of it padded to ``sp.layout.multiple``; the padding's keys are dropped); ``max_new``: tokens
    that will be decoded after it. ``length``: tokens seen so far (the whole sequence's count).
    """

    def __init__(self, n_layers: int, sp, prompt_len: int, max_new: int) -> None:
        if prompt_len < 1:
            raise ValueError(f"SequenceParallelKVCache: prompt_len must be >= 1, got {prompt_len}")
        self.sp = sp
        self.prompt_len, self.max_new = prompt_len, max_new
        self.padded_len = -(-prompt_len // sp.layout.multiple) * sp.layout.multiple
        self.max_len = prompt_len + max_new
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        # the keys every rank holds (the same table on every rank): its real prompt tokens, then decoded ones
        self.held = [
            int((sp.layout.indices(self.padded_len, r) < prompt_len).sum()) for r in range(sp.layout.size)
        ]

    @property
    def prefilled(self) -> bool:
        return self.length > 0

    @property
    def owner(self) -> int:
        """The rank that stores the next decoded tokens' keys (fewest held; lowest rank on ties)."""
        return min(range(len(self.held)), key=lambda r: (self.held[r], r))

    def positions(self, batch: int, n: int, device: torch.device | str) -> torch.Tensor:
        if not self.prefilled:
            if n * self.sp.layout.size != self.padded_len:
                raise ValueError(
                    f"the prefill gives {n} tokens on this rank; a prompt of {self.prompt_len} padded to "
                    f"{self.padded_len} splits into {self.padded_len // self.sp.layout.size} per rank"
                )
            return self.sp.positions(self.padded_len, device).expand(batch, n)
        return torch.arange(self.length, self.length + n, device=device).expand(batch, n)

    def advance(self, n: int) -> None:
        if not self.prefilled:
            self.length = self.prompt_len
        else:
            self.held[self.owner] += n
            self.length += n

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        if self.k[layer] is None:
            B, H, _, D = k.shape
            capacity = self.held[self.sp.rank] + self.max_new
            self.k[layer] = k.new_zeros(B, H, capacity, D)
            self.v[layer] = v.new_zeros(B, H, capacity, D)
        end = start + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(
                f"SequenceParallelKVCache: {self.length + k.shape[2]} tokens exceed the {self.max_len} "
                "it was made for (prompt_len + max_new)"
            )
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v

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
        if not causal or mask is not None:
            raise ValueError("sequence-parallel decoding is causal over one sequence (no mask)")
        sp, me = self.sp, self.sp.rank
        if not self.prefilled:  # this rank's part of the prompt through the SP attention
            out = sp.attention(q_B_H_T_D, k_B_H_T_D, v_B_H_T_D, causal=True)
            real = sp.positions(self.padded_len, q_B_H_T_D.device) < self.prompt_len
            self._store(layer, k_B_H_T_D[:, :, real], v_B_H_T_D[:, :, real], 0)
            return out
        B, Hq, T, D = q_B_H_T_D.shape
        held = self.held[me]
        new_here = self.owner == me
        if new_here:
            self._store(layer, k_B_H_T_D, v_B_H_T_D, held)
            held += T
        keys, values = self.k[layer][:, :, :held], self.v[layer][:, :, :held]
        Hkv = keys.shape[1]
        rep = Hq // Hkv
        # grouped-query heads folded into the query length: [B, Hkv, rep * T, D], no copy of the cache
        q = q_B_H_T_D.reshape(B, Hkv, rep * T, D)
        block_mask = None
        if new_here and T > 1:  # causal among the new tokens; every older key is visible
            cols = torch.arange(held, device=q.device)
            rows = torch.arange(T, device=q.device).repeat(rep)
            block_mask = cols[None, :] <= (held - T + rows)[:, None]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if held:
            out, lse = block_forward(q, keys, values, block_mask)
        else:  # this rank holds no key yet: it adds nothing to the merge
            out = q.new_zeros(q.shape)
            lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        out, lse = out.reshape(B, Hq, T, D), lse.reshape(B, Hq, T).to(acc)
        outs, lses = [torch.empty_like(out) for _ in self.held], [torch.empty_like(lse) for _ in self.held]
        dist.all_gather(outs, out.contiguous(), group=sp.sp_group)
        dist.all_gather(lses, lse.contiguous(), group=sp.sp_group)
        merged, merged_lse = None, None
        for o, s in zip(outs, lses):  # in rank order: the same arithmetic, the same result, on every rank
            merged, merged_lse = merge(merged, merged_lse, o, s)
        return merged.to(q_B_H_T_D.dtype)
