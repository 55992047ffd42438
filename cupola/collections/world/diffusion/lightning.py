"""The diffusion WFM LightningModule: pretraining (Text2World / Video2World) and post-training
(action- and camera-conditioned, full or LoRA) on videos encoded by a frozen tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cupola.collections.world.common import parallelize_blocks
from cupola.collections.world.diffusion.dit import DiT
from cupola.collections.world.diffusion.model import Conditioning, DiffusionWFM, WFMConfig
from cupola.collections.world.module import WorldModelModule
from cupola.toolkit.config import ConfigError
from cupola.toolkit.modules.lora import set_lora_trainable
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence import SequenceParallel
from cupola.toolkit.training.callbacks import global_mean
from cupola.toolkit.training.weights import SliceSource, TensorSource

__all__ = ["DiffusionModule", "apply_sp", "camera_rays", "parallelize_wfm", "wfm_sources"]


def parallelize_wfm(
    model: DiffusionWFM,
    dims: ParallelDims,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> DiffusionWFM:
    """FSDP2 per DiT block, the DiT's own weights (its unit: training calls ``training_loss``, not the
    root's ``forward``) and the byte text encoder; sequence parallelism over the DiT's tokens with
    ``parallel.sp > 1`` (see :mod:`~cupola.collections.world.diffusion.dit`). See
    :func:`~cupola.collections.world.common.parallelize_blocks`."""
    units = [model.dit, *([model.text_encoder] if model.text_encoder is not None else [])]
    return parallelize_blocks(
        model,
        model.dit.blocks,
        dims,
        what="diffusion world models",
        apply_sp=lambda sp: apply_sp(model.dit, sp),
        units=units,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        activation_checkpointing=activation_checkpointing,
        compile=compile,
    )


def apply_sp(dit: DiT, sp: SequenceParallel) -> None:
    """Sequence parallelism: each rank runs the DiT's blocks on its share of the tokens, self-attention
    over all of them through ``sp``."""
    dit.sp = sp
    for block in dit.blocks:
        block.self_attn.sp = sp


def wfm_sources(init_from: str, cfg: WFMConfig) -> dict[str, SliceSource]:
    """A diffusion run's weights for a model of ``cfg``, LoRA merged. Post-training may add inputs: a
    base without the Video2World mask or Plücker channels gets zero columns for them in
    ``patch_embed`` (so the new model starts as the base), a new action embedding keeps its (zero) init."""
    from cupola.collections.llm.lightning import checkpoint_sources, run_checkpoint

    ckpt = run_checkpoint(init_from)
    if ckpt is None:
        raise ConfigError(f"init_from={init_from!r} is not a cupola diffusion run or checkpoint folder")
    sources = dict(checkpoint_sources(ckpt))
    key = "dit.patch_embed.weight"
    if key in sources:
        base = sources[key][...]
        pt, ph, pw = cfg.dit.patch
        want = cfg.dit.in_channels * pt * ph * pw
        if base.shape[1] < want:
            pad = base.new_zeros(base.shape[0], want - base.shape[1])
            sources[key] = TensorSource(torch.cat([base, pad], dim=1))
    return sources


def camera_rays(
    batch: Mapping[str, Any], latent_frames: int, height: int, width: int, temporal: int, spatial: int
) -> torch.Tensor:
    """Plücker rays ``[B, 6, T', H', W']`` at the latent grid: latent frame ``j`` takes the camera of
    pixel frame ``temporal * j`` (the last frame it covers), poses relative to the first frame."""
    from cupola.collections.world.data.camera import plucker_embedding, relative_to_first, scale_intrinsics

    c2w = relative_to_first(batch["cam_to_world"].float())  # [B, T, 4, 4]
    index = torch.clamp(torch.arange(latent_frames, device=c2w.device) * temporal, max=c2w.shape[1] - 1)
    K = scale_intrinsics(batch["intrinsics"].float(), 1 / spatial, 1 / spatial)
    rays = plucker_embedding(K, c2w[:, index], height, width)  # [B, T', 6, H', W']
    return rays.transpose(1, 2)


class DiffusionModule(WorldModelModule):
    model_cls = DiffusionWFM
    parallelize_fn = staticmethod(parallelize_wfm)
    sources_fn = staticmethod(wfm_sources)

    def __init__(self, config: WFMConfig, *, seed: int = 0, **kwargs: Any) -> None:
        """``seed``: of the training noise (with the step and the data-parallel rank); ``kwargs``:
        :class:`~cupola.collections.world.module.WorldModelModule`'s."""
        super().__init__(config, **kwargs)
        self.seed = seed

    def lora_targets(self, model: nn.Module) -> nn.Module:
        return model.dit.blocks

    def initial_weights_keep(self) -> tuple[str, ...]:
        # a new action embedding starts at zero (the base model); the frame rate is that of the new data
        return ("dit.action_embed.", "train_fps")

    def freeze(self, model: nn.Module) -> None:
        if self.lora is not None:  # adapters (+ norms) in the blocks; new conditioning inputs in full
            set_lora_trainable(model, self.lora)
            for name, p in model.named_parameters():
                if name.startswith(("dit.action_embed.", "dit.patch_embed.")):
                    p.requires_grad_(True)

    def on_fit_start(self) -> None:
        self.helpers()

    def helpers(self):
        """The frozen tokenizer (and T5 encoder), loaded once on this module's device."""
        if self.__dict__["tokenizer"] is None:
            from cupola.collections.world.tokenizers.checkpoint import load_tokenizer

            tok = load_tokenizer(self.tokenizer_path, self.device)
            if tok.cfg.discrete:
                raise ConfigError(
                    f"tokenizer={self.tokenizer_path!r} is discrete (FSQ); diffusion models need a continuous "
                    "(CV) tokenizer"
                )
            if tok.cfg.latent_channels != self.config.dit.latent_channels:
                raise ConfigError(
                    f"the tokenizer has {tok.cfg.latent_channels} latent channels, the model "
                    f"dit.latent_channels={self.config.dit.latent_channels}; make them equal"
                )
            tok.requires_grad_(False)
            self.__dict__["tokenizer"] = tok
            if self.config.dit.text.kind == "t5":
                from cupola.collections.world.text import T5TextEncoder

                self.__dict__["t5"] = T5TextEncoder(self.config.dit.text, self.device)
        return self.__dict__["tokenizer"], self.__dict__["t5"]

    # training ---------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        # a function of (seed, step, data-parallel rank, train/val): resumed runs draw the same noise, and
        # the sequence-parallel ranks of one replica (each holding part of the same clips) draw alike
        g = torch.Generator(device=self.device)
        rank = self.dims.dp_coordinate(self.trainer.global_rank) if self._trainer is not None else 0
        g.manual_seed(hash((self.seed, int(self.global_step), rank, self.training)) % (2**63))
        return g

    @torch.no_grad()
    def latents(self, video: torch.Tensor) -> torch.Tensor:
        tok, _ = self.helpers()
        z = tok.encode_latent(video.float())
        scale = self.model.latent_scale
        if torch.isnan(scale):
            std = global_mean(z.float().std())
            scale.fill_(float(self.config.edm.sigma_data / std))
            if self._trainer is None or self.trainer.is_global_zero:
                print(f"[cupola] latent_scale = {float(scale):.4f} (latent std {float(std):.4f})", flush=True)
        return z * scale

    def conditioning(
        self, batch: Mapping[str, Any], x0: torch.Tensor, generator: torch.Generator
    ) -> Conditioning:
        cfg = self.config
        prompts = list(batch.get("prompt") or [""] * x0.shape[0])
        if self.training and cfg.cond_dropout > 0:
            drop = torch.rand(len(prompts), generator=generator, device=generator.device) < cfg.cond_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        _, t5 = self.helpers()
        context, mask = self.model.encode_text(prompts, t5)
        fps = batch.get("fps")
        if fps is not None:
            fps = torch.as_tensor(fps, device=x0.device, dtype=torch.float32)
            if self.training:
                self.model.train_fps.copy_(fps.median())
        cond = Conditioning(
            context=context,
            context_mask=mask,
            cond_latents=x0 if cfg.cond_frames else None,
            cond_frames=cfg.cond_frames,
            actions=batch.get("actions") if cfg.dit.action_dim else None,
            fps=fps,
        )
        if cfg.dit.camera:
            tok, _ = self.helpers()
            _, _, T, H, W = x0.shape
            cond.plucker = camera_rays(
                batch, T, H, W, tok.cfg.temporal_compression, tok.cfg.spatial_compression
            ).to(x0.dtype)
        return cond

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x0 = self.latents(batch["video"])
        generator = self._generator()
        if x0.shape[2] <= self.config.cond_frames:
            raise ValueError(
                f"clips of {batch['video'].shape[2]} frames give {x0.shape[2]} latent frames: nothing is left to "
                f"generate after cond_frames={self.config.cond_frames}; use longer clips"
            )
        loss = self.model.training_loss(x0, self.conditioning(batch, x0, generator), generator)
        if not self.training:
            self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)
