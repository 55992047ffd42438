"""Which tokens of a sequence each sequence-parallel rank holds.

The ``sp`` ranks form a ``sp_ring × sp_ulysses`` grid (Ulysses innermost, so its all-to-alls stay
inside a node). The sequence of ``T`` tokens is first split among the ring ranks — contiguously,
or *zigzag*: ``2 * ring`` chunks, ring rank ``j`` taking chunks ``j`` and ``2*ring - 1 - j`` so that
every rank does the same causal attention work — and each ring rank's share is then cut into
``sp_ulysses`` contiguous slices, one per Ulysses rank. Gathering the slices over the Ulysses group
(in rank order) gives back the ring rank's share in order, which is what keeps causal order intact
across the two levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SPLayout"]


@dataclass(frozen=True, slots=True)
class SPLayout:
    ring: int = 1
    ulysses: int = 1
    zigzag: bool = True

    @property
    def size(self) -> int:
        return self.ring * self.ulysses

    @property
    def multiple(self) -> int:
        """Sequence lengths must be a multiple of this (pad the batch to it)."""
        return (2 * self.ring if self.zigzag and self.ring > 1 else self.ring) * self.ulysses

    def check(self, seq_len: int) -> None:
        if seq_len % self.multiple:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of {self.multiple} (sp_ring={self.ring}"
                f"{' x 2 zigzag chunks' if self.zigzag and self.ring > 1 else ''} x sp_ulysses={self.ulysses}); "
                "pad the batch to a multiple (the VLM data module does with sp > 1)"
            )

    def ring_share(self, seq_len: int, ring_rank: int) -> torch.Tensor:
        """Global token indices of ring rank ``ring_rank``'s share, in the order it holds them."""
        self.check(seq_len)
        if self.ring == 1:
            return torch.arange(seq_len)
        if not self.zigzag:
            n = seq_len // self.ring
            return torch.arange(ring_rank * n, (ring_rank + 1) * n)
        n = seq_len // (2 * self.ring)
        first, second = ring_rank, 2 * self.ring - 1 - ring_rank
        return torch.cat(
            [torch.arange(first * n, (first + 1) * n), torch.arange(second * n, (second + 1) * n)]
        )

    def indices(self, seq_len: int, sp_rank: int) -> torch.Tensor:
        """Global token indices held by SP rank ``sp_rank`` (= ``ring_rank * ulysses + ulysses_rank``)."""
        ring_rank, ulysses_rank = divmod(sp_rank, self.ulysses)
        share = self.ring_share(seq_len, ring_rank)
        n = share.numel() // self.ulysses
        return share[ulysses_rank * n : (ulysses_rank + 1) * n]

    def shard(self, x: torch.Tensor, sp_rank: int, dim: int = 1) -> torch.Tensor:
        """The part of ``x`` (whole sequences along ``dim``) that SP rank ``sp_rank`` holds."""
        return x.index_select(dim, self.indices(x.shape[dim], sp_rank).to(x.device))

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The whole sequences from every SP rank's part (``parts[r]`` from rank ``r``), in order."""
        seq_len = sum(p.shape[dim] for p in parts)
        order = torch.cat([self.indices(seq_len, r) for r in range(self.size)]).to(parts[0].device)
        return torch.cat(parts, dim).index_select(dim, torch.argsort(order))
