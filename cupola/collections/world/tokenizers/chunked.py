"""Encode and decode long and large videos in bounded memory.

**Temporal chunks** (exact). The tokenizer is causal, so a video can pass through it chunk by chunk
with a :class:`~cupola.collections.world.tokenizers.layers.Stream` carrying each temporal
convolution's last frames and each temporal attention's keys/values to the next chunk: the result
equals the one-shot encode/decode (the same sums; float64 agrees to rounding), while activations
are those of one chunk. Chunks follow the compression: ``1 + t*k`` frames first, then ``t*k``
(``chunk_frames`` is rounded down to that); when decoding, any number of latent frames per chunk.

**Spatial tiles** (approximate). Frames larger than ``tile`` are cut into overlapping tiles (a
multiple of the spatial compression), each streamed on its own; the overlaps are blended with
linear ramps (latents when encoding, pixels when decoding). Spatial attention and per-frame
normalisation see a tile, not the frame, so tiles differ from one-shot by a little near their
borders; a tile as large as the frame gives the one-shot result exactly. For discrete tokenizers
the pre-quantization latent is blended and quantized once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cupola.collections.world.tokenizers.layers import Stream
from cupola.collections.world.tokenizers.model import VideoTokenizer

__all__ = ["decode_video", "encode_video"]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if tile >= size:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    return [*starts, size - tile]


def _ramp(n: int, lead: int, trail: int, device, dtype) -> torch.Tensor:
    """Weights over ``n`` positions rising over the first ``lead`` and falling over the last ``trail``."""
    w = torch.ones(n, device=device, dtype=dtype)
    if lead:
        w[:lead] = torch.arange(1, lead + 1, device=device, dtype=dtype) / (lead + 1)
    if trail:
        w[n - trail :] = torch.minimum(
            w[n - trail :], torch.arange(trail, 0, -1, device=device, dtype=dtype) / (trail + 1)
        )
    return w


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int | None,
    overlap: int,
    scale: float,
) -> torch.Tensor:
    """``fn`` over overlapping spatial tiles of ``x`` (``[B, C, T, H, W]``), blended: the output grid
    is ``scale`` times the input's (1/s when encoding, s when decoding)."""
    H, W = x.shape[-2:]
    if tile is None or (tile >= H and tile >= W):
        return fn(x)
    out = weight = None
    rows, cols = _starts(H, tile, overlap), _starts(W, tile, overlap)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            th, tw = min(tile, H), min(tile, W)
            y = fn(x[..., r : r + th, c : c + tw])
            if out is None:
                shape = (*y.shape[:-2], round(H * scale), round(W * scale))
                out = y.new_zeros(shape, device=x.device)
                weight = y.new_zeros(shape[-2:], device=x.device)
            oy, ox = round(r * scale), round(c * scale)
            lead_r = round(overlap * scale) if i > 0 else 0
            trail_r = round(overlap * scale) if i < len(rows) - 1 else 0
            lead_c = round(overlap * scale) if j > 0 else 0
            trail_c = round(overlap * scale) if j < len(cols) - 1 else 0
            w = _ramp(y.shape[-2], lead_r, trail_r, x.device, y.dtype)[:, None] * _ramp(
                y.shape[-1], lead_c, trail_c, x.device, y.dtype
            )
            out[..., oy : oy + y.shape[-2], ox : ox + y.shape[-1]] += y * w
            weight[oy : oy + y.shape[-2], ox : ox + y.shape[-1]] += w
    return out / weight


def _check_tile(model: VideoTokenizer, tile: int | None, overlap: int, unit: int) -> None:
    if tile is None:
        return
    if tile <= 0 or tile % unit or overlap < 0 or overlap % unit or overlap >= tile:
        raise ValueError(
            f"tile={tile}, tile_overlap={overlap}: both must be multiples of {unit} "
            f"(the {model.cfg.spatial_compression}x spatial compression) with 0 <= overlap < tile"
        )


