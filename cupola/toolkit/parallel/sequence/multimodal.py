"""Two-stage sharding of multi-modal sequences over the ``sp`` ranks (LongVILA's MM-SP):

1. **encoder stage** — the media items (frames, images) of a batch are split into equal shares,
   one per SP rank (:func:`media_share`); each rank runs the encoder on its share only;
2. **decoder stage** — the resulting embeddings are sent, with one all-to-all, to the ranks whose
   part of the sequence (as :class:`~.layout.SPLayout` assigns it) holds their placeholder
   positions (:func:`route_media_embeddings`), so every rank ends with exactly the embeddings of its
   own tokens — no rank ever holds the whole sequence's embeddings.

Every rank knows the whole rows' token ids (cheap), so each can work out who needs what without
further communication. The all-to-all is differentiable: gradients flow back to the encoder on the
rank that produced each embedding.
"""

from __future__ import annotations

import math

import torch

from cupola.toolkit.parallel.collectives import all_to_all

__all__ = ["media_share", "route_embeddings", "route_media_embeddings"]


def media_share(n_items: int, sp_size: int, sp_rank: int) -> slice:
    """The media items (of ``n_items`` in the batch, in placeholder order) that ``sp_rank`` encodes:
    a contiguous run of ``ceil(n_items / sp_size)`` (the last ranks may get fewer or none)."""
    per_rank = math.ceil(n_items / sp_size) if n_items else 0
    start = min(n_items, sp_rank * per_rank)
    return slice(start, min(n_items, start + per_rank))


def route_media_embeddings(
    mine_N_D: torch.Tensor, slots_B_T: torch.Tensor, items_per_rank: int, sp
) -> torch.Tensor:
    """The embeddings for this rank's placeholder positions, in their order in its part of the rows.

    ``mine_N_D``: the embeddings this rank produced (its share of the media, flattened in order: the
    ``k``-th embedding of the batch lives on rank ``k // items_per_rank``); ``slots_B_T``: where
    the placeholders are in the *whole* rows; ``sp``: the
    :class:`~cupola.toolkit.parallel.sequence.SequenceParallel`. Returns ``[n_local_slots, D]``
    for ``h_local[sp.shard(slots_B_T)] = ...``.
    """
    item_at = (torch.cumsum(slots_B_T.flatten().long(), 0) - 1).view(slots_B_T.shape)
    owner = item_at // max(items_per_rank, 1)
    return route_embeddings(mine_N_D, slots_B_T, owner, item_at - owner * items_per_rank, sp)


def route_embeddings(
    mine_N_D: torch.Tensor, slots_B_T: torch.Tensor, owner_B_T: torch.Tensor, index_B_T: torch.Tensor, sp
) -> torch.Tensor:
    """The general form of :func:`route_media_embeddings`: placeholder ``(b, t)`` (where
    ``slots_B_T``) takes row ``index_B_T[b, t]`` of rank ``owner_B_T[b, t]``'s ``mine``; every rank
    passes the same whole-row tables. Returns this rank's ``[n_local_slots, D]`` in its order."""
    layout, me = sp.layout, sp.rank
    T = slots_B_T.shape[1]
    chunks, needed = [], None
    for r in range(layout.size):
        cols = layout.indices(T, r).to(slots_B_T.device)
        here = slots_B_T[:, cols]
        owner, index = owner_B_T[:, cols][here], index_B_T[:, cols][here]  # what rank r needs, in its order
        chunks.append(mine_N_D[index[owner == me]])
        if r == me:
            needed = owner
    in_splits = [c.shape[0] for c in chunks]
    out_splits = torch.bincount(needed, minlength=layout.size).tolist()
    received = all_to_all(torch.cat(chunks), out_splits, in_splits, sp.sp_group)
    # received is grouped by source rank; put it back in this rank's order
    order = torch.argsort(needed, stable=True)
    return received.new_empty(received.shape).index_copy(0, order, received)
