"""Sequence parallelism: Ulysses, ring (zigzag) and the 2D hybrid, over the ``sp`` ranks."""

from cupola.toolkit.parallel.sequence.attention import SequenceParallel
from cupola.toolkit.parallel.sequence.blocks import block_backward, block_forward, merge
from cupola.toolkit.parallel.sequence.layout import SPLayout
from cupola.toolkit.parallel.sequence.ring import ring_attention
from cupola.toolkit.parallel.sequence.ulysses import gather_heads, kv_heads_for, scatter_heads

__all__ = [
    "SPLayout",
    "SequenceParallel",
    "block_backward",
    "block_forward",
    "gather_heads",
    "kv_heads_for",
    "merge",
    "ring_attention",
    "scatter_heads",
]
