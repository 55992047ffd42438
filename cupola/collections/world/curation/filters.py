"""Clip filters: motion, sharpness, exposure, and learned classifiers from local files.

Scores (the manifest's columns):

- ``motion``: how far the picture moves per second, as a fraction of the frame's short side (0.1:
  a tenth of the frame each second). ``mv``: the codec's own motion vectors (PyAV ``export_mvs``,
  free with decoding), area-weighted over the blocks of each frame; ``flow``: Farnebäck optical
  flow between a sampled frame and the one before it, on small greyscale frames. Codecs without
  motion vectors (MJPEG, VP9, ...) get flow even under ``mv``; the ``motion_method`` column says
  which one measured each clip. The first frame of a clip is never used (its vectors point into
  the previous shot).
- ``sharpness``: variance of the Laplacian of the luma at the transcoded size; defocus and motion
  blur remove the high frequencies it measures.
- ``brightness``: mean luma in [0, 1]; ``clipped``: fraction of pixels at black (<= 2) or white (>= 253).
- ``learned_<name>``: a local model's mean score over a few frames (:class:`LearnedFilter`).

Each score of a clip is the mean over frames sampled ``filter.sample_fps`` times a second, except
motion: the median over its frames (the frames just after a cut may still predict from the previous
shot, and their vectors must not decide).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from cupola.collections.world.curation.config import FilterConfig, LearnedFilterConfig
from cupola.toolkit.data.video import sample_indices

__all__ = [
    "ClipScores",
    "LearnedFilter",
    "exposure",
    "flow_motion",
    "load_torch_model",
    "mv_motion",
    "reasons",
    "sharpness",
]


def sharpness(luma_H_W: np.ndarray) -> float:
    """Variance of the Laplacian (OpenCV) of a ``uint8`` luma plane."""
    import cv2

    return float(cv2.Laplacian(luma_H_W, cv2.CV_32F).var())


def exposure(gray_H_W: np.ndarray) -> tuple[float, float]:
    """``(mean luma in [0, 1], fraction of pixels clipped to black or white)`` of a ``uint8`` frame."""
    clipped = np.count_nonzero((gray_H_W <= 2) | (gray_H_W >= 253)) / gray_H_W.size
    return float(gray_H_W.mean() / 255.0), float(clipped)


def mv_motion(frame: Any, short_side: int) -> float | None:
    """A decoded ``av.VideoFrame``'s motion vectors as the mean displacement (area-weighted over its
    blocks) in fractions of ``short_side``; ``None`` when the frame carries none (intra frames,
    codecs that export none)."""
    side = frame.side_data.get("MOTION_VECTORS")
    if side is None:
        return None
    mvs = side.to_ndarray()
    if len(mvs) == 0:
        return None
    area = mvs["w"].astype(np.float64) * mvs["h"]
    shift = np.hypot(mvs["motion_x"], mvs["motion_y"]) / np.maximum(mvs["motion_scale"], 1)
    return float((shift * area).sum() / area.sum() / short_side)


def flow_motion(prev_gray_H_W: np.ndarray, gray_H_W: np.ndarray) -> float:
    """Mean Farnebäck optical-flow magnitude between two ``uint8`` frames, in fractions of the
    short side."""
    import cv2

    flow_H_W_2 = cv2.calcOpticalFlowFarneback(prev_gray_H_W, gray_H_W, None, 0.5, 2, 9, 2, 5, 1.1, 0)
    return float(np.hypot(flow_H_W_2[..., 0], flow_H_W_2[..., 1]).mean() / min(gray_H_W.shape))


@functools.cache
def load_torch_model(path: str) -> Any:
    """A local TorchScript file, or a whole pickled ``nn.Module`` (``torch.save(model)``), in eval
    mode; loaded once per process."""
    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model file {file} does not exist: give a local TorchScript or torch file")
    try:
        model = torch.jit.load(str(file), map_location="cpu")
    except RuntimeError:  # not TorchScript: a pickled module
        model = torch.load(str(file), map_location="cpu", weights_only=False)
    if not callable(model):
        raise ValueError(f"{file} holds a {type(model).__name__}, not a model: save the nn.Module itself")
    return model.eval()


def frames_to_tensor(frames_N_S_S_3: np.ndarray) -> Any:
    """``uint8 [N, S, S, 3]`` -> ``float32 [N, 3, S, S]`` in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames_N_S_S_3)).permute(0, 3, 1, 2).float() / 255.0


