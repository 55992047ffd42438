"""Autoregressive world foundation models (Cosmos-style): a Llama decoder over discrete video tokens."""

from cupola.collections.world.autoregressive.model import ARS_FLAVORS, ARConfig, ARWorldModel, ar_config
from cupola.collections.world.autoregressive.sample import continue_video, generate, sample_next

__all__ = [
    "ARS_FLAVORS",
    "ARConfig",
    "ARWorldModel",
    "ar_config",
    "continue_video",
    "generate",
    "sample_next",
]
