"""The causal building blocks of the video tokenizers (Cosmos Tokenizer, arXiv 2501.03575, §3.1).

Every operation is causal in time: frame ``t`` of an output depends on input frames ``<= t`` only.
Convolutions are factorized (a ``1 x k x k`` spatial conv, then a ``k x 1 x 1`` temporal conv whose
left padding repeats the first frame), normalisation is per frame (GroupNorm over ``C, H, W``),
attention is spatial (within a frame) and causal-temporal (each pixel over its past frames).

Streaming: every module takes an optional :class:`Stream`. Without one, the input is a whole video.
With one, the input is the next temporal chunk: temporal convolutions take their left context
from the frames the previous chunk left behind, temporal attention attends to the previous chunks'
keys and values, and the "first frame" rules (repeat the first frame, drop the padding frames)
apply to the first chunk only — so chunk-by-chunk equals the whole video, exactly (same sums), in
memory that does not grow with the video (but for the temporal attention caches, a few channels x
latent pixels per frame).

Layouts: ``x_B_C_T_H_W``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CausalConv3d",
    "Downsample",
    "FactorizedConv",
    "FrameNorm",
    "MidBlock",
    "Patcher",
    "ResBlock",
    "SpatialAttention",
    "Stage",
    "StageLayer",
    "Stream",
    "TemporalAttention",
    "Unpatcher",
    "Upsample",
]


class Stream:
    """The state a chunked (streaming) pass carries from one temporal chunk to the next."""

    def __init__(self) -> None:
        self.first = True
        self._state: dict[int, object] = {}

    def get(self, module: nn.Module, slot: str = "") -> object:
        return self._state.get((id(module), slot))

    def put(self, module: nn.Module, value: object, slot: str = "") -> None:
        self._state[(id(module), slot)] = value

    def next_chunk(self) -> None:
        """Call after each chunk has been through the whole network."""
        self.first = False


def with_history(
    x_B_C_T_H_W: torch.Tensor, n: int, stream: Stream | None, owner: nn.Module, slot: str = ""
) -> torch.Tensor:
    """``x`` with ``n`` frames of left context prepended: the previous chunk's last ``n`` frames, or
    (at the start of a video) the first frame repeated; the last ``n`` frames are kept for the next chunk."""
    if n == 0:
        return x_B_C_T_H_W
    history = None if stream is None else stream.get(owner, slot)
    if history is None:
        history = x_B_C_T_H_W[:, :, :1].expand(-1, -1, n, -1, -1)
    x = torch.cat([history, x_B_C_T_H_W], dim=2)
    if stream is not None:
        stream.put(owner, x[:, :, -n:], slot)
    return x


class CausalConv3d(nn.Conv3d):
    """A ``kt x kh x kw`` convolution, causal in time (``kt - 1`` frames of left context, see
    :func:`with_history`), zero-padded by ``padding`` in space."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int],
        *,
        stride: tuple[int, int, int] = (1, 1, 1),
        padding: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.spatial_padding = padding

    def forward(self, x_B_C_T_H_W: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        x = with_history(x_B_C_T_H_W, self.kernel_size[0] - 1, stream, self)
        if self.spatial_padding:
            p = self.spatial_padding
            x = F.pad(x, (p, p, p, p))
        return F.conv3d(x, self.weight, self.bias, self.stride)


class FactorizedConv(nn.Module):
    """``3 x 3`` in space, then ``3`` causal in time."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.spatial = CausalConv3d(in_channels, out_channels, (1, 3, 3), padding=1)
        self.temporal = CausalConv3d(out_channels, out_channels, (3, 1, 1))

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return self.temporal(self.spatial(x), stream)


class FrameNorm(nn.GroupNorm):
    """GroupNorm with one group over each frame's ``C, H, W`` (never across frames: causal)."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels, eps=1e-6, affine=True)

    def forward(self, x_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x_B_C_T_H_W.shape
        x = x_B_C_T_H_W.transpose(1, 2).reshape(B * T, C, H, W)
        x = F.group_norm(x, 1, self.weight, self.bias, self.eps)
        return x.view(B, T, C, H, W).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = FrameNorm(in_channels)
        self.conv1 = FactorizedConv(in_channels, out_channels)
        self.norm2 = FrameNorm(out_channels)
        self.conv2 = FactorizedConv(out_channels, out_channels)
        self.shortcut = (
            CausalConv3d(in_channels, out_channels, (1, 1, 1)) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), stream)
        h = self.conv2(F.silu(self.norm2(h)), stream)
        return h + (x if self.shortcut is None else self.shortcut(x))


class _Attention(nn.Module):
    """Single-head attention on the channels of a normalised input, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = FrameNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)


class SpatialAttention(_Attention):
    """Every pixel attends to every pixel of its own frame."""

    def forward(self, x_B_C_T_H_W: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        B, C, T, H, W = x_B_C_T_H_W.shape
        h = self.norm(x_B_C_T_H_W).permute(0, 2, 3, 4, 1).reshape(B * T, 1, H * W, C)
        out = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
        out = self.proj(out).view(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        return x_B_C_T_H_W + out


class TemporalAttention(_Attention):
    """Every pixel attends to itself in the current and earlier frames (causal). Streaming keeps
    the earlier chunks' keys and values."""

    def forward(self, x_B_C_T_H_W: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        B, C, T, H, W = x_B_C_T_H_W.shape
        h = self.norm(x_B_C_T_H_W).permute(0, 3, 4, 2, 1).reshape(B * H * W, 1, T, C)
        q, k, v = self.q(h), self.k(h), self.v(h)
        past = None if stream is None else stream.get(self)
        if past is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            n_past = 0
        else:
            n_past = past[0].shape[2]
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            keys = torch.arange(n_past + T, device=x_B_C_T_H_W.device)
            mask = keys[None, :] <= n_past + torch.arange(T, device=x_B_C_T_H_W.device)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if stream is not None:
            stream.put(self, (k, v))
        out = self.proj(out).view(B, H, W, T, C).permute(0, 4, 3, 1, 2)
        return x_B_C_T_H_W + out


class Downsample(nn.Module):
    """Halve ``H, W`` (a strided ``3 x 3`` conv plus a ``2 x 2`` average) and/or ``T`` (a strided causal
    ``3``-tap conv plus a causal 2-frame average: ``T = 2m + 1 -> m + 1``, frame 0 alone), then a
    ``1 x 1`` mix. A streamed chunk after the first must hold an even number of frames."""

    def __init__(self, channels: int, *, spatial: bool, temporal: bool) -> None:
        super().__init__()
        self.space = CausalConv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2)) if spatial else None
        self.time = CausalConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.mix = CausalConv3d(channels, channels, (1, 1, 1)) if spatial or temporal else None

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        if self.mix is None:
            return x
        if self.space is not None:
            x = F.pad(x, (0, 1, 0, 1))
            x = self.space(x) + F.avg_pool3d(x, (1, 2, 2), (1, 2, 2))
        if self.time is not None:
            pooled = F.avg_pool3d(with_history(x, 1, stream, self, "pool"), (2, 1, 1), (2, 1, 1))
            x = self.time(x, stream) + pooled
        return self.mix(x)


