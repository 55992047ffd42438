"""Generation with a trained diffusion world model: load a run, sample latents (Text2World, or
continuing given frames, with actions or cameras), decode them in bounded memory, write MP4 + GIF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cupola.collections.world.diffusion.model import Conditioning, DiffusionWFM, WFMConfig
from cupola.toolkit.config import ConfigError

__all__ = ["WorldModel", "load_wfm", "write_preview"]


@dataclass
class WorldModel:
    """A trained diffusion WFM with its frozen tokenizer (and T5 encoder), ready to generate."""

    model: DiffusionWFM
    tokenizer: torch.nn.Module
    t5: object | None = None

    @property
    def cfg(self) -> WFMConfig:
        return self.model.cfg

    @property
    def fps(self) -> float | None:
        """The frame rate the model was trained at (None: trained without one)."""
        fps = float(self.model.train_fps)
        return fps if np.isfinite(fps) else None

    def _pixels(self, frames_T_H_W_3: np.ndarray) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(frames_T_H_W_3)).to(device).float() / 127.5 - 1
        return x.permute(3, 0, 1, 2)[None]  # [1, 3, T, H, W]

    @torch.no_grad()
    def generate(
        self,
        prompt: str = "",
        *,
        frames: int = 9,
        size: tuple[int, int] = (32, 32),
        first_frames: np.ndarray | None = None,
        actions: np.ndarray | None = None,
        cameras: tuple[np.ndarray, np.ndarray] | None = None,
        fps: float | None = None,
        steps: int = 35,
        guidance: float = 1.0,
        sampler: str = "multistep",
        seed: int = 0,
        chunk_latents: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """``uint8 [frames, H, W, 3]``. ``first_frames``: ``uint8 [n, H, W, 3]`` given frames (Video2World
        models; the first ``1 + t (cond_frames - 1)`` are used). ``actions``: ``[frames - 1, action_dim]``.
        ``cameras``: ``(intrinsics [3, 3], cam_to_world [frames, 4, 4])``. ``fps``: the clip's frame rate
        for fps-aware models (default: the rate the model was trained at). ``guidance`` > 1 uses
        classifier-free guidance against the empty prompt. Same seed, same video."""
        cfg, tok = self.cfg, self.tokenizer
        t, s = tok.cfg.temporal_compression, tok.cfg.spatial_compression
        if (frames - 1) % t or size[0] % s or size[1] % s:
            raise ValueError(
                f"frames={frames}, size={size}: need 1 + {t}k frames and sizes that are multiples of {s}"
            )
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        lat_t, lat_h, lat_w = tok.latent_shape(frames, *size)
        scale = float(self.model.latent_scale)
        if not np.isfinite(scale):
            raise ValueError("this model has no measured latent_scale: it was never trained")
        fps = self.fps if fps is None else fps
        batch: dict[str, object] = {}
        cond_latents = None
        if cfg.cond_frames:
            need = 1 + t * (cfg.cond_frames - 1)
            if first_frames is None or len(first_frames) < need:
                raise ValueError(
                    f"this Video2World model continues {need} given frame(s): pass first_frames (--video)"
                )
            given = first_frames[:need]
            if given.shape[1:3] != tuple(size):
                raise ValueError(
                    f"first frames are {given.shape[1]}x{given.shape[2]}, size is {size[0]}x{size[1]}"
                )
            z = tok.encode_latent(self._pixels(given)) * scale
            cond_latents = torch.zeros(1, z.shape[1], lat_t, lat_h, lat_w, device=device)
            cond_latents[:, :, : z.shape[2]] = z
        if cfg.dit.action_dim:
            if actions is None or tuple(actions.shape) != (frames - 1, cfg.dit.action_dim):
                got = None if actions is None else tuple(actions.shape)
                raise ValueError(
                    f"this model is action-conditioned: pass actions of shape ({frames - 1}, {cfg.dit.action_dim}) "
                    f"(one per frame transition); got {got}"
                )
        if cfg.dit.camera:
            if cameras is None:
                raise ValueError("this model is camera-conditioned: pass cameras=(intrinsics, cam_to_world)")
            batch["intrinsics"] = torch.as_tensor(cameras[0], dtype=torch.float32, device=device)[None]
            batch["cam_to_world"] = torch.as_tensor(cameras[1], dtype=torch.float32, device=device)[None]

        def conditioning(text: str) -> Conditioning:
            context, mask = self.model.encode_text([text], self.t5)
            c = Conditioning(
                context=context,
                context_mask=mask,
                cond_latents=cond_latents,
                cond_frames=cfg.cond_frames,
                actions=None
                if actions is None
                else torch.as_tensor(actions, dtype=dtype, device=device)[None],
                fps=None if fps is None else torch.tensor([float(fps)], device=device),
            )
            if cfg.dit.camera:
                from cupola.collections.world.diffusion.lightning import camera_rays

                c.plucker = camera_rays(batch, lat_t, lat_h, lat_w, t, s).to(dtype)
            return c

        generator = torch.Generator(device=device).manual_seed(seed)
        latents = self.model.generate(
            (1, cfg.dit.latent_channels, lat_t, lat_h, lat_w),
            conditioning(prompt),
            uncond=conditioning("") if guidance != 1.0 else None,
            guidance=guidance,
            steps=steps,
            sampler=sampler,
            generator=generator,
            callback=progress,
        )
        from cupola.collections.world.tokenizers.chunked import decode_video

        pixels = decode_video(
            tok, (latents / scale).to(next(tok.parameters()).dtype), chunk_latents=chunk_latents
        )
        return ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def load_wfm(
    path: str | Path, device: str | torch.device = "cpu", *, tokenizer: str | None = None
) -> WorldModel:
    """A diffusion WFM run (its newest checkpoint) or checkpoint folder, LoRA merged, in eval mode, with
    the tokenizer it was trained with (or ``tokenizer``: a run/checkpoint/diffusers folder)."""
    from omegaconf import OmegaConf

    from cupola.collections.llm.lightning import run_checkpoint
    from cupola.collections.world.tokenizers.checkpoint import load_tokenizer
    from cupola.toolkit.config import from_dict
    from cupola.toolkit.modules.lora import merge_lora_weights
    from cupola.toolkit.training.checkpoint import load_model_weights

    ckpt = run_checkpoint(str(path))
    if ckpt is None:
        raise FileNotFoundError(
            f"{path}: not a cupola diffusion run or checkpoint folder (no checkpoint in it)"
        )
    config = OmegaConf.to_container(OmegaConf.load(ckpt.parent.parent / "config.yaml"))
    if config.get("wfm") != "diffusion":
        raise ConfigError(
            f"{ckpt.parent.parent} is not a diffusion world-model run (its config.yaml says otherwise)"
        )
    cfg = from_dict(WFMConfig, config["model"])
    model = DiffusionWFM(cfg)
    weights = merge_lora_weights({k.removeprefix("model."): v for k, v in load_model_weights(ckpt).items()})
    weights.setdefault("train_fps", model.train_fps)  # checkpoints from before it was recorded
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    model = model.to(device).eval()
    tok = load_tokenizer(tokenizer or config["tokenizer"], device)
    t5 = None
    if cfg.dit.text.kind == "t5":
        from cupola.collections.world.text import T5TextEncoder

        t5 = T5TextEncoder(cfg.dit.text, device)
    return WorldModel(model, tok, t5)


def write_preview(path: str | Path, video_T_H_W_3: np.ndarray, fps: float, *, max_side: int = 256) -> Path:
    """An animated GIF beside the MP4 (Pillow), frames scaled to at most ``max_side`` pixels."""
    from PIL import Image

    path = Path(path)
    frames = [Image.fromarray(f) for f in video_T_H_W_3]
    h, w = video_T_H_W_3.shape[1:3]
    factor = min(1.0, max_side / max(h, w))
    if factor < 1.0:
        frames = [f.resize((max(1, round(w * factor)), max(1, round(h * factor)))) for f in frames]
    duration = round(1000 / max(fps, 1e-3))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0)
    return path
