"""Apply parallelism to a VILA model: the LLM's blocks as in ``parallelize_gpt`` (activation
checkpointing, per-block compile), then FSDP2 per LLM block and per vision layer with the rest
(embeddings, projector, final norm, output) in the root unit — or, on one process without
activation checkpointing, single-process mixed precision (no FSDP2), as for the GPT.

With ``parallel.sp > 1`` (multi-modal sequence parallelism) the LLM's attention runs over the SP
ranks and :meth:`VILA.forward` shards each batch in two stages (frames for the tower, then the
sequence). Tensor and expert parallelism are not supported for the VLM.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cupola.collections.llm.models.gpt.parallelize import (
    MixedPrecisionPolicy,
    apply_ac,
    apply_compile,
    apply_sp,
    fully_shard,
)
from cupola.collections.vlm.models.vila import VILA
from cupola.toolkit.config import ConfigError
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.mixed_precision import apply_mixed_precision

__all__ = ["parallelize_vila"]


def parallelize_vila(
    model: VILA,
    dims: ParallelDims,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> VILA:
    """Shard ``model`` in place over ``dims`` (whose mesh must be built) and return it."""
    for name, degree in (("tp", dims.tp), ("ep", dims.ep)):
        if degree > 1:
            raise ConfigError(
                f"parallel.{name}={degree} is not supported for the VLM yet; train it with data parallelism "
                "(parallel.dp_shard / dp_replicate) and sequence parallelism (parallel.sp)"
            )
    if dims.sp_enabled:  # MM-SP: the LLM's attention over SP ranks; frames shared out in VILA.forward
        apply_sp(model.llm, dims.sequence_parallel())
    if activation_checkpointing:
        apply_ac(model.llm)
    if compile:
        apply_compile(model.llm)
    if dims.world_size == 1 and not activation_checkpointing:
        if param_dtype != torch.float32:
            apply_mixed_precision(model, param_dtype)
        return model
    model.encoder_group = dist.group.WORLD  # every rank runs the sharded tower together
    mesh = dims.submesh("dp_shard_sp") if dims.dp_replicate == 1 else dims.mesh["dp_replicate", "dp_shard_sp"]
    block_mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    for layer in model.vision.layers:
        fully_shard(layer, mesh=mesh, mp_policy=block_mp)
    blocks = list(model.llm.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=block_mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(
        model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    )
    return model
