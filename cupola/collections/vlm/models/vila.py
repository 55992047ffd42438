"""VILA-style vision-language model: a SigLIP-compatible ViT, the ``mlp_downsample`` projector and
the GPT decoder of ``collections/llm``.

    media_N_3_S_S  --vision-->  [N, P, Cv]  --projector-->  [N, P', D]      (P' = ceil(sqrt(P)/2)^2)
    tokens_B_T     --embed--->  [B, T, D], the ``media_token_id`` positions replaced, in order, by the
                                frames' P' visual tokens (a video of F frames fills F * P' positions)
    --> GPT blocks (packed samples masked per document) --> logits [B, T, vocab]

The data pipeline (:mod:`cupola.collections.vlm.data`) writes exactly ``frames * tokens_per_frame``
media placeholders per image/video, so the two always agree; a mismatch is an error naming both
counts. Text-only batches (the context-extension stage) pass no media.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from cupola.collections.llm.models.gpt import GPT, GPTConfig, gpt_config
from cupola.collections.vlm.models.projector import MLPDownsampleProjector
from cupola.collections.vlm.models.vision import VisionConfig, VisionTower, vision_config
from cupola.toolkit.config import ConfigError, config_error, suggest

__all__ = ["VILA", "VILA_FLAVORS", "VLM_COMPONENTS", "VILAConfig", "vila_config"]

VLM_COMPONENTS = ("vision", "projector", "llm")


@dataclass(kw_only=True, slots=True)
class VILAConfig:
    vision: VisionConfig
    llm: GPTConfig
    # The LLM vocabulary id whose positions receive visual tokens. Byte tokenizer: 259, one past
    # the text ids. Llama 3: a reserved special token (128002 = <|reserved_special_token_0|>).
    media_token_id: int

    @property
    def tokens_per_frame(self) -> int:
        return MLPDownsampleProjector.tokens_out(self.vision.num_patches)

    def validate(self) -> None:
        self.vision.validate()
        self.llm.validate()
        if not isinstance(self.media_token_id, int) or not 0 <= self.media_token_id < self.llm.vocab_size:
            raise config_error(
                self,
                "media_token_id",
                self.media_token_id,
                f"must be an id of the LLM vocabulary [0, {self.llm.vocab_size}); reserve one the "
                "tokenizer never produces (for cupola's byte tokenizer: 259)",
            )


VILA_FLAVORS: dict[str, VILAConfig] = {
    # CPU-sized: 32 px frames, 16 patches -> 4 visual tokens per frame; the tiny GPT (byte vocabulary).
    "tiny": VILAConfig(
        vision=vision_config("tiny"), llm=gpt_config("tiny", max_seq_len=1024), media_token_id=259
    ),
    # LongVILA-8B (arXiv 2408.10188): SigLIP-so400m-patch14-384 (729 patches -> 196 tokens per frame
    # through mlp_downsample) and a Llama-3-8B-sized LLM (VILA1.5 / Llama-3-VILA1.5-8B).
    "vila_8b": VILAConfig(
        vision=vision_config("siglip_so400m_384"), llm=gpt_config("llama3_8b"), media_token_id=128002
    ),
}


def vila_config(flavor: str, **overrides: object) -> VILAConfig:
    """A validated copy of ``VILA_FLAVORS[flavor]`` with top-level ``overrides`` applied."""
    if flavor not in VILA_FLAVORS:
        raise ConfigError(
            f"unknown VLM flavor {flavor!r}{suggest(flavor, VILA_FLAVORS)}; choose one of {sorted(VILA_FLAVORS)}"
        )
    cfg = dataclasses.replace(VILA_FLAVORS[flavor], **overrides)
    cfg.vision = dataclasses.replace(cfg.vision)
    cfg.llm = dataclasses.replace(cfg.llm)
    cfg.validate()
    return cfg


class VILA(nn.Module):
    """Vision tower + projector + GPT (see the module docstring); ``vision``, ``projector``, ``llm``
    are the components a training stage freezes or trains."""

    def __init__(self, cfg: VILAConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = MLPDownsampleProjector(cfg.vision.dim, cfg.llm.dim)
        self.llm = GPT(cfg.llm)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        self.vision.init_weights()
        self.projector.init_weights()
        self.llm.init_weights(buffer_device)

    def encode_media(self, media_N_3_S_S: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[N, tokens_per_frame, D]`` for ``N`` frames/images (SigLIP-normalised pixels)."""
        return self.projector(self.vision(media_N_3_S_S))

    def embed(
        self,
        tokens_B_T: torch.Tensor,
        media_N_3_S_S: torch.Tensor | None = None,
        media_embeds_N_P_D: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings ``[B, T, D]``: token embeddings with the media placeholders replaced by the
        visual tokens of ``media`` (or of already encoded ``media_embeds``, e.g. a reused haystack)."""
        h = self.llm.embed(tokens_B_T)
        slots = tokens_B_T == self.cfg.media_token_id
        if media_embeds_N_P_D is None and media_N_3_S_S is not None and media_N_3_S_S.shape[0] > 0:
            media_embeds_N_P_D = self.encode_media(media_N_3_S_S.to(h.dtype))
        n_slots = int(slots.sum())  # one host sync per step, to check the contract with the data
        n_visual = (
            0 if media_embeds_N_P_D is None else media_embeds_N_P_D.shape[0] * media_embeds_N_P_D.shape[1]
        )
        if n_slots != n_visual:
            raise ValueError(
                f"the batch has {n_slots} media placeholder tokens (id {self.cfg.media_token_id}) but its media "
                f"give {n_visual} visual tokens ({self.cfg.tokens_per_frame} per frame); the data must "
                "expand each frame to tokens_per_frame placeholders (VLMDataModule does)"
            )
        if n_slots:
            h = h.clone()
            h[slots] = media_embeds_N_P_D.reshape(-1, h.shape[-1]).to(h.dtype)
        return h

    def forward(
        self,
        tokens_B_T: torch.Tensor,
        media_N_3_S_S: torch.Tensor | None = None,
        positions_B_T: torch.Tensor | None = None,
        document_ids_B_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.embed(tokens_B_T, media_N_3_S_S)
        return self.llm.forward_embeddings(h, positions_B_T, document_ids_B_T)
