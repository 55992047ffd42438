"""The tokenizer LightningModule: reconstruct clips (L1 + perceptual + Gram on a schedule, and the
optional adversarial stage), log PSNR; weights from the seed, a cupola tokenizer run (fine-tuning)
or a diffusers ``AutoencoderKLCosmos`` folder."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cupola.collections.world.tokenizers.adversarial import (
    PatchDiscriminator3D,
    TokenizerWithDiscriminator,
    adversarial_losses,
)
from cupola.collections.world.tokenizers.losses import ReconstructionLoss, ReconstructionLossConfig
from cupola.collections.world.tokenizers.model import TokenizerConfig, VideoTokenizer
from cupola.toolkit.config import ConfigError
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.mixed_precision import apply_mixed_precision
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig
from cupola.toolkit.training.module import ParallelModule
from cupola.toolkit.training.weights import SliceSource

__all__ = ["TokenizerModule", "parallelize_tokenizer", "psnr"]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of videos in [-1, 1] (data range 2), over the whole batch (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(y.detach().float().clamp(-1, 1), x.detach().float(), data_range=2.0)


def parallelize_tokenizer(
    model: VideoTokenizer,
    dims: ParallelDims,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> VideoTokenizer:
    """FSDP2 per encoder/decoder stage and mid block, the rest in the root unit; on one process,
    single-process mixed precision instead. ``compile``: each stage separately."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for name, degree in (("tp", dims.tp), ("ep", dims.ep), ("sp", dims.sp)):
        if degree > 1:
            raise ConfigError(
                f"parallel.{name}={degree} is not supported for tokenizers; use data parallelism "
                "(parallel.dp_shard / dp_replicate)"
            )
    tokenizer = getattr(model, "tokenizer", model)  # TokenizerWithDiscriminator in the adversarial stage
    units = [
        *tokenizer.encoder.stages,
        tokenizer.encoder.mid,
        tokenizer.decoder.mid,
        *tokenizer.decoder.stages,
    ]
    if tokenizer is not model:
        units.append(model.discriminator)
    if compile:
        for unit in units:
            unit.compile()
    if dims.world_size == 1:
        if param_dtype != torch.float32:
            apply_mixed_precision(model, param_dtype)
        return model
    mesh = dims.submesh("dp_shard_sp") if dims.dp_replicate == 1 else dims.mesh["dp_replicate", "dp_shard_sp"]
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(
        model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    )
    return model


class TokenizerModule(ParallelModule):
    def __init__(
        self,
        config: TokenizerConfig,
        *,
        loss: ReconstructionLossConfig,
        optim: OptimConfig,
        parallel: ParallelConfig,
        precision: str,
        max_steps: int,
        init_from: str | None = None,
    ) -> None:
        super().__init__(optim=optim, parallel=parallel, precision=precision, max_steps=max_steps)
        self.config = config
        self.loss_cfg = loss
        self.init_from = init_from
        # the loss (and its frozen VGG) is not a submodule: it stays out of checkpoints and the state dict
        self.__dict__["criterion"] = ReconstructionLoss(loss)

    def build_model(self) -> nn.Module:
        if not self.loss_cfg.adversarial:
            return VideoTokenizer(self.config)
        return TokenizerWithDiscriminator(
            VideoTokenizer(self.config), PatchDiscriminator3D(self.loss_cfg.discriminator_channels)
        )

    def parallelize(self, model: nn.Module, dims: ParallelDims) -> nn.Module:
        return parallelize_tokenizer(
            model,
            dims,
            param_dtype=self.param_dtype,
            reduce_dtype=torch.float32,
            compile=self.parallel_cfg.compile,
        )

    def init_weights(self, model: nn.Module) -> None:
        # nn.Conv3d/Linear/GroupNorm defaults (Kaiming-uniform), drawn from the seed on every rank
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def initial_weights(self) -> Mapping[str, SliceSource] | None:
        if not self.init_from:
            return None
        from cupola.collections.world.tokenizers.checkpoint import tokenizer_sources

        sources = tokenizer_sources(self.init_from, self.config)
        return {f"tokenizer.{k}": v for k, v in sources.items()} if self.loss_cfg.adversarial else sources

    def initial_weights_keep(self) -> tuple[str, ...]:
        return ("discriminator.",)  # a discriminator starts fresh (checkpoints keep the tokenizer only)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["video"]
        y = self.model(x)
        total, terms = self.criterion(x, y.float(), self.global_step)
        if self.loss_cfg.adversarial:
            on = self.global_step >= self.loss_cfg.adversarial_start_step
            adversarial, more = adversarial_losses(
                self.model.discriminator, x, y, self.loss_cfg.adversarial if on else 0.0
            )
            total = total + adversarial
            terms = {**terms, **more}
        stage = "train" if self.training else "val"
        for name, value in terms.items():
            self.log(
                f"{stage}/{name}", value.detach(), rank_zero_only=self.training, sync_dist=not self.training
            )
        self.log(
            f"{stage}/psnr",
            psnr(x, y),
            prog_bar=True,
            rank_zero_only=self.training,
            sync_dist=not self.training,
        )
        return total

    def on_fit_start(self) -> None:
        self.criterion.to(self.device)
