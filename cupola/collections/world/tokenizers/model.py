"""Causal video tokenizers (Cosmos Tokenizer, arXiv 2501.03575): continuous (CV, a 16-channel latent)
and discrete (DV, FSQ codes) encoder–decoders on a Haar-wavelet input.

    x_B_3_T_H_W in [-1, 1], T = 1 + t*k
      --Haar patcher (p=4)-->  [B, 3*64, 1 + (T-1)/4, H/4, W/4]
      --encoder: factorized causal convs, residual stages with spatial/temporal downsampling,
                 spatial + causal temporal attention at the lowest resolution-->
      z_B_C_t_h_w   t = 1 + (T-1)/t_ratio, h = H/s_ratio, w = W/s_ratio
      (DV: C = 6 channels rounded by FSQ levels [8, 8, 8, 5, 5, 5] -> indices_B_t_h_w in [0, 64000))
      --decoder (the mirror, nearest-neighbour upsampling)-->  [B, 3, T, H, W]

Causal in time: latent frame ``j`` depends on input frames up to ``j * t_ratio`` only, and frame 0
is encoded alone — so an image (``T = 1``) and a video share one tokenizer, and a video's prefix
encodes the same whatever follows (:mod:`~cupola.collections.world.tokenizers.chunked` uses that
to encode and decode long videos in chunks, exactly).

The module tree maps one to one onto Hugging Face diffusers' ``AutoencoderKLCosmos``
(:mod:`~cupola.collections.world.tokenizers.convert`), so its checkpoints load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cupola.collections.world.tokenizers.layers import (
    CausalConv3d,
    Downsample,
    FactorizedConv,
    FrameNorm,
    MidBlock,
    Patcher,
    Stage,
    Stream,
    Unpatcher,
    Upsample,
)
from cupola.toolkit.config import ConfigError, check_choice, config_error, suggest
from cupola.toolkit.modules.fsq import FSQ

__all__ = ["TOKENIZER_FLAVORS", "TokenizerConfig", "VideoTokenizer", "tokenizer_config"]

PATCH_METHODS = ("haar", "rearrange")


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    temporal_compression: int  # frames per latent frame (after the first); 1 for image tokenizers
    spatial_compression: int  # pixels per latent pixel along H and W
    latent_channels: int = 16  # the continuous latent (CV), or the encoder's output before FSQ (DV)
    fsq_levels: tuple[int, ...] | None = None  # set: discrete (DV/DI) tokenizer with these FSQ levels
    encoder_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_channels: tuple[int, ...] = (256, 512, 512, 512)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32,)
    resolution: int = 1024  # the nominal input size attention_resolutions are counted from
    patch_size: int = 4
    patch_method: str = "haar"
    extra: dict = field(default_factory=dict)  # provenance (e.g. the HF config it came from)

    @property
    def discrete(self) -> bool:
        return self.fsq_levels is not None

    @property
    def image_only(self) -> bool:
        return self.temporal_compression == 1

    @property
    def spatial_levels(self) -> int:
        return int(math.log2(self.spatial_compression)) - int(math.log2(self.patch_size))

    @property
    def temporal_levels(self) -> int:
        return max(0, int(math.log2(max(self.temporal_compression, 1))) - int(math.log2(self.patch_size)))

    def validate(self) -> None:
        check_choice(self, "patch_method", self.patch_method, PATCH_METHODS)
        p = self.patch_size
        if p < 1 or p & (p - 1):
            raise config_error(self, "patch_size", p, "must be a power of two")
        for name in ("spatial_compression", "temporal_compression"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise config_error(self, name, v, "must be a power of two (4, 8, 16; temporal 1 for images)")
        if self.spatial_compression < p:
            raise config_error(
                self, "spatial_compression", self.spatial_compression, f"must be >= patch_size={p}"
            )
        if self.temporal_compression not in (1,) and self.temporal_compression < p:
            raise config_error(
                self,
                "temporal_compression",
                self.temporal_compression,
                f"must be >= patch_size={p} for video (1: an image tokenizer)",
            )
        resampling = len(self.encoder_channels) - 2
        if max(self.spatial_levels, self.temporal_levels) > resampling:
            raise config_error(
                self,
                "encoder_channels",
                self.encoder_channels,
                f"{resampling} resampling stages cannot give {self.spatial_compression}x spatial / "
                f"{self.temporal_compression}x temporal compression after the {p}x patcher: add stages",
            )
        if len(self.decoder_channels) != len(self.encoder_channels):
            raise config_error(
                self,
                "decoder_channels",
                self.decoder_channels,
                "must have as many stages as encoder_channels",
            )
        if self.fsq_levels is not None and (
            not self.fsq_levels or any(not isinstance(n, int) or n < 2 for n in self.fsq_levels)
        ):
            raise config_error(
                self, "fsq_levels", self.fsq_levels, "must be integers >= 2, e.g. [8, 8, 8, 5, 5, 5]"
            )


def _video(t: int, s: int, **kw) -> TokenizerConfig:
    return TokenizerConfig(temporal_compression=t, spatial_compression=s, **kw)


_DV = {"fsq_levels": (8, 8, 8, 5, 5, 5)}
_IMAGE = {"temporal_compression": 1}
# Sizes of NVIDIA's Cosmos-Tokenizer / Cosmos-1.0 tokenizers (github.com/NVIDIA/Cosmos-Tokenizer,
# cosmos_tokenizer/networks/configs.py; diffusers' AutoencoderKLCosmos defaults): channels 128 with
# multipliers [2, 4, 4], 2 residual blocks, attention at resolution 32 of 1024, Haar patch 4,
# 16 latent channels (CV) / FSQ [8, 8, 8, 5, 5, 5] (DV).
TOKENIZER_FLAVORS: dict[str, TokenizerConfig] = {
    "cv4x8x8": _video(4, 8),
    "cv8x8x8": _video(8, 8),
    "cv8x16x16": _video(8, 16),
    "dv4x8x8": _video(4, 8, **_DV),
    "dv8x8x8": _video(8, 8, **_DV),
    "dv8x16x16": _video(8, 16, **_DV),
    "ci8x8": TokenizerConfig(spatial_compression=8, **_IMAGE),
    "di16x16": TokenizerConfig(spatial_compression=16, **_DV, **_IMAGE),
    # CPU-sized, the same structure: 4x8x8 (continuous) and its discrete twin
    "tiny": _video(
        4,
        8,
        latent_channels=4,
        encoder_channels=(16, 32, 32, 32),
        decoder_channels=(16, 32, 32, 32),
        num_res_blocks=1,
        resolution=64,
        attention_resolutions=(16,),
    ),
    "tiny_dv": _video(
        4,
        8,
        latent_channels=4,
        fsq_levels=(5, 5, 5),
        encoder_channels=(16, 32, 32, 32),
        decoder_channels=(16, 32, 32, 32),
        num_res_blocks=1,
        resolution=64,
        attention_resolutions=(16,),
    ),
}


def tokenizer_config(flavor: str, **overrides: object) -> TokenizerConfig:
    """A validated copy of ``TOKENIZER_FLAVORS[flavor]`` with ``overrides`` applied."""
    if flavor not in TOKENIZER_FLAVORS:
        raise ConfigError(
            f"unknown tokenizer flavor {flavor!r}; choose one of {sorted(TOKENIZER_FLAVORS)}."
            f"{suggest(flavor, TOKENIZER_FLAVORS)}"
        )
    cfg = dataclasses.replace(TOKENIZER_FLAVORS[flavor], **overrides)
    cfg.validate()
    return cfg


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig, out_channels: int) -> None:
        super().__init__()
        ch = cfg.encoder_channels
        self.patcher = Patcher(cfg.patch_size, cfg.patch_method)
        self.stem = FactorizedConv(3 * cfg.patch_size**3, ch[0])
        resolution = cfg.resolution // cfg.patch_size
        stages = []
        for i in range(len(ch) - 1):
            resample = None
            if i < len(ch) - 2:
                resample = Downsample(
                    ch[i + 1], spatial=i < cfg.spatial_levels, temporal=i < cfg.temporal_levels
                )
            stages.append(
                Stage(ch[i], ch[i + 1], cfg.num_res_blocks, resolution in cfg.attention_resolutions, resample)
            )
            if resample is not None:
                resolution //= 2
        self.stages = nn.ModuleList(stages)
        self.mid = MidBlock(ch[-1])
        self.norm_out = FrameNorm(ch[-1])
        self.head = FactorizedConv(ch[-1], out_channels)

    def forward(self, x_B_3_T_H_W: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        h = self.stem(self.patcher(x_B_3_T_H_W, stream), stream)
        for stage in self.stages:
            h = stage(h, stream)
        h = self.mid(h, stream)
        return self.head(F.silu(self.norm_out(h)), stream)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig, in_channels: int) -> None:
        super().__init__()
        ch = list(reversed(cfg.decoder_channels))
        self.stem = FactorizedConv(in_channels, ch[0])
        self.mid = MidBlock(ch[0])
        n_resample = len(ch) - 2
        resolution = cfg.resolution // cfg.patch_size // 2**n_resample
        s_levels, t_levels = cfg.spatial_levels, cfg.temporal_levels
        stages = []
        for i in range(len(ch) - 1):
            resample = None
            if i < n_resample:
                # temporal doubling from the second stage on; spatial with it, and earlier where
                # there are more spatial than temporal levels
                temporal = 0 < i < t_levels + 1
                spatial = temporal or (i < s_levels and s_levels > t_levels)
                resample = Upsample(ch[i + 1], spatial=spatial, temporal=temporal)
            stages.append(
                Stage(
                    ch[i],
                    ch[i + 1],
                    cfg.num_res_blocks + 1,
                    resolution in cfg.attention_resolutions,
                    resample,
                )
            )
            if resample is not None:
                resolution *= 2
        self.stages = nn.ModuleList(stages)
        self.norm_out = FrameNorm(ch[-1])
        self.head = FactorizedConv(ch[-1], 3 * cfg.patch_size**3)
        self.unpatcher = Unpatcher(cfg.patch_size, cfg.patch_method)

    def forward(self, z: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        h = self.mid(self.stem(z, stream), stream)
        for stage in self.stages:
            h = stage(h, stream)
        return self.unpatcher(self.head(F.silu(self.norm_out(h)), stream), stream)


class VideoTokenizer(nn.Module):
    """``encode``: video ``[B, 3, T, H, W]`` in [-1, 1] → latent ``[B, C, t, h, w]`` (CV) or, for DV,
    ``(codes [B, d, t, h, w] in [-1, 1], indices [B, t, h, w])``; ``decode``: back to pixels.
    ``forward``: the reconstruction (training)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        code = len(cfg.fsq_levels) if cfg.discrete else cfg.latent_channels
        self.encoder = Encoder(cfg, cfg.latent_channels)
        self.quant = CausalConv3d(cfg.latent_channels, code, (1, 1, 1))
        self.fsq = FSQ(cfg.fsq_levels) if cfg.discrete else None
        self.post_quant = CausalConv3d(code, cfg.latent_channels, (1, 1, 1))
        self.decoder = Decoder(cfg, cfg.latent_channels)

    def check_input(self, x_B_3_T_H_W: torch.Tensor, *, first: bool = True) -> None:
        """Raise a clear error unless ``x`` is ``[B, 3, T, H, W]`` with ``T = 1 + t_ratio k`` (a
        first chunk / whole video; later chunks: a multiple of t_ratio) and ``H, W`` multiples of
        the spatial compression."""
        cfg = self.cfg
        if x_B_3_T_H_W.ndim != 5 or x_B_3_T_H_W.shape[1] != 3:
            raise ValueError(f"expected a video [B, 3, T, H, W] in [-1, 1]; got {list(x_B_3_T_H_W.shape)}")
        T, H, W = x_B_3_T_H_W.shape[2:]
        t = cfg.temporal_compression
        if cfg.image_only and T != 1:
            raise ValueError(f"an image tokenizer takes T = 1 frame; got {T} (encode frames as a batch)")
        if first and (T - 1) % t:
            valid = ", ".join(str(1 + t * k) for k in range(4))
            raise ValueError(
                f"{T} frames: a {t}x temporal tokenizer takes 1 + {t}k frames ({valid}, ...); trim the video "
                f"to {1 + (T - 1) // t * t} or pad it to {1 + -(-(T - 1) // t) * t} (repeat the last frame)"
            )
        if not first and T % t:
            raise ValueError(f"a chunk after the first must hold a multiple of {t} frames; got {T}")
        s = cfg.spatial_compression
        if H % s or W % s:
            raise ValueError(
                f"frame size {H}x{W} is not a multiple of the {s}x spatial compression; resize or crop to "
                f"{H // s * s}x{W // s * s} (or pad)"
            )

    def encode_latent(self, x_B_3_T_H_W: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """The latent before quantization (CV: the latent itself)."""
        self.check_input(x_B_3_T_H_W, first=stream is None or stream.first)
        return self.quant(self.encoder(x_B_3_T_H_W, stream))

    def quantize(self, z: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """CV: ``z``; DV: ``(codes, indices)`` by FSQ."""
        return z if self.fsq is None else self.fsq(z)

    def encode(
        self, x_B_3_T_H_W: torch.Tensor, stream: Stream | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The latent of a video (CV), or ``(codes, indices)`` (DV)."""
        return self.quantize(self.encode_latent(x_B_3_T_H_W, stream))

    def decode(self, z_B_C_t_h_w: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` (about [-1, 1]) from a latent (CV) or codes (DV)."""
        return self.decoder(self.post_quant(z_B_C_t_h_w), stream)

    def decode_indices(self, indices_B_t_h_w: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """Pixels from FSQ indices (DV only)."""
        if self.fsq is None:
            raise ValueError("decode_indices: this is a continuous tokenizer (no FSQ); use decode(latent)")
        dtype = self.post_quant.weight.dtype
        return self.decode(self.fsq.indices_to_codes(indices_B_t_h_w, dtype), stream)

    def forward(self, x_B_3_T_H_W: torch.Tensor) -> torch.Tensor:
        z = self.encode(x_B_3_T_H_W)
        return self.decode(z if self.fsq is None else z[0])

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        t, s = self.cfg.temporal_compression, self.cfg.spatial_compression
        return (1 + (T - 1) // t if t > 1 else T, H // s, W // s)
