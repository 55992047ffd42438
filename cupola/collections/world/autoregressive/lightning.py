"""The autoregressive WFM LightningModule: next-token cross-entropy over the FSQ indices a frozen DV
tokenizer gives each clip (pretraining, or post-training a run with ``init_from``, in full or LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cupola.collections.llm.lightning import IGNORE_INDEX, next_token_loss
from cupola.collections.world.autoregressive.model import ARConfig, ARWorldModel
from cupola.collections.world.common import check_token_split, parallelize_blocks
from cupola.collections.world.module import WorldModelModule
from cupola.toolkit.config import ConfigError
from cupola.toolkit.modules.lora import set_lora_trainable
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence import SequenceParallel
from cupola.toolkit.training.weights import SliceSource

__all__ = ["ARModule", "apply_sp", "ar_sources", "load_ar", "parallelize_ar"]


def parallelize_ar(
    model: ARWorldModel,
    dims: ParallelDims,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> ARWorldModel:
    """FSDP2 per decoder block (and the byte text encoder), embeddings/head in the root unit, sequence
    parallelism with ``parallel.sp > 1``; see :func:`~cupola.collections.world.common.parallelize_blocks`."""
    units = [model.text_encoder] if model.text_encoder is not None else []
    return parallelize_blocks(
        model,
        model.layers,
        dims,
        what="autoregressive world models",
        apply_sp=lambda sp: apply_sp(model, sp),
        units=units,
        forward_methods=("encode_text",),  # the byte text encoder runs before the decoder
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        activation_checkpointing=activation_checkpointing,
        compile=compile,
    )


def apply_sp(model: ARWorldModel, sp: SequenceParallel) -> None:
    """Sequence parallelism: every self-attention layer attends over the whole clip through ``sp``
    while each rank holds its part of the tokens (as ``GPT``'s ``apply_sp``)."""
    model.sp = sp
    for layer in model.layers:
        layer.attention.sp = sp


def _run(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """An AR run's (or checkpoint folder's) newest checkpoint and its run config."""
    from omegaconf import OmegaConf

    from cupola.collections.llm.lightning import run_checkpoint

    ckpt = run_checkpoint(str(path))
    if ckpt is None:
        raise FileNotFoundError(
            f"{path}: not a cupola autoregressive run or checkpoint folder (no checkpoint in it)"
        )
    config = OmegaConf.to_container(OmegaConf.load(ckpt.parent.parent / "config.yaml"))
    if config.get("wfm") != "autoregressive":
        raise ConfigError(
            f"{ckpt.parent.parent} is not an autoregressive world-model run (its config.yaml says otherwise)"
        )
    return ckpt, config


def ar_sources(init_from: str, cfg: ARConfig) -> dict[str, SliceSource]:
    """An AR run's weights (LoRA merged) for a model of ``cfg``; structures must agree."""
    from cupola.collections.llm.lightning import checkpoint_sources
    from cupola.toolkit.config import from_dict

    ckpt, config = _run(init_from)
    base = from_dict(ARConfig, config["model"])
    fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_dim", "cross_attention")
    differ = [f for f in fields if getattr(base, f) != getattr(cfg, f)]
    if differ:
        raise ConfigError(
            f"init_from={init_from!r} holds a model that differs from model= in "
            + ", ".join(f"{f} ({getattr(base, f)} there, {getattr(cfg, f)} here)" for f in differ)
        )
    return checkpoint_sources(ckpt)


def load_ar(path: str | Path, device: str | torch.device = "cpu", *, tokenizer: str | None = None):
    """``(model, tokenizer)``: an AR run (its newest checkpoint) or checkpoint folder, LoRA merged, fp32,
    in eval mode, with the DV tokenizer it was trained with (or ``tokenizer``: a run/checkpoint folder)."""
    from cupola.collections.world.tokenizers.checkpoint import load_tokenizer
    from cupola.toolkit.config import from_dict
    from cupola.toolkit.modules.lora import merge_lora_weights
    from cupola.toolkit.training.checkpoint import load_model_weights

    ckpt, config = _run(path)
    model = ARWorldModel(from_dict(ARConfig, config["model"]))
    weights = merge_lora_weights({k.removeprefix("model."): v for k, v in load_model_weights(ckpt).items()})
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.to(device).eval(), load_tokenizer(tokenizer or config["tokenizer"], device)


class ARModule(WorldModelModule):
    model_cls = ARWorldModel
    parallelize_fn = staticmethod(parallelize_ar)
    sources_fn = staticmethod(ar_sources)

    def lora_targets(self, model: nn.Module) -> nn.Module:
        return model.layers

    def freeze(self, model: nn.Module) -> None:
        if self.lora is not None:
            set_lora_trainable(model, self.lora)

    def on_fit_start(self) -> None:
        self.helpers()

    def helpers(self):
        """The frozen DV tokenizer (and T5 encoder), loaded once on this module's device."""
        if self.__dict__["tokenizer"] is None:
            from cupola.collections.world.tokenizers.checkpoint import load_tokenizer

            tok = load_tokenizer(self.tokenizer_path, self.device)
            if not tok.cfg.discrete:
                raise ConfigError(
                    f"tokenizer={self.tokenizer_path!r} is continuous (CV); autoregressive models need a "
                    "discrete (DV, FSQ) tokenizer"
                )
            if tok.fsq.codebook_size != self.config.vocab_size:
                raise ConfigError(
                    f"the tokenizer has {tok.fsq.codebook_size} codes, the model vocab_size="
                    f"{self.config.vocab_size}; make them equal"
                )
            tok.requires_grad_(False)
            self.__dict__["tokenizer"] = tok
            if self.config.cross_attention and self.config.text.kind == "t5":
                from cupola.collections.world.text import T5TextEncoder

                self.__dict__["t5"] = T5TextEncoder(self.config.text, self.device)
        return self.__dict__["tokenizer"], self.__dict__["t5"]

    # training ---------------------------------------------------------------------------
    @torch.no_grad()
    def indices(self, video_B_3_T_H_W: torch.Tensor) -> torch.Tensor:
        """FSQ indices ``[B, t, h, w]`` of the clips."""
        tok, _ = self.helpers()
        return tok.encode(video_B_3_T_H_W.float())[1]

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-token cross-entropy over each clip's tokens. The whole grid goes in, its last token's
        label ignored, so that under sequence parallelism rows split like the GPT's (each rank its
        part of ``tokens`` and ``labels``; the mean over the whole rows, see ``next_token_loss``)."""
        idx = self.indices(batch["video"])
        grid = tuple(idx.shape[1:])
        tokens = idx.flatten(1).long()
        labels = torch.cat([tokens[:, 1:], tokens.new_full((tokens.shape[0], 1), IGNORE_INDEX)], dim=1)
        if self.sp is not None:
            check_token_split(self.sp, tokens.shape[1], f"a clip's {'x'.join(map(str, grid))} token grid")
        part = self.shard_sequences({"tokens": tokens, "labels": labels})
        context = context_mask = None
        if self.config.cross_attention:
            prompts = batch.get("prompt")
            if prompts is None:
                raise ValueError(
                    "a model with cross_attention trains on prompts: the data gives no batch['prompt']"
                )
            _, t5 = self.helpers()
            context, context_mask = self.model.encode_text(list(prompts), t5)
        logits = self.model(part["tokens"], grid, context=context, context_mask=context_mask)
        return next_token_loss(logits, part["labels"], self.sp)
