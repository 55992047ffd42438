"""What the diffusion and autoregressive world models share: block-wise parallelization (FSDP2,
sequence parallelism), the token-split check, and the ``train`` entry point around a frozen tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cupola.toolkit.config import ConfigError, config_error, to_dict, validate
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.mixed_precision import apply_mixed_precision
from cupola.toolkit.parallel.sequence import SequenceParallel
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

__all__ = ["check_token_split", "parallelize_blocks", "train_world_model"]


def check_token_split(sp: SequenceParallel, n_tokens: int, what: str) -> None:
    """A clear error when ``n_tokens`` (``what``: whose) cannot be split over the sequence-parallel
    layout ``sp`` (see :attr:`~cupola.toolkit.parallel.sequence.SPLayout.multiple`)."""
    layout = sp.layout
    if n_tokens % layout.multiple:
        zigzag = layout.zigzag and layout.ring > 1
        raise ValueError(
            f"{what} has {n_tokens} tokens, which do not split over parallel.sp={layout.size} "
            f"(sp_ring={layout.ring}{' x 2 zigzag chunks' if zigzag else ''} x sp_ulysses={layout.ulysses}): "
            f"the count must be a multiple of {layout.multiple}. Choose a clip length or size (data.num_frames, "
            "data.size) whose latent token grid is, or another parallel.sp / parallel.sp_ulysses"
            + (" (parallel.sp_zigzag=false halves the ring's multiple)" if zigzag else "")
        )


def parallelize_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    dims: ParallelDims,
    *,
    what: str,
    apply_sp: Callable[[SequenceParallel], None],
    units: Sequence[nn.Module] = (),
    forward_methods: Sequence[str] = (),
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """SP → AC → compile → FSDP2 per block (and per module in ``units``), the rest in the root unit; on
    one process, single-process mixed precision instead. ``what`` names the model in errors.
    ``forward_methods``: the model's methods that run its modules before ``forward`` does (FSDP hooks
    them like ``forward``: its root must run first).

    With ``parallel.sp > 1``, ``apply_sp`` hands the model this rank's
    :class:`~cupola.toolkit.parallel.sequence.SequenceParallel`. As for the GPT, FSDP shards over
    ``dp_shard × sp`` and averages gradients over those ranks (and ``dp_replicate``): the models'
    losses are arranged so that the average is the whole sequences' gradient.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    for name, degree in (("tp", dims.tp), ("ep", dims.ep)):
        if degree > 1:
            raise ConfigError(
                f"parallel.{name}={degree} is not supported for {what} yet; set parallel.{name}=1 and use "
                "data parallelism (parallel.dp_shard / dp_replicate) and/or sequence parallelism (parallel.sp)"
            )
    if dims.sp_enabled:
        apply_sp(dims.sequence_parallel())
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
    for method in forward_methods:
        register_fsdp_forward_method(model, method)
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
    from cupola.toolkit.training.fit import RunInfo, fit

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
    # throughput counts frames (tokens per clip depend on the tokenizer); no MFU figure. The models
    # check their token counts against the sequence-parallel layout themselves.
    info = RunInfo(
        seq_len=data.num_frames,
        micro_batch_size=data.micro_batch_size,
        flops_per_token=0.0,
        sp_splits_seq_len=False,
        loss_name="EDM denoising loss (weighted)"
        if kind == "diffusion"
        else "cross-entropy loss (nats/token)",
    )
    return fit(module, data, trainer, info, run_config=run_config)
