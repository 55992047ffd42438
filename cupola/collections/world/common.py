"""What the diffusion and autoregressive world models share: block-wise parallelization and the
``train`` entry point around a frozen tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cupola.toolkit.config import ConfigError, config_error, to_dict, validate
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.mixed_precision import apply_mixed_precision
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig
from cupola.toolkit.training.fit import RunInfo, fit

__all__ = ["parallelize_blocks", "train_world_model"]


def parallelize_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    dims: ParallelDims,
    *,
    what: str,
    units: Sequence[nn.Module] = (),
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """AC → compile → FSDP2 per block (and per module in ``units``), the rest in the root unit; on one
    process, single-process mixed precision instead. ``what`` names the model in errors."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for name, degree in (("tp", dims.tp), ("ep", dims.ep), ("sp", dims.sp)):
        if degree > 1:
            raise ConfigError(
                f"parallel.{name}={degree} is not supported for {what} yet; use data parallelism "
                "(parallel.dp_shard / dp_replicate)"
            )
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in blocks:
            block.compile()
    if dims.world_size == 1:
        if param_dtype != torch.float32:
            apply_mixed_precision(model, param_dtype)
        return model
    mesh = dims.submesh("dp_shard_sp") if dims.dp_replicate == 1 else dims.mesh["dp_replicate", "dp_shard_sp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in [*blocks, *units]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def train_world_model(
    module_cls: type,
    kind: str,
    model: Any,
    data: Any,
    trainer: TrainerConfig,
    optim: OptimConfig,
    tokenizer: str,
    parallel: ParallelConfig | None,
    init_from: str | None,
    lora: LoRAConfig | None,
    **module_kwargs: Any,
) -> dict[str, Any]:
    """Validate, build ``module_cls`` and fit it; the run's ``config.yaml`` records ``wfm: kind`` so
    loaders know what they read."""
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
            f"trainer.export_hf: {kind} world-model runs have no Hugging Face export; set it to false"
        )
    module = module_cls(
        model,
        tokenizer=tokenizer,
        optim=optim,
        parallel=parallel,
        precision=trainer.precision,
        max_steps=trainer.max_steps,
        init_from=init_from,
        lora=lora,
        **module_kwargs,
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
        "wfm": kind,
    }
    # throughput counts frames (tokens per clip depend on the tokenizer); no MFU figure
    info = RunInfo(seq_len=data.num_frames, micro_batch_size=data.micro_batch_size, flops_per_token=0.0)
    return fit(module, data, trainer, info, run_config=run_config)