class Upsample(nn.Module):
    """Double ``T`` (each frame twice, the very first frame once: ``T -> 2T - 1``) and/or ``H, W``
    (nearest), each followed by a residual conv, then a ``1 x 1`` mix."""

    def __init__(self, channels: int, *, spatial: bool, temporal: bool) -> None:
        super().__init__()
        self.time = CausalConv3d(channels, channels, (3, 1, 1)) if temporal else None
        self.space = CausalConv3d(channels, channels, (1, 3, 3), padding=1) if spatial else None
        self.mix = CausalConv3d(channels, channels, (1, 1, 1)) if spatial or temporal else None

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        if self.mix is None:
            return x
        if self.time is not None:
            x = x.repeat_interleave(2, dim=2)
            if stream is None or stream.first:
                x = x[:, :, 1:]
            x = x + self.time(x, stream)
        if self.space is not None:
            x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
            x = x + self.space(x)
        return self.mix(x)


class StageLayer(nn.Module):
    """A residual block, then (at attention resolutions) spatial and causal temporal attention."""

    def __init__(self, in_channels: int, out_channels: int, attention: bool) -> None:
        super().__init__()
        self.res = ResBlock(in_channels, out_channels)
        self.space = SpatialAttention(out_channels) if attention else None
        self.time = TemporalAttention(out_channels) if attention else None

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        x = self.res(x, stream)
        if self.space is not None:
            x = self.time(self.space(x), stream)
        return x


