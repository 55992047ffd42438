"""Causal video tokenizers (Cosmos): continuous (CV/CI) and discrete (DV/DI, FSQ)."""

from cupola.collections.world.tokenizers.model import (
    TOKENIZER_FLAVORS,
    TokenizerConfig,
    VideoTokenizer,
    tokenizer_config,
)

__all__ = ["TOKENIZER_FLAVORS", "TokenizerConfig", "VideoTokenizer", "tokenizer_config"]
