"""The diffusion world model: the DiT under EDM preconditioning, its text encoder, and the
Text2World / Video2World / action / camera conditioning, for training and sampling.

Video2World: the first ``k`` latent frames are given. They enter the network as
``x0 + σ_c ε`` (noise-augmented with a small ``σ_c``, drawn log-normally in training and fixed at
:attr:`EDMConfig.cond_sigma` when generating) at their own noise level, flagged by a mask
channel; the denoiser returns them unchanged (clean) and the loss leaves them out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cupola.collections.world.diffusion.dit import DiT, DiTConfig
from cupola.collections.world.diffusion.edm import (
    EDMConfig,
    edm_loss_weight,
    edm_scalings,
    karras_sigmas,
    sample_sigmas,
)
from cupola.collections.world.diffusion.samplers import guided, sample
from cupola.collections.world.text import ByteTextEncoder

__all__ = ["Conditioning", "DiffusionWFM", "WFMConfig"]


@dataclass(kw_only=True, slots=True)
class WFMConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    cond_dropout: float = 0.1  # share of training samples with the empty prompt (for guidance)
    cond_frames: int = 0  # Video2World: latent frames given (1 = the first pixel frame)

    def validate(self) -> None:
        from cupola.toolkit.config import config_error

        self.dit.validate()
        self.edm.validate()
        if self.dit.video2world != (self.cond_frames > 0):
            raise config_error(
                self,
                "cond_frames",
                self.cond_frames,
                "must be >= 1 exactly when dit.video2world is set (0 for Text2World)",
            )
        if not 0.0 <= self.cond_dropout < 1.0:
            raise config_error(self, "cond_dropout", self.cond_dropout, "must be in [0, 1)")


@dataclass
class Conditioning:
    """What a sample is conditioned on besides its noisy latents. ``context``/``context_mask``:
    text embeddings (from :meth:`DiffusionWFM.encode_text`). ``cond_latents_B_C_T_H_W`` with
    ``cond_frames``: the given first latent frames (Video2World). ``actions_B_N_A``, ``plucker_B_6_T_H_W``
    (at latent resolution), ``fps_B``."""

    context: torch.Tensor
    context_mask: torch.Tensor
    cond_latents: torch.Tensor | None = None
    cond_frames: int = 0
    actions: torch.Tensor | None = None
    plucker: torch.Tensor | None = None
    fps: torch.Tensor | None = None


class DiffusionWFM(nn.Module):
    def __init__(self, cfg: WFMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dit = DiT(cfg.dit)
        # the byte encoder trains with the model; a T5 encoder stays outside it (frozen, not saved)
        self.text_encoder = ByteTextEncoder(cfg.dit.text) if cfg.dit.text.kind == "bytes" else None
        # tokenizer latents times this have std sigma_data; measured on the first training batch
        # (as latent diffusion's scale_by_std) and saved with the weights; NaN until then
        self.register_buffer("latent_scale", torch.full((), float("nan")))
        # the frame rate of the clips it was last trained on (the batches' median; NaN: trained without
        # fps), saved with the weights: generation defaults to it, so that the time positions of its
        # fps-aware RoPE are the ones it learned
        self.register_buffer("train_fps", torch.full((), float("nan")))

    def init_weights(self) -> None:
        self.latent_scale.fill_(float("nan"))
        self.train_fps.fill_(float("nan"))
        self.dit.init_weights()
        if self.text_encoder is not None:
            self.text_encoder.init_weights()

    def encode_text(
        self,
        prompts: list[str],
        external: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.text_encoder if self.text_encoder is not None else external
        if encoder is None:
            raise ValueError("this model reads T5 embeddings: pass the T5TextEncoder as `external`")
        return encoder(list(prompts))

    def _frame_sigmas(
        self, sigma_B: torch.Tensor, T: int, cond: Conditioning, cond_sigma_B: torch.Tensor | None
    ):
        sig = sigma_B[:, None].expand(-1, T).clone()
        if cond.cond_frames:
            sig[:, : cond.cond_frames] = cond_sigma_B[:, None]
        return sig

    def denoise(self, x_B_C_T_H_W: torch.Tensor, sigma_B_T: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``D(x; σ)``: the clean-latent estimate for latents ``x`` at per-frame noise levels ``σ``;
        conditioning frames come back as the given latents."""
        sd = self.cfg.edm.sigma_data
        c_skip, c_out, c_in, c_noise = (c[:, None, :, None, None] for c in edm_scalings(sigma_B_T, sd))
        parts = [x_B_C_T_H_W * c_in]
        B, _, T, H, W = x_B_C_T_H_W.shape
        if self.cfg.dit.video2world:
            mask = x_B_C_T_H_W.new_zeros(B, 1, T, H, W)
            mask[:, :, : cond.cond_frames] = 1
            parts.append(mask)
        if self.cfg.dit.camera:
            if cond.plucker is None:
                raise ValueError(
                    "this model is camera-conditioned: pass Plücker embeddings (plucker_B_6_T_H_W)"
                )
            parts.append(cond.plucker.to(x_B_C_T_H_W.dtype))
        out = self.dit(
            torch.cat(parts, dim=1),
            c_noise[:, 0, :, 0, 0],
            cond.context,
            cond.context_mask,
            fps=cond.fps,
            actions=cond.actions,
        )
        x0 = c_skip * x_B_C_T_H_W + c_out * out.to(x_B_C_T_H_W.dtype)
        if cond.cond_frames:
            x0 = torch.cat(
                [cond.cond_latents[:, :, : cond.cond_frames].to(x0.dtype), x0[:, :, cond.cond_frames :]], 2
            )
        return x0

    def training_loss(
        self, x0_B_C_T_H_W: torch.Tensor, cond: Conditioning, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """EDM's weighted denoising loss over the generated (non-conditioning) latent frames."""
        e = self.cfg.edm
        B, _, T, _, _ = x0_B_C_T_H_W.shape
        device = x0_B_C_T_H_W.device
        sigma = sample_sigmas(B, e.p_mean, e.p_std, device=device, generator=generator)
        cond_sigma = (
            sample_sigmas(B, e.cond_sigma_mean, e.cond_sigma_std, device=device, generator=generator)
            if cond.cond_frames
            else None
        )
        sig = self._frame_sigmas(sigma, T, cond, cond_sigma).to(x0_B_C_T_H_W.dtype)
        noise = torch.randn(x0_B_C_T_H_W.shape, generator=generator, device=device, dtype=x0_B_C_T_H_W.dtype)
        x = x0_B_C_T_H_W + sig[:, None, :, None, None] * noise
        x0_hat = self.denoise(x, sig, cond)
        k = cond.cond_frames
        err = (x0_hat[:, :, k:].float() - x0_B_C_T_H_W[:, :, k:].float()).square().mean(dim=(1, 2, 3, 4))
        return (edm_loss_weight(sigma.float(), e.sigma_data) * err).mean()

    @torch.no_grad()
    def generate(
        self,
        shape_B_C_T_H_W: tuple[int, ...],
        cond: Conditioning,
        *,
        uncond: Conditioning | None = None,
        guidance: float = 1.0,
        steps: int = 35,
        sampler: str = "multistep",
        generator: torch.Generator | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Sample latents: noise at ``sigma_max`` integrated to 0 with ``sampler`` over ``steps`` levels,
        with classifier-free guidance ``guidance`` against ``uncond`` (the empty prompt)."""
        e = self.cfg.edm
        device = cond.context.device
        dtype = next(self.parameters()).dtype
        sigmas = karras_sigmas(steps, e.sigma_min, e.sigma_max, e.rho, device=device)
        x = (
            torch.randn(shape_B_C_T_H_W, generator=generator, device=device, dtype=torch.float32)
            * sigmas[0].float()
        )
        B, _, T, _, _ = shape_B_C_T_H_W
        k = cond.cond_frames
        cond_noise = None
        if k:
            cond_noise = torch.randn(
                cond.cond_latents[:, :, :k].shape, generator=generator, device=device, dtype=torch.float32
            )

        def make(c: Conditioning):
            def denoise(x_: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                sig = torch.full((B, T), float(s), device=device, dtype=torch.float32)
                if k:  # the given frames, re-noised to the conditioning level at every call
                    x_ = x_.clone()
                    x_[:, :, :k] = c.cond_latents[:, :, :k].float() + e.cond_sigma * cond_noise
                    sig[:, :k] = e.cond_sigma
                return self.denoise(x_.to(dtype), sig.to(dtype), c).float()

            return denoise

        denoise = guided(make(cond), make(uncond) if uncond is not None else None, guidance)
        out = sample(sampler, denoise, x, sigmas, callback)
        if k:
            out[:, :, :k] = cond.cond_latents[:, :, :k].float()
        return out
