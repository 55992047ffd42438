"""Entry point of the diffusion WFM recipes: :func:`train` (pretraining, or post-training a run with
``init_from``, in full or with LoRA)."""

from __future__ import annotations

from typing import Any

from cupola.collections.world.common import train_world_model
from cupola.collections.world.diffusion.lightning import DiffusionModule
from cupola.collections.world.diffusion.model import WFMConfig
from cupola.toolkit.config import config_error
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

__all__ = ["train"]


def train(
    model: WFMConfig,
    data: Any,
    trainer: TrainerConfig,
    optim: OptimConfig,
    tokenizer: str,
    parallel: ParallelConfig | None = None,
    init_from: str | None = None,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """Train a diffusion world model on ``data``'s clips (``batch["video"]`` ``[B, 3, T, H, W]`` in
    [-1, 1], with ``prompt``, and ``actions`` or ``intrinsics``/``cam_to_world`` for conditioned models),
    encoded by the frozen continuous ``tokenizer`` (a cupola tokenizer run or a diffusers folder).
    ``init_from``: a diffusion run to post-train; ``lora``: train adapters instead of every weight."""
    if model.dit.action_dim and getattr(data, "kind", "push") != "push":
        raise config_error(
            "data", "kind", getattr(data, "kind", None), "an action-conditioned model needs data with actions"
        )
    return train_world_model(
        DiffusionModule,
        "diffusion",
        model,
        data,
        trainer,
        optim,
        tokenizer,
        parallel,
        init_from,
        lora,
        seed=trainer.seed,
    )
