"""Apply parallelism to a GPT (on the meta device or real), in torchtitan's order:
tensor parallel -> activation checkpointing -> torch.compile (per block) -> FSDP2.
A single process without activation checkpointing skips FSDP2 and gets the same bf16-compute /
fp32-master-weight numerics from :func:`~cupola.toolkit.parallel.mixed_precision.apply_mixed_precision`.

Tensor parallelism is Megatron-style with sequence parallelism between blocks: inside a block
``wq/wk/wv/w1/w3`` are column-parallel and ``wo/w2`` row-parallel; between them the residual
stream and the norms are sharded along the sequence. Unlike torchtitan, the embedding hands
the blocks the full sequence (vocab-parallel lookup + all-reduce) and the first block slices
it, so ``GPT.forward_embeddings`` accepts full-sequence embeddings from any producer (a VLM)
with or without TP. The output projection is vocab-parallel and returns replicated logits.

After this, materialize and initialize: ``model.to_empty(device=...); model.init_weights()``
(or load a checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from cupola.collections.llm.models.gpt.model import GPT
from cupola.toolkit.config import ConfigError
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.mixed_precision import apply_mixed_precision

try:  # public since torch 2.6
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - torch < 2.6
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = [
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_sp",
    "apply_tp",
    "apply_tp_to_block",
    "parallelize_gpt",
]


def parallelize_gpt(
    model: GPT,
    dims: ParallelDims,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> GPT:
    """Shard ``model`` in place over ``dims`` (whose mesh must be built) and return it."""
    moe = model.cfg.moe is not None
    if dims.tp_enabled:
        if moe:
            raise ConfigError(
                "parallel.tp > 1 with a Mixture-of-Experts model is not supported yet: shard the experts with "
                "parallel.ep (expert parallelism) and the rest with FSDP (parallel.dp_shard)"
            )
        apply_tp(model, dims.submesh("tp"))
    if dims.sp_enabled:
        if dims.tp_enabled or moe:
            raise ConfigError(
                f"parallel.sp={dims.sp} with {'tp > 1' if dims.tp_enabled else 'a Mixture-of-Experts model'} "
                "is not supported yet; use sequence parallelism with data parallelism (dp_shard/dp_replicate)"
            )
        apply_sp(model, dims.sequence_parallel())
    if dims.ep_enabled:
        if not moe:
            raise ConfigError("parallel.ep > 1 needs a Mixture-of-Experts model (model.moe is not set)")
        apply_ep_to_model(model, dims)
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        apply_compile(model)
    if dims.world_size == 1 and not activation_checkpointing:
        # One process: nothing to shard. FSDP2 would still copy every parameter through one-rank
        # collectives each step; cast them for compute instead (same numerics, see mixed_precision).
        if param_dtype != torch.float32:
            apply_mixed_precision(model, param_dtype)
        return model
    expert_mesh = dims.submesh("dp_shard_mod_ep") if dims.ep_enabled else None
    apply_fsdp(
        model,
        _fsdp_mesh(dims),
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        expert_mesh=expert_mesh,
        expert_grad_divide=dims.dp_shard * dims.sp,
    )
    return model


def apply_ep_to_model(model: GPT, dims: ParallelDims) -> None:
    """Expert parallelism: each block's experts split over the ``ep`` mesh, tokens sent by all-to-all."""
    from cupola.toolkit.parallel.expert import apply_ep

    for block in model.layers.values():
        apply_ep(block.feed_forward, dims.submesh("ep"))


def _fsdp_mesh(dims: ParallelDims) -> DeviceMesh:
    """1-D ``dp_shard_sp`` mesh for FSDP, or 2-D ``(dp_replicate, dp_shard_sp)`` for HSDP."""
    if dims.dp_replicate == 1:
        return dims.submesh("dp_shard_sp")
    return dims.mesh["dp_replicate", "dp_shard_sp"]


def apply_tp(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor + sequence parallelism over ``tp_mesh`` (see the module docstring)."""
    cfg, tp = model.cfg, tp_mesh.size()
    for field, heads in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads)):
        if heads % tp:
            raise ConfigError(
                f"GPTConfig.{field}={heads} is not divisible by the tensor-parallel degree tp={tp}; "
                "attention heads are split across TP ranks, so choose tp dividing both n_heads and n_kv_heads"
            )
    parallelize_module(
        model,
        tp_mesh,
        {
            # Vocab-parallel lookup; the partial sums are all-reduced to the full sequence.
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    if cfg.tie_embeddings:  # both weights are Shard(0) over the vocabulary; parallelize_module untied them
        model.output.weight = model.tok_embeddings.weight
    for i, block in enumerate(model.layers.values()):
        apply_tp_to_block(block, tp_mesh, first=i == 0)


def apply_tp_to_block(block: nn.Module, tp_mesh: DeviceMesh, *, first: bool = False) -> None:
    """TP plan of one ``TransformerBlock``: its input and output are sequence-sharded (local tensors).

    ``first=True`` makes the block take the full sequence and keep only its own slice.
    """
    plan: dict[str, object] = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None), use_local_output=True
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }
    if hasattr(block.feed_forward, "w3"):
        plan["feed_forward.w3"] = ColwiseParallel()
    parallelize_module(block, tp_mesh, plan)
    if first:
        parallelize_module(
            block,
            tp_mesh,
            PrepareModuleInput(
                input_layouts=(Replicate(), None),
                desired_input_layouts=(Shard(1), None),
                use_local_output=True,
            ),
        )


def _unwrapped(block: nn.Module) -> nn.Module:
    """The block inside torch.compile / activation-checkpoint wrappers."""
    for attr in ("_orig_mod", "_checkpoint_wrapped_module"):  # compile wraps AC wraps the block
        block = getattr(block, attr, block)
    return block


def apply_ac(model: GPT) -> None:
    """Recompute each block's activations in backward (full activation checkpointing)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.items()):
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_sp(model: GPT, sp) -> None:
    """Sequence parallelism: every attention layer attends over the whole sequence through ``sp``
    (a :class:`~cupola.toolkit.parallel.sequence.SequenceParallel`) while each rank holds its part."""
    model.sp = sp
    for block in model.layers.values():
        block.attention.sp = sp


def apply_compile(model: GPT) -> None:
    """``torch.compile`` each block separately (the blocks are identical, so they share one graph).
    Under sequence parallelism the attention's communication stays outside the graphs."""
    fullgraph = model.sp is None
    for name, block in list(model.layers.items()):
        model.layers.register_module(name, torch.compile(block, fullgraph=fullgraph))


def apply_fsdp(
    model: GPT,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    expert_mesh: DeviceMesh | None = None,
    expert_grad_divide: int = 1,
) -> None:
    """FSDP2 per block, then the root (embeddings, final norm, output), even on a 1-rank mesh.

    With expert parallelism (``expert_mesh``: the data-parallel ranks that hold the same experts)
    each block's experts are sharded first over that mesh. Their gradients already sum over the
    ranks that sent them tokens, so they are divided by the whole data-parallel size, like every
    other gradient, rather than by the expert mesh's size.

    Blocks do not cast their inputs: activations arrive in ``param_dtype`` from the embedding,
    and the RoPE tables they are passed stay fp32.
    """
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    block_mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        if expert_mesh is not None:
            experts = _unwrapped(block).feed_forward.experts
            fully_shard(experts, mesh=expert_mesh, mp_policy=block_mp)
            experts.set_gradient_divide_factor(float(expert_grad_divide))
        # The last block's parameters are needed again at the start of backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=block_mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=root_mp)
