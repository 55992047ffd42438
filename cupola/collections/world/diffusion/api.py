"""Entry point of the diffusion WFM recipes: :func:`train` (pretraining, or post-training a run with
``init_from``, in full or with LoRA)."""

from __future__ import annotations

from typing import Any

from cupola.collections.world.diffusion.lightning import DiffusionModule
from cupola.collections.world.diffusion.model import WFMConfig
from cupola.toolkit.config import ConfigError, config_error, to_dict, validate
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig
from cupola.toolkit.training.fit import RunInfo, fit

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
    parallel = parallel or ParallelConfig()
    validate(model)
    validate(optim)
    if lora is not None:
        validate(lora)
        if init_from is None:
            raise config_error(
                "train", "lora", "LoRAConfig", "adapts a trained model: set init_from= as well"
            )
    if trainer.export_hf:
        raise ConfigError("trainer.export_hf: diffusion runs have no Hugging Face export; set it to false")
    if model.dit.action_dim and getattr(data, "kind", "push") != "push":
        raise config_error(
            "data", "kind", getattr(data, "kind", None), "an action-conditioned model needs data with actions"
        )
    module = DiffusionModule(
        model,
        tokenizer=tokenizer,
        optim=optim,
        parallel=parallel,
        precision=trainer.precision,
        max_steps=trainer.max_steps,
        init_from=init_from,
        lora=lora,
        seed=trainer.seed,
    )
    run_config = {
        "model": to_dict(model),
        "data": {k: v for k, v in dict(getattr(data, "hparams", {})).items() if not k.startswith("_")},
        "trainer": to_dict(trainer),
        "optim": to_dict(optim),
        "parallel": to_dict(parallel),
        "tokenizer": tokenizer,
        "init_from": init_from,
        "lora": to_dict(lora) if lora is not None else None,
        "wfm": "diffusion",
    }
    info = RunInfo(seq_len=data.num_frames, micro_batch_size=data.micro_batch_size, flops_per_token=0.0)
    return fit(module, data, trainer, info, run_config=run_config)
