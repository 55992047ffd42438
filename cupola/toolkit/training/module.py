"""The LightningModule shell every cupola model trains in.

``configure_model`` builds the model on the meta device, applies the model's
``parallelize_<model>`` function on the :class:`ParallelDims` mesh (TP → AC → compile →
FSDP2), materializes it on the device, then initializes it — or loads initial weights (a
Hugging Face folder or a cupola checkpoint), each rank reading only its own shards. Subclasses say how to build,
parallelize, initialize and score their model; nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cupola.toolkit.modules.lora import is_lora_name
from cupola.toolkit.modules.moe import moe_stats, set_moe_loss_scale
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.training.callbacks import global_mean, raise_non_finite
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig
from cupola.toolkit.training.optim import build_optimizer, build_scheduler
from cupola.toolkit.training.weights import SliceSource, TensorSource, load_sources


class ParallelModule(pl.LightningModule):
    def __init__(
        self, *, optim: OptimConfig, parallel: ParallelConfig, precision: str, max_steps: int
    ) -> None:
        super().__init__()
        self.optim_cfg = optim
        self.parallel_cfg = parallel
        self.precision_name = precision
        self.max_steps = max_steps
        self.model: nn.Module | None = None
        self.dims: ParallelDims | None = None
        self.sp = None  # this rank's SequenceParallel when parallel.sp > 1
        self.last_step_loss: float | None = None
        self.last_micro_loss: float | None = None
        self._micro_losses: list[float] = []
        self.last_grad_norm: float | None = None
        self.resuming = False  # set by fit(): the checkpoint's weights replace any initial weights
        self.parameter_counts: tuple[int, int] | None = None  # (total, trainable), once built

    # What a model supplies -------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def parallelize(self, model: nn.Module, dims: ParallelDims) -> nn.Module:
        raise NotImplementedError

    def init_weights(self, model: nn.Module) -> None:
        raise NotImplementedError

    def initial_weights(self) -> Mapping[str, SliceSource] | None:
        """Weights to start from, as lazily sliced sources (see :mod:`cupola.toolkit.training.weights`);
        None to initialize from the seed. Called on every rank; each reads only its own shards."""
        return None

    def initial_weights_keep(self) -> tuple[str, ...]:
        """Name prefixes that ``initial_weights()`` may leave out: those keep their initialization."""
        return ()

    def freeze(self, model: nn.Module) -> None:
        """Set ``requires_grad=False`` on what this run does not train (called once the weights are in)."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # Building ----------------------------------------------------------------------------
    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision_name == "bf16-mixed" else torch.float32

    def make_dims(self) -> ParallelDims:
        p = self.parallel_cfg
        return ParallelDims(
            dp_replicate=p.dp_replicate,
            dp_shard=p.dp_shard,
            tp=p.tp,
            sp=p.sp,
            ep=p.ep,
            sp_ulysses=p.sp_ulysses,
            sp_zigzag=p.sp_zigzag,
        )

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this again for validate/test after fit
            return
        dims = self.make_dims()
        dims.build_mesh(self.device.type)
        with torch.device("meta"):
            model = self.build_model()
        model = self.parallelize(model, dims)
        model.to_empty(device=self.device)
        with torch.no_grad():
            rng = torch.random.get_rng_state()
            self.init_weights(model)
            if self.device.type == "cpu" and any(isinstance(p, DTensor) for p in model.parameters()):
                # DTensor keeps random shards apart on accelerators only: on a CPU mesh every rank drew
                # its shard from the same stream. Initialise the whole model as one process does (from
                # the same generator state) and keep this rank's slices.
                torch.random.set_rng_state(rng)
                load_sources(model, self._whole_initial_model())
        sources = None if self.resuming else self.initial_weights()
        if sources is not None:
            prefixes = self.initial_weights_keep()
            # adapters are never in a starting checkpoint (those are merged): they start fresh
            load_sources(model, sources, keep=lambda name: name.startswith(prefixes) or is_lora_name(name))
        self.freeze(model)  # before the optimizer and any forward: both see the final trainable set
        self.parameter_counts = count_parameters(model)
        if self.trainer.is_global_zero:
            total, trainable = self.parameter_counts
            print(
                f"[cupola] parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)",
                flush=True,
            )
        # the router losses' gradients are injected inside the MoE blocks: scale them like the main loss
        set_moe_loss_scale(model, 1.0 / self.trainer.accumulate_grad_batches)
        self.model, self.dims = model, dims
        self.sp = dims.sequence_parallel() if dims.sp_enabled else None

    def _whole_initial_model(self) -> dict[str, TensorSource]:
        """The unsharded, freshly initialised model's tensors (built and initialised as one process
        would: meta, then ``init_weights``), as sources to slice."""
        with torch.device("meta"):
            whole = self.build_model()
        whole.to_empty(device="cpu")
        self.init_weights(whole)
        return {name: TensorSource(t) for name, t in whole.state_dict().items()}

    # Training ----------------------------------------------------------------------------
    SEQUENCE_KEYS = ("tokens", "labels", "positions", "document_ids")

    def shard_sequences(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under sequence parallelism, this rank's part (``[B, T/sp]``) of each per-token tensor of a
        batch of whole sequences (every SP rank loads the same rows); the batch as is otherwise."""
        if self.sp is None:
            return batch
        return {k: self.sp.shard(v) if k in self.SEQUENCE_KEYS else v for k, v in batch.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.last_micro_loss = float(global_mean(loss))  # all ranks agree, so the NaN guard can stop all
        self._micro_losses.append(self.last_micro_loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # every micro-batch of this step is done: the step's loss is their mean
        self.last_step_loss = sum(self._micro_losses) / len(self._micro_losses)
        self._micro_losses.clear()
        self.log("train/loss", self.last_step_loss, prog_bar=True, rank_zero_only=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], rank_zero_only=True)
        for key, value in moe_stats(self.model).items():  # router health, for MoE models
            self.log(f"moe/{key}", value, rank_zero_only=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        # bf16 working copies need one micro-batch per step (gradients accumulated in fp32 otherwise)
        optimizer = build_optimizer(
            self.model, self.optim_cfg, working_copies=self.trainer.accumulate_grad_batches == 1
        )
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any
    ) -> None:
        mp = getattr(self.model, "_cupola_mp", None)  # gradients may sit on bf16 working copies
        grads = [mp.grad(p) if mp is not None else p.grad for p in self.model.parameters()]
        grads = [g for g in grads if g is not None]
        self.last_grad_norm = clip_grad_norm_(grads, self.optim_cfg.clip_grad_norm or float("inf"))
        if not math.isfinite(self.last_grad_norm):
            raise_non_finite(self.trainer, "the gradient norm", self.last_grad_norm)
        self.log("train/grad_norm", self.last_grad_norm, rank_zero_only=True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts of ``model`` (global sizes of sharded parameters; a
    tied parameter counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def clip_grad_norm_(grads: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient-norm clipping (in place) over gradients that may live on different meshes.

    Expert-parallel weights sit on the (dp_shard_mod_ep, ep) mesh, the rest on the FSDP mesh;
    DTensor cannot combine norms across meshes, so each mesh's norm is reduced on its own and the
    global norm is combined from the results. Returns the norm before clipping.
    """
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for mesh, group in groups.items():
        if mesh is None:  # plain tensors, possibly bf16 (working-copy gradients): accumulate in fp32
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in group])
            )
        else:
            norm = torch.nn.utils.get_total_norm(group, foreach=True)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        norms.append(norm)
    if not norms:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if max_norm != float("inf"):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for group in groups.values():
            torch._foreach_mul_(group, coef.to(group[0].device))
    return float(total)
