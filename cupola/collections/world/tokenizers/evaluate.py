"""Tokenizer evaluation: reconstruct clips of a set of videos and score them with torchmetrics' PSNR
and SSIM (data range [-1, 1]) and, given a local I3D, rFVD (the Fréchet distance between I3D
features of the inputs and of the reconstructions, computed by torchmetrics' Fréchet code with the
I3D as its feature network); a side-by-side PNG (input row over reconstruction row) and MP4 of
the first clip beside the numbers.

I3D: a TorchScript file following the convention of the FVD implementations that match the
original TensorFlow FVD (StyleGAN-V's ``i3d_torchscript.pt``): called as
``detector(videos, rescale=False, resize=False, return_features=True)`` on ``[N, 3, T, 224, 224]``
in [-1, 1] (cupola resizes the frames to 224 x 224 first). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cupola.collections.world.tokenizers.chunked import decode_video, encode_video
from cupola.collections.world.tokenizers.model import VideoTokenizer

__all__ = ["I3DFeatures", "evaluate_tokenizer", "save_evaluation"]


class I3DFeatures(torch.nn.Module):
    """A local TorchScript I3D as a feature network: videos ``[N, 3, T, H, W]`` in [-1, 1] → ``[N, F]``."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"I3D weights {path} not found: rFVD needs a local TorchScript I3D (e.g. StyleGAN-V's "
                "i3d_torchscript.pt), fetched beforehand; cupola never downloads"
            )
        self.net = torch.jit.load(str(path), map_location=device).eval()
        probe = torch.zeros(1, 3, 16, 224, 224, device=device)
        self.num_features = int(self.forward(probe).shape[-1])

    @torch.no_grad()
    def forward(self, videos_N_3_T_H_W: torch.Tensor) -> torch.Tensor:
        x = videos_N_3_T_H_W.float()
        if x.shape[-2:] != (224, 224):
            N, C, T = x.shape[:3]
            frames = x.transpose(1, 2).flatten(0, 1)
            frames = torch.nn.functional.interpolate(
                frames, size=(224, 224), mode="bilinear", align_corners=False
            )
            x = frames.view(N, T, C, 224, 224).transpose(1, 2)
        return self.net(x, rescale=False, resize=False, return_features=True)


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
    i3d: str | Path | None = None,
) -> dict[str, Any]:
    """Per-video and mean PSNR (dB) / SSIM of the centre clip (``num_frames`` x ``size`` x ``size``) of
    each video, and rFVD over all of them when ``i3d`` names a local TorchScript I3D;
    ``results["example"]`` holds the first clip and its reconstruction (uint8)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from cupola.collections.world.data.clips import VideoClipDataset

    dataset = VideoClipDataset(str(videos), num_frames=num_frames, size=size, train=False)
    n = len(dataset) if max_videos is None else min(max_videos, len(dataset))
    if n == 0:
        raise ValueError(f"{videos}: no video to evaluate")
    first = next(model.parameters())
    fvd = None
    if i3d is not None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if n < 2:
            raise ValueError(f"rFVD compares feature distributions: give at least 2 videos (got {n})")
        fvd = FrechetInceptionDistance(feature=I3DFeatures(i3d, first.device)).to(first.device)
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
        if fvd is not None:
            fvd.update(x.float(), real=True)
            fvd.update(y.float().clamp(-1, 1), real=False)
        if example is None:
            example = (_uint8(x), _uint8(y))
    cfg = model.cfg
    return {
        "tokenizer": f"{'DV' if cfg.discrete else 'CV'}{cfg.temporal_compression}x{cfg.spatial_compression}x{cfg.spatial_compression}",
        "clip": {"frames": num_frames, "size": size},
        "videos": len(rows),
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "rfvd": None if fvd is None else float(fvd.compute()),
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
