"""The VLM LightningModule: next-token cross-entropy on answers (media and packed samples included),
with the trainable components of each LongVILA stage set explicitly.

Weights come from, in order of precedence:
- ``init_from``: a cupola VLM run or checkpoint (the previous stage): every weight;
- ``init_vision`` (a Hugging Face SigLIP folder) and/or ``init_llm`` (a Hugging Face Llama folder or
  a cupola GPT run): those components, the rest (the new projector) initialised from the seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cupola.collections.llm.lightning import (
    NON_STRUCTURAL,
    checkpoint_sources,
    initial_sources,
    next_token_loss,
    run_checkpoint,
)
from cupola.collections.vlm.models.vila import VILA, VLM_COMPONENTS, VILAConfig
from cupola.collections.vlm.parallelize import parallelize_vila
from cupola.toolkit.config import ConfigError
from cupola.toolkit.modules.lora import LoRAConfig, apply_lora, init_lora, set_lora_trainable
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence.multimodal import media_share
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig
from cupola.toolkit.training.module import ParallelModule
from cupola.toolkit.training.weights import SliceSource

__all__ = ["VLMModule", "check_trainable", "freeze_unused_vision", "vlm_checkpoint_sources"]


def check_trainable(trainable: Sequence[str], lora: LoRAConfig | None = None) -> tuple[str, ...]:
    """The components to train, validated: a non-empty subset of ``vision``, ``projector``, ``llm``
    (which must include ``llm`` when the LLM trains through LoRA adapters)."""
    trainable = tuple(trainable)
    unknown = [t for t in trainable if t not in VLM_COMPONENTS]
    if unknown or not trainable:
        raise ConfigError(
            f"trainable={list(trainable)}: choose a non-empty subset of {list(VLM_COMPONENTS)} "
            "(align: [projector]; pretrain: [projector, llm]; sft: all three; context extension: [llm])"
        )
    if lora is not None:
        lora.validate()
        if "llm" not in trainable:
            raise ConfigError(
                f"lora is set but trainable={list(trainable)} leaves the LLM frozen; LoRA adapts the LLM: "
                "add 'llm' to trainable or drop lora"
            )
    return trainable


def vlm_checkpoint_sources(init_from: str) -> dict[str, SliceSource] | None:
    """Every weight of a cupola VLM run/checkpoint folder, or None if ``init_from`` is not one."""
    ckpt = run_checkpoint(init_from)
    return None if ckpt is None else checkpoint_sources(ckpt)


class VLMModule(ParallelModule):
    def __init__(
        self,
        config: VILAConfig,
        *,
        optim: OptimConfig,
        parallel: ParallelConfig,
        precision: str,
        max_steps: int,
        trainable: Sequence[str] = ("projector",),
        init_from: str | None = None,
        init_vision: str | None = None,
        init_llm: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__(optim=optim, parallel=parallel, precision=precision, max_steps=max_steps)
        self.config = config
        self.trainable = check_trainable(trainable, lora)
        self.init_from, self.init_vision, self.init_llm = init_from, init_vision, init_llm
        self.lora = lora

    def build_model(self) -> nn.Module:
        model = VILA(self.config)
        if self.lora is not None:
            apply_lora(model.llm, self.lora)
        return model

    def parallelize(self, model: nn.Module, dims: ParallelDims) -> nn.Module:
        p = self.parallel_cfg
        return parallelize_vila(
            model,
            dims,
            param_dtype=self.param_dtype,
            reduce_dtype=torch.float32,
            activation_checkpointing=p.activation_checkpointing,
            compile=p.compile,
        )

    def init_weights(self, model: nn.Module) -> None:
        model.init_weights()
        init_lora(model)

    def initial_weights(self) -> Mapping[str, SliceSource] | None:
        if self.init_from:
            sources = vlm_checkpoint_sources(self.init_from)
            if sources is None:
                raise ConfigError(
                    f"init_from={self.init_from!r} is not a cupola VLM run or checkpoint folder; to start a "
                    "VLM from pretrained parts use init_vision= (HF SigLIP folder) and init_llm= (HF Llama "
                    "folder or cupola GPT run)"
                )
            return sources
        sources: dict[str, SliceSource] = {}
        if self.init_vision:
            from cupola.collections.vlm.models.convert_siglip import siglip_vision_sources

            sources.update(
                {
                    f"vision.{k}": v
                    for k, v in siglip_vision_sources(self.init_vision, self.config.vision).items()
                }
            )
        if self.init_llm:
            sources.update(
                {
                    f"llm.{k}": v
                    for k, v in initial_sources(self.init_llm, self.config.llm, NON_STRUCTURAL).items()
                }
            )
        return sources or None

    def initial_weights_keep(self) -> tuple[str, ...]:
        if self.init_from:
            return ()
        # pretrained parts replace their initialization; the others keep it
        return tuple(f"{c}." for c in VLM_COMPONENTS)

    def freeze(self, model: nn.Module) -> None:
        for component in VLM_COMPONENTS:
            train = component in self.trainable
            for p in getattr(model, component).parameters():
                p.requires_grad_(train)
        if self.lora is not None:  # the LLM learns through its adapters (+ embeddings and norms)
            set_lora_trainable(model.llm, self.lora)
        freeze_unused_vision(model)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        media, labels = batch.get("media"), batch["labels"]
        if self.sp is not None:  # MM-SP: this rank encodes its share of the frames, scores its tokens
            if "media_share" in batch:  # the data decoded this rank's share only (VLMDataModule under SP)
                start, stop, total = (int(x) for x in batch["media_share"])
                if media_share(total, self.sp.layout.size, self.sp.rank) != slice(start, stop):
                    raise ValueError(
                        f"the batch holds frames {start}..{stop - 1} of {total}, not sequence-parallel rank "
                        f"{self.sp.rank}'s share of {self.sp.layout.size}; the data module's sp_rank/sp_size "
                        "must match the model's (the trainer glue sets both)"
                    )
            elif media is not None:
                media = media[media_share(media.shape[0], self.sp.layout.size, self.sp.rank)]
            labels = self.sp.shard(labels)
        logits = self.model(batch["tokens"], media, batch.get("positions"), batch.get("document_ids"))
        return next_token_loss(logits, labels, self.sp)


def freeze_unused_vision(model: nn.Module) -> None:
    """Freeze the vision layers past ``select_layer`` (and the post-layernorm unless the last layer is
    selected): the forward never reaches them, so they would never get a gradient or optimizer state —
    and a resumed run would look for state that was never saved. They stay in the checkpoint."""
    vision = model.vision
    run = vision.cfg.layers_run
    for i, layer in enumerate(vision.layers):
        if i >= run:
            layer.requires_grad_(False)
    if run < vision.cfg.n_layers:
        vision.post_layernorm.requires_grad_(False)
