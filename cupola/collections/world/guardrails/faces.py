"""Post-generation face blurring with OpenCV's bundled Haar cascades.

    video_T_H_W_C uint8 (RGB, or C = 1 grey)
      --per frame: grey, downscaled to detect_max_side, histogram-equalised-->
      frontal cascade (+ profile cascade on the frame and its mirror image) --> face boxes
      --each box grown by ``margin`` on every side, clipped to the frame-->
      --temporal dilation: a box found in frame t is also blurred in frames t-d .. t+d-->
      --each box blurred (Gaussian) or pixelated from its own pixels only--> blurred video

Pixels outside the blurred boxes are returned bit-identical. The cascades ship inside the
``opencv-python-headless`` wheel (``cv2.data.haarcascades``, OpenCV 4.x; OpenCV 5 moved them out),
so nothing is downloaded. Haar cascades are fast and transparent but miss small, dark, strongly
rotated or occluded faces; the temporal dilation covers a face missed for a frame or two, not one
missed throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import torch

from cupola.toolkit.config import check_choice, check_positive, config_error

__all__ = ["FaceBlurConfig", "FaceBox", "blur_faces", "detect_faces"]

BLUR_MODES = ("blur", "pixelate")
FRONTAL_CASCADE = "haarcascade_frontalface_default.xml"
PROFILE_CASCADE = "haarcascade_profileface.xml"  # trained on faces turned one way; run mirrored too
_CASCADE_MIN_SIDE = 24  # the frontal cascade's training window, in pixels
_BLUR_SIGMA_AT_LOW_RES = 3.0


@dataclass(kw_only=True, slots=True)
class FaceBlurConfig:
    enabled: bool = True
    scale_factor: float = 1.1  # image-pyramid step between detection scales (smaller: slower, finds more)
    min_neighbors: int = 4  # overlapping detections needed to keep a face (larger: fewer false positives)
    min_face: float = 0.04  # smallest face side searched for, as a fraction of the frame's shorter side
    profile: bool = True  # also run the profile-face cascade (both directions)
    margin: float = 0.25  # each box grows by this fraction of its side on every side (hair, chin, ears)
    mode: str = "blur"  # "blur": Gaussian; "pixelate": coarse blocks
    strength: float = 0.15  # blur sigma, or pixel-block side, as a fraction of the box side
    temporal_dilation: int = 2  # a face found in frame t is blurred in frames t-d .. t+d too
    detect_max_side: int = 640  # frames are downscaled to this longer side for detection only

    def validate(self) -> None:
        check_choice(self, "mode", self.mode, BLUR_MODES)
        if not self.scale_factor > 1.0:
            raise config_error(self, "scale_factor", self.scale_factor, "must be > 1 (e.g. 1.1)")
        check_positive(self, "min_neighbors", self.min_neighbors, allow_zero=True)
        if not 0.0 < self.min_face <= 1.0:
            raise config_error(
                self, "min_face", self.min_face, "a fraction of the frame's shorter side in (0, 1]"
            )
        check_positive(self, "margin", self.margin, allow_zero=True)
        check_positive(self, "strength", self.strength)
        check_positive(self, "temporal_dilation", self.temporal_dilation, allow_zero=True)
        if self.detect_max_side < 2 * _CASCADE_MIN_SIDE:
            raise config_error(
                self, "detect_max_side", self.detect_max_side, f"must be >= {2 * _CASCADE_MIN_SIDE}"
            )


@dataclass(frozen=True, slots=True)
class FaceBox:
    """A blurred region of one frame: pixel rows ``y0:y1`` and columns ``x0:x1`` (margin included)."""

    x0: int
    y0: int
    x1: int
    y1: int
    source_frame: int  # the frame the face was detected in (another frame: carried by temporal dilation)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def detect_faces(frame_H_W_C: np.ndarray, config: FaceBlurConfig) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x0, y0, x1, y1)`` in one uint8 frame, before the margin."""
    grey = (
        frame_H_W_C[..., 0] if frame_H_W_C.shape[-1] == 1 else cv2.cvtColor(frame_H_W_C, cv2.COLOR_RGB2GRAY)
    )
    H, W = grey.shape
    scale = min(1.0, config.detect_max_side / max(H, W))
    if scale < 1.0:
        grey = cv2.resize(
            grey, (max(1, round(W * scale)), max(1, round(H * scale))), interpolation=cv2.INTER_AREA
        )
    grey = cv2.equalizeHist(grey)
    h, w = grey.shape
    side = max(_CASCADE_MIN_SIDE, round(config.min_face * min(h, w)))
    if side > min(h, w):
        return []

    def run(name: str, image: np.ndarray) -> np.ndarray:
        found = _cascade(name).detectMultiScale(
            image, scaleFactor=config.scale_factor, minNeighbors=config.min_neighbors, minSize=(side, side)
        )
        return np.asarray(found, dtype=np.int64).reshape(-1, 4)  # x, y, w, h

    boxes = [run(FRONTAL_CASCADE, grey)]
    if config.profile:
        boxes.append(run(PROFILE_CASCADE, grey))
        mirrored = run(PROFILE_CASCADE, np.ascontiguousarray(grey[:, ::-1]))
        mirrored[:, 0] = w - mirrored[:, 0] - mirrored[:, 2]
        boxes.append(mirrored)
    xywh = np.concatenate(boxes) / scale
    return [
        (int(np.floor(x)), int(np.floor(y)), min(W, int(np.ceil(x + bw))), min(H, int(np.ceil(y + bh))))
        for x, y, bw, bh in xywh
    ]


