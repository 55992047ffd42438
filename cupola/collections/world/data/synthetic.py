"""Generated videos for training and testing video tokenizers without downloading anything.

- :func:`write_moving_digits`: "moving MNIST"-style clips — handwritten digits (scikit-learn's
  bundled 8x8 ``load_digits`` images, upscaled) bouncing off the frame edges on black, in grey
  (written as RGB).
- :func:`write_bouncing_shapes`: coloured squares, circles and triangles bouncing at different
  velocities over a plain or gradient background.
- :func:`synthetic_videos`: ``"synthetic:digits"`` / ``"synthetic:shapes"`` (``":val"`` for the
  validation split) → a folder of such clips, generated once into the cache and reused.

Every file is a function of the arguments alone (numpy ``default_rng(seed)``; clips encoded as
MPEG-4 Part 2, whose encoder is bit-exact from run to run).
"""

from __future__ import annotations

import colorsys
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cupola.toolkit.data.video import write_video

__all__ = [
    "SYNTHETIC",
    "SYNTHETIC_KINDS",
    "parse_synthetic_spec",
    "synthetic_videos",
    "write_bouncing_shapes",
    "write_moving_digits",
]

FPS = 8.0
SYNTHETIC = "synthetic"
SYNTHETIC_KINDS = ("digits", "shapes")
SHAPES = ("square", "circle", "triangle")
# the cached datasets: small enough to generate in a few seconds on 2 cores
SPLIT_VIDEOS = {"train": 24, "val": 6}
SPLIT_SEEDS = {"train": 0, "val": 1}
CACHED_FRAMES, CACHED_SIZE = 33, 64


def _check_args(num_videos: int, frames: int, size: int) -> None:
    if num_videos < 1 or frames < 1:
        raise ValueError(f"num_videos={num_videos}, frames={frames}: both must be >= 1")
    if size < 16 or size % 2:
        raise ValueError(f"size={size}: frames must be an even number of pixels, at least 16")


class _Bouncer:
    """A box of side ``side`` moving at a constant speed inside ``[0, size)^2``, reflected at the edges."""

    def __init__(self, rng: np.random.Generator, size: int, side: int, speed: tuple[float, float]) -> None:
        self.limit = size - side
        self.y, self.x = (float(p) for p in rng.uniform(0, self.limit, size=2))
        angle = rng.uniform(0, 2 * math.pi)
        v = rng.uniform(*speed) * size  # pixels per frame
        self.vy, self.vx = v * math.sin(angle), v * math.cos(angle)

    def corner(self) -> tuple[int, int]:
        return round(self.y), round(self.x)

    def step(self) -> None:
        self.y, self.vy = self._reflect(self.y + self.vy, self.vy)
        self.x, self.vx = self._reflect(self.x + self.vx, self.vx)

    def _reflect(self, p: float, v: float) -> tuple[float, float]:
        if p < 0:
            return -p, -v
        if p > self.limit:
            return 2 * self.limit - p, -v
        return p, v


def _digit_images(size: int) -> np.ndarray:
    """scikit-learn's 1797 handwritten digits (bundled, 8x8, values 0..16) as ``uint8 [N, d, d]``,
    upscaled bilinearly to ``d = 3/8`` of the frame (24 px in a 64 px frame, as moving MNIST's
    28 px digits in 64)."""
    from sklearn.datasets import load_digits

    side = max(8, round(size * 3 / 8))
    images = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR)) for im in images]
    )


