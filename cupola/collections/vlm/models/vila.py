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
import torch.distributed as dist
from torch import nn

from cupola.collections.llm.models.gpt import GPT, GPTConfig, gpt_config
from cupola.collections.vlm.models.projector import MLPDownsampleProjector
from cupola.collections.vlm.models.vision import VisionConfig, VisionTower, vision_config
from cupola.toolkit.config import ConfigError, config_error, suggest
from cupola.toolkit.parallel.sequence.multimodal import media_share, route_media_embeddings

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
        # Set by parallelize_vila when the tower is sharded (FSDP): the ranks that must run the tower
        # together — a rank without frames encodes a blank one when any other rank has some.
        self.encoder_group = None

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        self.vision.init_weights()
        self.projector.init_weights()
        self.llm.init_weights(buffer_device)

    def encode_media(self, media_N_3_S_S: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[N, tokens_per_frame, D]`` for ``N`` frames/images (SigLIP-normalised pixels)."""
        return self.projector(self.vision(media_N_3_S_S))

    def _encode_local(self, media_N_3_S_S: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """This rank's visual tokens ``[N, tokens_per_frame, D]``, or None without frames — except
        when the tower is sharded (``encoder_group``) and another rank has frames: then a blank
        frame is encoded and ``[0, tokens_per_frame, D]`` of it returned, so every rank runs the
        tower's collectives, and at the same place in the backward (the caller uses the result
        exactly as it would real tokens)."""
        n = 0 if media_N_3_S_S is None else media_N_3_S_S.shape[0]
        if self.encoder_group is not None:
            anyone = torch.tensor(n, device=self.llm.tok_embeddings.weight.device)
            dist.all_reduce(anyone, op=dist.ReduceOp.MAX, group=self.encoder_group)
            if n == 0 and int(anyone) > 0:
                size = self.cfg.vision.image_size
                blank = torch.zeros(1, 3, size, size, dtype=dtype, device=anyone.device)
                return self.encode_media(blank)[:0]
        return self.encode_media(media_N_3_S_S.to(dtype)) if n else None

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
        if media_embeds_N_P_D is None:
            media_embeds_N_P_D = self._encode_local(media_N_3_S_S, h.dtype)
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
        if media_embeds_N_P_D is not None:  # (zero rows: a blank frame that keeps the tower in step)
            h = h.clone()
            h[slots] = media_embeds_N_P_D.reshape(-1, h.shape[-1]).to(h.dtype)
        return h

    def embed_sequence_parallel(
        self, tokens_B_T: torch.Tensor, media_N_3_S_S: torch.Tensor | None, sp
    ) -> torch.Tensor:
        """This SP rank's input embeddings ``[B, T/sp, D]`` by two-stage sharding
        (:mod:`cupola.toolkit.parallel.sequence.multimodal`): ``tokens`` are the whole rows,
        ``media`` only this rank's share of the batch's frames (``media_share(n_frames, sp.layout.size,
        sp.rank)``); the frames' visual tokens travel to the ranks holding their placeholders."""
        slots = tokens_B_T == self.cfg.media_token_id
        n_slots, per_frame = int(slots.sum()), self.cfg.tokens_per_frame
        if n_slots % per_frame:
            raise ValueError(
                f"the batch has {n_slots} media placeholders, not a multiple of tokens_per_frame ({per_frame})"
            )
        share = media_share(n_slots // per_frame, sp.layout.size, sp.rank)
        n_mine = 0 if media_N_3_S_S is None else media_N_3_S_S.shape[0]
        if n_mine != share.stop - share.start:
            raise ValueError(
                f"sequence-parallel rank {sp.rank} got {n_mine} frames but encodes frames {share.start}..{share.stop - 1} "
                f"of the batch's {n_slots // per_frame}: pass media[media_share(...)], not the whole batch's"
            )
        h = self.llm.embed(sp.shard(tokens_B_T))
        visual = self._encode_local(media_N_3_S_S, h.dtype)
        if n_slots == 0:  # no frames in these rows (a blank keeps the tower in step with other rows')
            return h if visual is None else h + 0.0 * visual.sum()
        mine = h.new_zeros(0, h.shape[-1]) if visual is None else visual.reshape(-1, h.shape[-1]).to(h.dtype)
        items_per_rank = (
            media_share(n_slots // per_frame, sp.layout.size, 0).stop * per_frame
        )  # rank 0's is full
        received = route_media_embeddings(mine, slots, items_per_rank, sp)
        h = h.clone()
        h[sp.shard(slots)] = received
        return h

    def forward(
        self,
        tokens_B_T: torch.Tensor,
        media_N_3_S_S: torch.Tensor | None = None,
        positions_B_T: torch.Tensor | None = None,
        document_ids_B_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]``. Under sequence parallelism (``llm.sp`` set by ``parallelize_vila``)
        the arguments are still whole rows — except ``media``, this rank's share of the frames (see
        :meth:`embed_sequence_parallel`) — and the logits are this rank's part ``[B, T/sp, vocab]``."""
        sp = self.llm.sp
        if sp is None:
            h = self.embed(tokens_B_T, media_N_3_S_S)
            return self.llm.forward_embeddings(h, positions_B_T, document_ids_B_T)
        h = self.embed_sequence_parallel(tokens_B_T, media_N_3_S_S, sp)
        positions, documents = (None if t is None else sp.shard(t) for t in (positions_B_T, document_ids_B_T))
        return self.llm.forward_embeddings(h, positions, documents)
