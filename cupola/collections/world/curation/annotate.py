"""Captions for kept clips: a :class:`Captioner` turns a clip (its mp4 and its manifest record) into
text.

- :class:`MetadataCaptioner` (the default): a sentence from what the pipeline measured — the
  source and time span, size and rate, motion and exposure. No model, no download.
- :class:`VLMCaptioner`: the VLM collection's VILA model, loaded from a local cupola VLM run
  (``cupola vlm chat`` loads it the same way), answers a prompt about frames sampled uniformly from
  the clip, greedily (the same clip gets the same caption on every run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from cupola.collections.world.curation.config import AnnotateConfig

__all__ = ["Captioner", "MetadataCaptioner", "VLMCaptioner", "make_captioner"]


class Captioner(Protocol):
    def caption(self, clip_mp4: Path, clip: dict[str, Any], video: dict[str, Any]) -> str:
        """The caption of one clip: its file, its record (scores, span, size) and its video's record."""
        ...


def _motion_words(motion: float | None) -> str:
    if motion is None:
        return "motion not measured"
    if motion < 0.02:
        return "nearly static"
    if motion < 0.1:
        return "gentle motion"
    if motion < 0.3:
        return "moderate motion"
    return "fast motion"


def _exposure_words(brightness: float | None) -> str:
    if brightness is None:
        return "exposure not measured"
    if brightness < 0.3:
        return "dark"
    if brightness > 0.7:
        return "bright"
    return "normally exposed"


class MetadataCaptioner:
    """``"4.0 s at 8 fps, 96x64, from shots/v0001.mp4 (2.0-6.0 s); gentle motion, normally exposed."``"""

    def caption(self, clip_mp4: Path, clip: dict[str, Any], video: dict[str, Any]) -> str:
        seconds = clip["end_s"] - clip["start_s"]
        return (
            f"{seconds:.1f} s at {clip['out_fps']:g} fps, {clip['width']}x{clip['height']}, from "
            f"{video['source']} ({clip['start_s']:.1f}-{clip['end_s']:.1f} s); "
            f"{_motion_words(clip['motion'])}, {_exposure_words(clip['brightness'])}."
        )


class VLMCaptioner:
    """A cupola VLM run's answer to ``cfg.prompt`` about ``cfg.frames`` frames of the clip."""

    def __init__(self, cfg: AnnotateConfig) -> None:
        from cupola.collections.vlm.generate import load_vlm
        from cupola.toolkit.data.tokenizer import load_tokenizer

        self.cfg = cfg
        self.model, run_config = load_vlm(cfg.vlm_checkpoint, cfg.device)
        self.tokenizer = load_tokenizer(cfg.tokenizer or run_config.get("data", {}).get("tokenizer"))

    def caption(self, clip_mp4: Path, clip: dict[str, Any], video: dict[str, Any]) -> str:
        from cupola.collections.vlm.generate import chat, media_pixels

        pixels_F_3_S_S, marker = media_pixels(self.model.cfg, video=clip_mp4, num_frames=self.cfg.frames)
        answer = chat(
            self.model,
            self.tokenizer,
            self.cfg.prompt,
            pixels_F_3_S_S,
            marker,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=0.0,
        )
        return answer.strip()


def make_captioner(cfg: AnnotateConfig) -> Captioner:
    return VLMCaptioner(cfg) if cfg.captioner == "vlm" else MetadataCaptioner()
