"""World foundation models (Cosmos): video tokenizers, diffusion and autoregressive world models."""
