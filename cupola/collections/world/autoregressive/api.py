"""Entry point of the autoregressive WFM recipes: :func:`train` (pretraining, or post-training a run
with ``init_from``, in full or with LoRA)."""

from __future__ import annotations

from typing import Any

from cupola.collections.world.autoregressive.lightning import ARModule
from cupola.collections.world.autoregressive.model import ARConfig
from cupola.toolkit.config import ConfigError, config_error, to_dict, validate
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig
from cupola.toolkit.training.fit import RunInfo, fit

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
        raise ConfigError(
            "trainer.export_hf: autoregressive world-model runs have no Hugging Face export; set it to false"
        )
    module = ARModule(
        model,
        tokenizer=tokenizer,
        optim=optim,
        parallel=parallel,
        precision=trainer.precision,
        max_steps=trainer.max_steps,
        init_from=init_from,
        lora=lora,
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
        "wfm": "autoregressive",
    }
    # throughput counts frames (the token count per clip depends on the tokenizer); no MFU figure
    info = RunInfo(seq_len=data.num_frames, micro_batch_size=data.micro_batch_size, flops_per_token=0.0)
    return fit(module, data, trainer, info, run_config=run_config)
