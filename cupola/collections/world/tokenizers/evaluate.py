"""Tokenizer evaluation: reconstruct clips of a set of videos and score them with torchmetrics' PSNR
and SSIM (data range [-1, 1]); a side-by-side PNG (input row over reconstruction row) and MP4 of
the first clip beside the numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cupola.collections.world.tokenizers.chunked import decode_video, encode_video
from cupola.collections.world.tokenizers.model import VideoTokenizer

__all__ = ["evaluate_tokenizer", "save_evaluation"]


@torch.no_grad()
def evaluate_tokenizer(
    model: VideoTokenizer,
    videos: str | Path,
    *,
    num_frames: int = 17,
    size: int = 256,
    max_videos: int | None = None,
    chunk_frames: int | None = None,
    tile: int | None = None,
    tile_overlap: int = 0,
) -> dict[str, Any]:
    """Per-video and mean PSNR (dB) / SSIM of the centre clip (``num_frames`` x ``size`` x ``size``) of
    each video; ``results["example"]`` holds the first clip and its reconstruction (uint8)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from cupola.collections.world.data.clips import VideoClipDataset

    dataset = VideoClipDataset(str(videos), num_frames=num_frames, size=size, train=False)
    n = len(dataset) if max_videos is None else min(max_videos, len(dataset))
    if n == 0:
        raise ValueError(f"{videos}: no video to evaluate")
    first = next(model.parameters())
    rows, example = [], None
    for i in range(n):
        item = dataset[i]
        x = item["video"][None].to(first.device, first.dtype)
        z = encode_video(model, x, chunk_frames=chunk_frames, tile=tile, tile_overlap=tile_overlap)
        y = decode_video(model, z[0] if isinstance(z, tuple) else z, tile=tile, tile_overlap=tile_overlap)
        xf = x.float().transpose(1, 2).flatten(0, 1)  # frames as images [T, 3, H, W]
        yf = y.float().clamp(-1, 1).transpose(1, 2).flatten(0, 1)
        rows.append(
            {
                "id": item["id"],
                "psnr": float(peak_signal_noise_ratio(yf, xf, data_range=2.0)),
                "ssim": float(structural_similarity_index_measure(yf, xf, data_range=2.0)),
            }
        )
        if example is None:
            example = (_uint8(x), _uint8(y))
    cfg = model.cfg
    return {
        "tokenizer": f"{'DV' if cfg.discrete else 'CV'}{cfg.temporal_compression}x{cfg.spatial_compression}x{cfg.spatial_compression}",
        "clip": {"frames": num_frames, "size": size},
        "videos": len(rows),
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "per_video": rows,
        "example": example,
    }


def _uint8(x_B_3_T_H_W: torch.Tensor) -> np.ndarray:
    return (
        ((x_B_3_T_H_W[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    )


def save_evaluation(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``side_by_side.png`` (up to 8 frames: input above, reconstruction below) and
    ``side_by_side.mp4`` (input left, reconstruction right) in ``out_dir``."""
    from PIL import Image

    from cupola.toolkit.data.video import write_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in results.items() if k != "example"}
    (out / "results.json").write_text(json.dumps(data, indent=2))
    paths = {"json": out / "results.json"}
    if results.get("example") is not None:
        x, y = results["example"]
        picks = np.linspace(0, len(x) - 1, min(8, len(x))).round().astype(int)
        grid = np.concatenate([np.concatenate(list(x[picks]), 1), np.concatenate(list(y[picks]), 1)], 0)
        Image.fromarray(grid).save(out / "side_by_side.png")
        paths["png"] = out / "side_by_side.png"
        paths["mp4"] = write_video(out / "side_by_side.mp4", np.concatenate([x, y], axis=2), fps=8.0)
    return paths