def write_moving_digits(
    root: str | Path, *, num_videos: int, frames: int, size: int, seed: int = 0, digits_per_video: int = 2
) -> list[Path]:
    """Write ``num_videos`` clips ``root/digits0000.mp4, ...`` (``frames`` frames, ``size x size``,
    8 fps) of ``digits_per_video`` digits bouncing on black; returns their paths. Where digits
    overlap the brighter pixel wins (as in moving MNIST). Files of the same names are overwritten."""
    _check_args(num_videos, frames, size)
    if digits_per_video < 1:
        raise ValueError(f"digits_per_video={digits_per_video}: must be >= 1")
    root = Path(root).expanduser()
    digits = _digit_images(size)
    side = digits.shape[1]
    rng = np.random.default_rng(seed)
    paths = []
    for v in range(num_videos):
        picks = rng.choice(len(digits), size=digits_per_video, replace=False)
        movers = [_Bouncer(rng, size, side, speed=(0.02, 0.05)) for _ in picks]
        clip = np.zeros((frames, size, size), dtype=np.uint8)
        for t in range(frames):
            for digit, mover in zip(picks, movers):
                y, x = mover.corner()
                window = clip[t, y : y + side, x : x + side]
                np.maximum(window, digits[digit], out=window)
                mover.step()
        rgb = np.repeat(clip[..., None], 3, axis=-1)
        paths.append(write_video(root / f"digits{v:04d}.mp4", rgb, FPS, codec="mpeg4"))  # bit-exact reruns
    return paths


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]):
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return tuple(round(255 * c) for c in rgb)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``uint8 [size, size, 3]``: a plain colour, or (half the time) a linear gradient between two
    colours in a random direction."""
    first = np.array(_colour(rng, (0.0, 0.6), (0.1, 0.6)), dtype=np.float64)
    if rng.uniform() < 0.5:
        return np.broadcast_to(first.round().astype(np.uint8), (size, size, 3)).copy()
    second = np.array(_colour(rng, (0.0, 0.6), (0.1, 0.6)), dtype=np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    along = yy * math.sin(angle) + xx * math.cos(angle)
    along = (along - along.min()) / (along.max() - along.min())
    return (first + (second - first) * along[..., None]).round().astype(np.uint8)


def write_bouncing_shapes(
    root: str | Path, *, num_videos: int, frames: int, size: int, seed: int = 0
) -> list[Path]:
    """Write ``num_videos`` clips ``root/shapes0000.mp4, ...`` (``frames`` frames, ``size x size``,
    8 fps) of 2 to 4 bright shapes (square, circle, triangle; 1/8 to 1/4 of the frame) bouncing at
    different velocities over a darker plain or gradient background; returns their paths. Shapes
    are drawn in a fixed order, later ones over earlier ones. Files of the same names are overwritten."""
    _check_args(num_videos, frames, size)
    root = Path(root).expanduser()
    rng = np.random.default_rng(seed)
    paths = []
    for v in range(num_videos):
        background = Image.fromarray(_background(rng, size))
        shapes = []
        for _ in range(int(rng.integers(2, 5))):
            side = int(rng.integers(max(4, size // 8), max(5, size // 4) + 1))
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = _colour(rng, (0.6, 1.0), (0.75, 1.0))
            shapes.append((kind, colour, side, _Bouncer(rng, size, side, speed=(0.015, 0.06))))
        clip = np.empty((frames, size, size, 3), dtype=np.uint8)
        for t in range(frames):
            image = background.copy()
            draw = ImageDraw.Draw(image)
            for kind, colour, side, mover in shapes:
                y, x = mover.corner()
                box = (x, y, x + side - 1, y + side - 1)
                if kind == "square":
                    draw.rectangle(box, fill=colour)
                elif kind == "circle":
                    draw.ellipse(box, fill=colour)
                else:
                    draw.polygon(
                        [(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=colour
                    )
                mover.step()
            clip[t] = np.asarray(image)
        paths.append(write_video(root / f"shapes{v:04d}.mp4", clip, FPS, codec="mpeg4"))  # bit-exact reruns
    return paths


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        base = os.environ.get("CUPOLA_CACHE")
        cache_dir = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "cupola"
    return Path(cache_dir).expanduser() / "world_synthetic"


def parse_synthetic_spec(spec: str) -> tuple[str, str]:
    """``"synthetic:digits:val"`` -> ``("digits", "val")``; the split defaults to ``"train"``."""
    parts = str(spec).split(":")
    split = parts[2] if len(parts) == 3 else "train"
    if (
        parts[0] != SYNTHETIC
        or len(parts) not in (2, 3)
        or parts[1] not in SYNTHETIC_KINDS
        or split not in SPLIT_VIDEOS
    ):
        valid = ", ".join(f"'{SYNTHETIC}:{k}'" for k in SYNTHETIC_KINDS)
        raise ValueError(
            f"{spec!r} names no generated videos: use one of {valid}, with ':val' for validation"
        )
    return parts[1], split


def synthetic_videos(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of clips that ``spec`` names: ``"synthetic:<kind>"`` (= ``"synthetic:<kind>:train"``)
    or ``"synthetic:<kind>:val"``, ``<kind>`` one of :data:`SYNTHETIC_KINDS`. Each kind is 24 train and
    6 val clips of 33 frames at 64x64 (seeds 0 and 1), written once into
    ``$CUPOLA_CACHE/world_synthetic`` (or ``${XDG_CACHE_HOME:-~/.cache}/cupola/world_synthetic``) and
    reused. Processes racing to build it each write a private copy and the first rename wins."""
    kind, split = parse_synthetic_spec(spec)
    root = _cache_root(cache_dir) / (
        f"v1_{kind}_n{SPLIT_VIDEOS['train']}+{SPLIT_VIDEOS['val']}_f{CACHED_FRAMES}_s{CACHED_SIZE}"
    )
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building_", dir=root.parent))
        write = write_moving_digits if kind == "digits" else write_bouncing_shapes
        try:
            for name, count in SPLIT_VIDEOS.items():
                write(
                    tmp / name,
                    num_videos=count,
                    frames=CACHED_FRAMES,
                    size=CACHED_SIZE,
                    seed=SPLIT_SEEDS[name],
                )
            tmp.rename(root)
        except OSError:
            if not root.is_dir():  # not "another process finished first"
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / split