class LearnedFilter:
    """A clip classifier loaded from a local file (see :class:`LearnedFilterConfig`)."""

    def __init__(self, cfg: LearnedFilterConfig) -> None:
        self.cfg = cfg
        self.model = load_torch_model(cfg.path)

    def score(self, frames_N_S_S_3: np.ndarray) -> float:
        import torch

        with torch.no_grad():
            out = self.model(frames_to_tensor(frames_N_S_S_3))
        scores = torch.as_tensor(out, dtype=torch.float32).reshape(len(frames_N_S_S_3), -1)
        if scores.shape[1] != 1:
            raise ValueError(
                f"learned filter {self.cfg.name!r} ({self.cfg.path}) returned {list(out.shape)} for "
                f"{len(frames_N_S_S_3)} frames: it must return one score per frame ([N] or [N, 1])"
            )
        return float(scores.mean())

    def rejects(self, score: float) -> bool:
        low, high = self.cfg.min_score, self.cfg.max_score
        return (low is not None and score < low) or (high is not None and score > high)


class ClipScores:
    """One clip's scores, accumulated frame by frame as the clip is decoded.

    ``sample(j)`` says whether frame ``j`` of the clip (from 0) is sampled: every ``stride``-th,
    from the first. Motion samples are the frames just after them (their predecessor is in the
    clip). Sampled frames' thumbnails are kept for the learned filters and the embedding.
    """

    def __init__(self, stride: int, fps: float) -> None:
        self.stride, self.fps = stride, fps
        self.mv: list[float] = []
        self.flow: list[float] = []
        self.sharpness: list[float] = []
        self.brightness: list[float] = []
        self.clipped: list[float] = []
        self.thumbnails: dict[int, list[np.ndarray]] = {}  # size -> uint8 [S, S, 3] per sampled frame

    def sample(self, j: int) -> bool:
        return j % self.stride == 0

    def motion_sample(self, j: int) -> bool:
        return j % self.stride == 1 or (self.stride == 1 and j > 0)

    def add_quality(self, luma_H_W: np.ndarray, gray_H_W: np.ndarray) -> None:
        self.sharpness.append(sharpness(luma_H_W))
        brightness, clipped = exposure(gray_H_W)
        self.brightness.append(brightness)
        self.clipped.append(clipped)

    def add_thumbnail(self, size: int, rgb_S_S_3: np.ndarray) -> None:
        self.thumbnails.setdefault(size, []).append(rgb_S_S_3)

    def thumbnails_at(self, size: int, count: int) -> np.ndarray:
        """``count`` (or fewer) of the sampled frames at ``size``, spread evenly: ``uint8 [N, S, S, 3]``."""
        frames = self.thumbnails.get(size, [])
        if not frames:
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        picks = sample_indices(len(frames), 1.0, num_frames=min(count, len(frames)))
        return np.stack([frames[i] for i in picks])

    def motion(self) -> tuple[float | None, str | None]:
        """``(fraction of the short side per second, "mv" | "flow")``; ``(None, None)`` for a clip too
        short to have a motion sample."""
        if self.mv:
            return float(np.median(self.mv)) * self.fps, "mv"
        if self.flow:
            return float(np.median(self.flow)) * self.fps, "flow"
        return None, None

    def summary(self) -> dict[str, float | str | None]:
        motion, method = self.motion()

        def mean(values: list[float]) -> float | None:
            return round(float(np.mean(values)), 6) if values else None

        return {
            "motion": None if motion is None else round(motion, 6),
            "motion_method": method,
            "sharpness": mean(self.sharpness),
            "brightness": mean(self.brightness),
            "clipped": mean(self.clipped),
        }


def reasons(scores: dict[str, Any], cfg: FilterConfig, learned: list[LearnedFilter]) -> list[str]:
    """Why a clip with these scores is dropped (empty: kept), in a fixed order."""
    found = []

    def below(value: float | None, limit: float | None) -> bool:
        return value is not None and limit is not None and value < limit

    if below(scores["motion"], cfg.min_motion):
        found.append("low_motion")
    if below(cfg.max_motion, scores["motion"]):
        found.append("high_motion")
    if below(scores["sharpness"], cfg.min_sharpness):
        found.append("blurry")
    if below(scores["brightness"], cfg.min_brightness):
        found.append("underexposed")
    if below(cfg.max_brightness, scores["brightness"]):
        found.append("overexposed")
    if below(cfg.max_clipped, scores["clipped"]):
        found.append("clipped")
    for model in learned:
        score = scores.get(f"learned_{model.cfg.name}")
        if score is not None and model.rejects(score):
            found.append(f"learned:{model.cfg.name}")
    return found