@torch.no_grad()
def encode_video(
    model: VideoTokenizer,
    x_B_3_T_H_W: torch.Tensor,
    *,
    chunk_frames: int | None = None,
    tile: int | None = None,
    tile_overlap: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The latent (CV) or ``(codes, indices)`` (DV) of a whole video, computed ``chunk_frames`` frames
    at a time (default: all at once) and, for frames larger than ``tile`` pixels, tile by tile.
    ``progress(done, total)`` is called after each chunk of each tile.

    The model runs on its own device; ``x`` may live elsewhere (a long video in host memory, even as
    ``uint8`` pixels in [0, 255]): each chunk is moved and converted on its way in, and the result
    is returned on ``x``'s device — so GPU memory holds one chunk, not the video."""
    cfg = model.cfg
    t, s = cfg.temporal_compression, cfg.spatial_compression
    model.check_input(x_B_3_T_H_W)
    _check_tile(model, tile, tile_overlap, s)
    T = x_B_3_T_H_W.shape[2]
    if chunk_frames is None or chunk_frames >= T or cfg.image_only:
        bounds = [(0, T)]
    else:
        per = max(t, chunk_frames // t * t)
        bounds = [(0, min(T, 1 + per))]
        while bounds[-1][1] < T:
            bounds.append((bounds[-1][1], min(T, bounds[-1][1] + per)))
    tick = _ticker(progress, len(bounds) * _n_tiles(x_B_3_T_H_W, tile, tile_overlap))

    param = next(model.parameters())

    def encode_tile(x: torch.Tensor) -> torch.Tensor:
        stream, parts = Stream(), []
        for a, b in bounds:
            chunk = x[:, :, a:b].to(param.device, non_blocking=True)
            if chunk.dtype == torch.uint8:  # [0, 255] pixels, converted a chunk at a time
                chunk = chunk.to(param.dtype) / 127.5 - 1.0
            parts.append(model.encode_latent(chunk, stream).to(x.device))
            stream.next_chunk()
            tick()
        return torch.cat(parts, dim=2)

    z = _tiled(encode_tile, x_B_3_T_H_W, tile, tile_overlap, 1 / s)
    return model.quantize(z)


@torch.no_grad()
def decode_video(
    model: VideoTokenizer,
    z_B_C_t_h_w: torch.Tensor,
    *,
    chunk_latents: int | None = None,
    tile: int | None = None,
    tile_overlap: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Pixels ``[B, 3, T, H, W]`` from a latent (CV) or codes (DV), ``chunk_latents`` latent frames at
    a time (default: all at once); ``tile``/``tile_overlap`` in output pixels. The pixels are
    returned on ``z``'s device (pass a latent in host memory to keep a long video off the GPU)."""
    s = model.cfg.spatial_compression
    _check_tile(model, tile, tile_overlap, s)
    n = z_B_C_t_h_w.shape[2]
    per = n if chunk_latents is None else max(1, chunk_latents)
    bounds = [(a, min(n, a + per)) for a in range(0, n, per)]
    latent_tile = None if tile is None else tile // s
    tick = _ticker(progress, len(bounds) * _n_tiles(z_B_C_t_h_w, latent_tile, tile_overlap // s))

    param = next(model.parameters())

    def decode_tile(z: torch.Tensor) -> torch.Tensor:
        stream, parts = Stream(), []
        for a, b in bounds:
            chunk = z[:, :, a:b].to(param.device, param.dtype, non_blocking=True)
            parts.append(model.decode(chunk, stream).to(z.device))
            stream.next_chunk()
            tick()
        return torch.cat(parts, dim=2)

    return _tiled(decode_tile, z_B_C_t_h_w, latent_tile, tile_overlap // s, float(s))


def _n_tiles(x: torch.Tensor, tile: int | None, overlap: int) -> int:
    if tile is None:
        return 1
    return len(_starts(x.shape[-2], tile, overlap)) * len(_starts(x.shape[-1], tile, overlap))


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    return tick
