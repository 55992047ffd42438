"""The GPT LightningModule: next-token cross-entropy on top of the toolkit's parallel module shell."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from cupola.collections.llm.models.gpt import (
    GPT,
    GPTConfig,
    hf_llama_config_to_gpt,
    hf_llama_to_gpt_state_dict,
    parallelize_gpt,
)
from cupola.collections.llm.upcycling import UpcycleConfig, upcycled_sources
from cupola.toolkit import hub
from cupola.toolkit.config import ConfigError, from_dict, to_dict
from cupola.toolkit.modules.lora import merge_lora_weights
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence import SequenceParallel
from cupola.toolkit.training.checkpoint import is_complete, latest_checkpoint, load_model_weights
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig
from cupola.toolkit.training.module import ParallelModule
from cupola.toolkit.training.weights import SliceSource, TensorSource, safetensors_sources

IGNORE_INDEX = -100


def dense_config(moe_cfg: GPTConfig) -> GPTConfig:
    """The dense model an upcycled MoE config came from (``moe_config`` keeps the dense FFN width)."""
    return dataclasses.replace(moe_cfg, moe=None)


def check_same_config(
    init_from: str, found: GPTConfig, config: GPTConfig, ignore: tuple[str, ...] = ()
) -> None:
    mismatched = {
        k: (v, getattr(config, k))
        for k, v in to_dict(found).items()
        if k not in ignore and to_dict(config).get(k) != v
    }
    if mismatched:
        raise ConfigError(
            f"init_from={init_from!r} holds a model that differs from model= in the recipe; fields "
            f"(checkpoint, recipe): {mismatched}. Set those model.* overrides, or pick the matching recipe"
        )


# What a model may change without changing its weights (context length, RoPE), e.g. a VLM's LLM.
NON_STRUCTURAL = ("max_seq_len", "rope_theta", "rope_scaling", "init_std")


def run_checkpoint(init_from: str) -> Path | None:
    """The checkpoint folder ``init_from`` names (itself, or a run's newest), or None if it is neither."""
    path = Path(init_from).expanduser()
    return path if is_complete(path) else latest_checkpoint(path / "checkpoints") if path.is_dir() else None


def checkpoint_sources(ckpt: Path) -> dict[str, SliceSource]:
    """Every model weight of a cupola checkpoint, under the model's own names, LoRA adapters (if the
    run trained any) merged into their base weights."""
    weights = merge_lora_weights({k.removeprefix("model."): v for k, v in load_model_weights(ckpt).items()})
    return {k: TensorSource(v) for k, v in weights.items()}


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, sp: SequenceParallel | None = None
) -> torch.Tensor:
    """Mean cross-entropy (fp32, or float64) of ``logits [B, T, V]`` against ``labels [B, T]``, ignoring -100.

    Under sequence parallelism (``sp``: each rank holds part of every sequence) the mean is over the
    whole sequences' labels, scaled by the SP degree: FSDP averages gradients over the SP ranks too,
    so the averaged gradient is exactly that of the whole-sequence mean.
    """
    flat_logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)
    flat_labels = labels.flatten()
    if sp is None or sp.sp_group is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (flat_labels != IGNORE_INDEX).sum()
    dist.all_reduce(count, group=sp.sp_group)
    return total * sp.layout.size / count.clamp(min=1)


def initial_sources(
    init_from: str, config: GPTConfig, ignore: tuple[str, ...] = ()
) -> dict[str, SliceSource]:
    """Lazy GPT weights from a cupola run/checkpoint folder or a Hugging Face Llama folder/cache id;
    the source's config must equal ``config`` except for the fields in ``ignore``."""
    ckpt = run_checkpoint(init_from)
    if ckpt is not None:
        saved = OmegaConf.to_container(OmegaConf.load(ckpt.parent.parent / "config.yaml"))["model"]
        check_same_config(init_from, from_dict(GPTConfig, saved), config, ignore)
        return checkpoint_sources(ckpt)
    folder = hub.resolve_checkpoint_dir(init_from)
    check_same_config(init_from, hf_llama_config_to_gpt(hub.read_config(folder)), config, ignore)
    return hf_llama_to_gpt_state_dict(safetensors_sources(folder), config)


class GPTModule(ParallelModule):
    def __init__(
        self,
        config: GPTConfig,
        *,
        optim: OptimConfig,
        parallel: ParallelConfig,
        precision: str,
        max_steps: int,
        init_from: str | None = None,
        upcycle: UpcycleConfig | None = None,
    ) -> None:
        super().__init__(optim=optim, parallel=parallel, precision=precision, max_steps=max_steps)
        self.config = config
        self.init_from = init_from
        self.upcycle = upcycle  # with init_from a dense checkpoint: online upcycling

    def build_model(self) -> nn.Module:
        return GPT(self.config)

    def parallelize(self, model: nn.Module, dims: ParallelDims) -> nn.Module:
        p = self.parallel_cfg
        return parallelize_gpt(
            model,
            dims,
            param_dtype=self.param_dtype,
            reduce_dtype=torch.float32,
            activation_checkpointing=p.activation_checkpointing,
            compile=p.compile,
        )

    def init_weights(self, model: nn.Module) -> None:
        model.init_weights()

    def initial_weights(self) -> dict[str, SliceSource] | None:
        if not self.init_from:
            return None
        if self.upcycle is None:
            return initial_sources(self.init_from, self.config)
        dense_cfg = dense_config(self.config)
        return upcycled_sources(initial_sources(self.init_from, dense_cfg), dense_cfg, self.upcycle)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = self.shard_sequences(batch)
        logits = self.model(batch["tokens"], batch.get("positions"), batch.get("document_ids"))
        return next_token_loss(logits, batch["labels"], self.sp)
