"""Entry point of the autoregressive WFM recipes: :func:`train` (pretraining, or post-training a run
with ``init_from``, in full or with LoRA)."""

from __future__ import annotations

from typing import Any

from cupola.collections.world.autoregressive.lightning import ARModule
from cupola.collections.world.autoregressive.model import ARConfig
from cupola.collections.world.common import train_world_model
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

__all__ = ["train"]


def train(
    model: ARConfig,
    data: Any,
    trainer: TrainerConfig,
    optim: OptimConfig,
    tokenizer: str,
    parallel: ParallelConfig | None = None,
    init_from: str | None = None,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """Train an autoregressive world model on ``data``'s clips (``batch["video"]`` ``[B, 3, T, H, W]`` in
    [-1, 1], and ``prompt`` for a model with cross-attention), tokenized by the frozen discrete
    ``tokenizer`` (a cupola DV tokenizer run or checkpoint). ``init_from``: an autoregressive run to
    post-train; ``lora``: train adapters instead of every weight."""
    return train_world_model(
        ARModule, "autoregressive", model, data, trainer, optim, tokenizer, parallel, init_from, lora
    )