class Stage(nn.Module):
    """``n`` layers from ``in_channels`` to ``out_channels``, then an optional resampling."""

    def __init__(
        self, in_channels: int, out_channels: int, n: int, attention: bool, resample: nn.Module | None
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            StageLayer(in_channels if i == 0 else out_channels, out_channels, attention) for i in range(n)
        )
        self.resample = resample

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, stream)
        return x if self.resample is None else self.resample(x, stream)


class MidBlock(nn.Module):
    """Residual block, spatial + causal temporal attention, residual block (the lowest resolution)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res0 = ResBlock(channels, channels)
        self.space = SpatialAttention(channels)
        self.time = TemporalAttention(channels)
        self.res1 = ResBlock(channels, channels)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        x = self.res0(x, stream)
        x = self.time(self.space(x), stream)
        return self.res1(x, stream)


# Haar analysis filters: low-pass (1, 1) / sqrt 2, high-pass (1, -1) / sqrt 2.
_HAAR = 1.0 / math.sqrt(2.0)


def _haar_split(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    even = x.narrow(dim, 0, x.shape[dim] // 2 * 2).unflatten(dim, (-1, 2))
    a, b = even.select(dim + 1, 0), even.select(dim + 1, 1)
    return (a + b) * _HAAR, (a - b) * _HAAR


def _haar_merge(low: torch.Tensor, high: torch.Tensor, dim: int) -> torch.Tensor:
    a, b = (low + high) * _HAAR, (low - high) * _HAAR
    return torch.stack([a, b], dim + 1).flatten(dim, dim + 1)


class Patcher(nn.Module):
    """Video → patches: ``log2(p)`` levels of the 3D Haar wavelet transform (``"haar"``; each level
    splits T, H and W into low/high halves: 8 sub-bands, channels x 8, divided by sqrt 8), or a plain
    space-to-depth rearrangement (``"rearrange"``). The first frame is repeated ``p`` times first,
    so ``1 + p k`` frames give ``1 + k`` patch frames, frame 0 alone in the first."""

    def __init__(self, patch_size: int, method: str) -> None:
        super().__init__()
        self.patch_size, self.method = patch_size, method

    def forward(self, x_B_C_T_H_W: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        p = self.patch_size
        x = x_B_C_T_H_W
        if stream is None or stream.first:
            x = torch.cat([x[:, :, :1].expand(-1, -1, p - 1, -1, -1), x], dim=2)
        if self.method == "rearrange":
            B, C, T, H, W = x.shape
            x = x.reshape(B, C, T // p, p, H // p, p, W // p, p)
            return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, C * p**3, T // p, H // p, W // p)
        for _ in range(int(math.log2(p))):
            # sub-band order: (time, height, width) each low then high, channel-major inside a band
            bands = [x]
            for dim in (2, 3, 4):
                bands = [half for band in bands for half in _haar_split(band, dim)]
            x = torch.cat(bands, dim=1) / math.sqrt(8.0)
        return x


class Unpatcher(nn.Module):
    """The inverse of :class:`Patcher` (drops the repeated first frames of the first chunk)."""

    def __init__(self, patch_size: int, method: str) -> None:
        super().__init__()
        self.patch_size, self.method = patch_size, method

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        p = self.patch_size
        if self.method == "rearrange":
            B, Cp, T, H, W = x.shape
            x = x.reshape(B, Cp // p**3, p, p, p, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
            x = x.reshape(B, Cp // p**3, T * p, H * p, W * p)
        else:
            for _ in range(int(math.log2(p))):
                x = x * math.sqrt(8.0)
                bands = list(x.chunk(8, dim=1))
                for dim in (4, 3, 2):  # undo width, then height, then time
                    bands = [_haar_merge(bands[i], bands[i + 1], dim) for i in range(0, len(bands), 2)]
                x = bands[0]
        if stream is None or stream.first:
            x = x[:, :, p - 1 :]
        return x
