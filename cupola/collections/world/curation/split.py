"""Splitting: shot boundaries from PySceneDetect, shots cut into clips, online.

Frames arrive one at a time (:meth:`Splitter.push`); each is handed to a PySceneDetect detector
(``ContentDetector`` or ``AdaptiveDetector``, via the detectors' public ``process_frame``), which
reports a cut at most ``event_buffer_length`` frames after the frame it falls on. The splitter
holds back that many frames (plus the trim), so by the time a frame leaves it, its shot is known:
the frame goes to a clip (:class:`ClipSink`), or is trimmed. Memory is bounded by the lag, not by
the video's length.

Within a shot ``[s, e)``, frames ``[s + trim, e - trim)`` are kept and cut greedily into clips of
``max_clip_seconds``; a piece shorter than ``min_clip_seconds`` reaches the sink anyway, which
records it as ``too_short`` without encoding it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from cupola.collections.world.curation.config import SplitConfig

__all__ = ["ClipSink", "Splitter", "clip_frame_limits", "make_detector"]

log = logging.getLogger(__name__)


def make_detector(cfg: SplitConfig, fps: float) -> Any:  # -> scenedetect.SceneDetector
    """The configured PySceneDetect detector; ``min_scene_seconds`` becomes whole frames at ``fps``."""
    from scenedetect import AdaptiveDetector, ContentDetector

    min_scene_len = max(1, round(cfg.min_scene_seconds * fps))
    if cfg.detector == "content":
        return ContentDetector(threshold=cfg.threshold, min_scene_len=min_scene_len)
    return AdaptiveDetector(
        adaptive_threshold=cfg.adaptive_threshold,
        min_scene_len=min_scene_len,
        min_content_val=cfg.min_content_val,
    )


def clip_frame_limits(cfg: SplitConfig, fps: float) -> tuple[int, int]:
    """``(min, max)`` source frames of a clip at ``fps`` (a clip has at least 2 frames)."""
    low = max(2, math.ceil(cfg.min_clip_seconds * fps - 1e-9))
    return low, max(low, math.floor(cfg.max_clip_seconds * fps + 1e-9))


class ClipSink(Protocol):
    """Where the splitter sends clips: ``open`` starts one (in shot ``shot``), ``frame`` adds the
    next frame to it, ``close`` ends it."""

    def open(self, shot: int) -> None: ...

    def frame(self, index: int, item: Any) -> None: ...

    def close(self) -> None: ...


class Splitter:
    """Online shot detection and clip cutting for one video (see the module docstring).

    ``push(index, item, detect_bgr)``: frame ``index`` (consecutive from 0), an opaque ``item`` the
    sink receives, and the small ``uint8 [h, w, 3]`` BGR frame the detector sees. ``finish()`` after
    the last frame. ``shots`` counts the shots found.
    """

    def __init__(self, cfg: SplitConfig, fps: Fraction, sink: ClipSink) -> None:
        from scenedetect import FrameTimecode

        self._timecode = FrameTimecode
        self.fps = fps
        self.detector = make_detector(cfg, float(fps))
        self.trim = round(cfg.trim_seconds * float(fps))
        self.min_frames, self.max_frames = clip_frame_limits(cfg, float(fps))
        self.lag = self.detector.event_buffer_length + self.trim + 1
        self.sink = sink
        self.pending: deque[tuple[int, Any]] = deque()
        self.shots = 1
        self.shot_start = 0
        self.released = -1  # the last frame index handed on (or trimmed)
        self.newest = -1
        self.clip_frames: int | None = None  # frames in the open clip; None: no clip open

    def push(self, index: int, item: Any, detect_bgr: np.ndarray) -> None:
        self.newest = index
        self.pending.append((index, item))
        for cut in self.detector.process_frame(self._timecode(index, fps=self.fps), detect_bgr):
            self._cut(cut.frame_num)
        while self.pending and self.pending[0][0] < index - self.lag:
            self._release(*self.pending.popleft(), shot_end=None)

    def finish(self) -> None:
        if self.newest >= 0:
            for cut in self.detector.post_process(self._timecode(self.newest, fps=self.fps)):
                self._cut(cut.frame_num)
        while self.pending:
            self._release(*self.pending.popleft(), shot_end=self.newest + 1)
        self._close_clip()

    def _cut(self, at: int) -> None:
        if at <= max(self.shot_start, self.released):
            # cannot happen within the detector's advertised lag; the frames before it are gone
            log.debug("cut at frame %d ignored: frames up to %d were already handed on", at, self.released)
            return
        while self.pending and self.pending[0][0] < at:
            self._release(*self.pending.popleft(), shot_end=at)
        self._close_clip()
        self.shots += 1
        self.shot_start = at

    def _release(self, index: int, item: Any, shot_end: int | None) -> None:
        self.released = index
        if index - self.shot_start < self.trim:
            return
        if shot_end is not None and index >= shot_end - self.trim:
            return
        if self.clip_frames is None:
            self.sink.open(self.shots - 1)
            self.clip_frames = 0
        self.sink.frame(index, item)
        self.clip_frames += 1
        if self.clip_frames == self.max_frames:
            self._close_clip()

    def _close_clip(self) -> None:
        if self.clip_frames is not None:
            self.sink.close()
            self.clip_frames = None