def blur_faces(
    video_T_H_W_C: np.ndarray | torch.Tensor, config: FaceBlurConfig | None = None
) -> tuple[np.ndarray | torch.Tensor, list[list[FaceBox]]]:
    """Blur every detected face; returns ``(blurred video, per-frame list of blurred boxes)``.

    ``video_T_H_W_C``: uint8 RGB (or grey, C = 1) frames, a numpy array or a torch tensor; the result
    has the same type, device and shape. The input is not modified. A disabled config returns the
    input itself and no boxes.
    """
    config = config or FaceBlurConfig()
    config.validate()
    if not config.enabled:  # before any copy: a disabled blur must cost nothing
        return video_T_H_W_C, [[] for _ in range(len(video_T_H_W_C))]
    video = _as_numpy(video_T_H_W_C)
    T, H, W, _ = video.shape

    detected = [detect_faces(frame, config) for frame in video]
    d = config.temporal_dilation
    chosen: list[dict[tuple[int, int, int, int], int]] = [{} for _ in range(T)]  # box -> source frame
    for t, faces in enumerate(detected):
        for x0, y0, x1, y1 in faces:
            mx, my = round(config.margin * (x1 - x0)), round(config.margin * (y1 - y0))
            box = (max(0, x0 - mx), max(0, y0 - my), min(W, x1 + mx), min(H, y1 + my))
            for s in range(max(0, t - d), min(T, t + d + 1)):
                # a box seen in several frames is blurred once, credited to the nearest detection
                if box not in chosen[s] or abs(t - s) < abs(chosen[s][box] - s):
                    chosen[s][box] = t
    boxes_per_frame: list[list[FaceBox]] = []
    for s, frame in enumerate(chosen):  # the frame's own detections first, then the nearest carried ones
        boxes = [FaceBox(*box, source_frame=src) for box, src in frame.items()]
        boxes_per_frame.append(sorted(boxes, key=lambda b, s=s: abs(b.source_frame - s)))

    out = video.copy()
    for t, boxes in enumerate(boxes_per_frame):
        for box in boxes:
            region = out[t][box.slices]
            region[...] = _obscure(region, config)
    return _like(out, video_T_H_W_C), boxes_per_frame


def _obscure(region_h_w_C: np.ndarray, config: FaceBlurConfig) -> np.ndarray:
    """The region blurred or pixelated from its own pixels (reflected at its border, nothing leaks in)."""
    h, w = region_h_w_C.shape[:2]
    if h == 0 or w == 0:
        return region_h_w_C
    side = max(h, w)
    if config.mode == "blur":
        sigma = max(1.0, config.strength * side)
        # a wide blur at full resolution costs O(sigma) per pixel; at 1/step resolution it looks the
        # same (the detail is gone either way) and costs a constant
        step = max(1.0, sigma / _BLUR_SIGMA_AT_LOW_RES)
        small = cv2.resize(
            region_h_w_C,
            (max(1, math.ceil(w / step)), max(1, math.ceil(h / step))),
            interpolation=cv2.INTER_AREA,
        )
        small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma / step, borderType=cv2.BORDER_REFLECT)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        block = max(2.0, config.strength * side)
        small = cv2.resize(
            region_h_w_C, (max(1, round(w / block)), max(1, round(h / block))), interpolation=cv2.INTER_AREA
        )
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return out.reshape(region_h_w_C.shape)  # OpenCV drops a trailing channel axis of 1


@cache
def _cascade(name: str) -> cv2.CascadeClassifier:
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise ImportError(
            f"OpenCV {cv2.__version__} has no bundled Haar cascades (OpenCV 5 moved them out of the main "
            "package): install 'opencv-python-headless>=4.8,<5'"
        )
    path = Path(cv2.data.haarcascades) / name
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise FileNotFoundError(
            f"could not load the OpenCV face cascade {path}; reinstall opencv-python-headless"
        )
    return cascade


def _as_numpy(video: np.ndarray | torch.Tensor) -> np.ndarray:
    array = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.dtype != np.uint8:
        raise ValueError(
            f"blur_faces expects uint8 frames, got {array.dtype}; convert a [-1, 1] float video with "
            "((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)"
        )
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(
            f"blur_faces expects a [T, H, W, C] video with C = 3 (RGB) or 1, got shape {tuple(array.shape)}; "
            "a [T, C, H, W] tensor wants .permute(0, 2, 3, 1)"
        )
    return np.ascontiguousarray(array)


def _like(array: np.ndarray, reference: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(reference, torch.Tensor):
        return torch.from_numpy(array).to(reference.device)
    return array
