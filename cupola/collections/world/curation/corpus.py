"""Generated videos for curation: real shot cuts, degraded shots the filters should catch, repeated
scenes the deduplication should catch, and broken files — a corpus for tests, the benchmark and
the tutorial, written without downloading anything.

A video is a sequence of :class:`Shot` s. Each shot renders a scene (its ``scene`` number seeds a
textured two-colour background and 2-4 bright shapes); consecutive shots of different scenes make
hard cuts that shot detection finds. Kinds:

- ``moving``: the background pans and the shapes bounce (motion well above the filter's floor);
- ``static``: nothing moves (``low_motion``);
- ``blurry``: ``moving``, Gaussian-blurred (``blurry``);
- ``bright`` / ``dark``: ``moving``, pushed to near white / near black (``overexposed`` /
  ``underexposed``).

A scene looks the same at any frame size (positions and speeds are fractions of the frame), so one
scene in two videos of different sizes is a semantic duplicate. Speeds are per second, so motion
scores do not depend on the frame rate.
"""

from __future__ import annotations

import fractions
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SHOT_KINDS", "Corpus", "Shot", "write_broken_videos", "write_curation_corpus", "write_shot_video"]

SHOT_KINDS = ("moving", "static", "blurry", "bright", "dark")


@dataclass(frozen=True, slots=True)
class Shot:
    seconds: float
    scene: int
    kind: str = "moving"


class _Scene:
    """One scene at ``height x width``: a panning textured background and bouncing shapes."""

    def __init__(self, scene: int, height: int, width: int, moving: bool) -> None:
        rng = np.random.default_rng(1000 + scene)
        self.height, self.width, self.moving = height, width, moving
        short = min(height, width)
        self.pad = max(2, width // 3)
        yy, xx = np.mgrid[0:height, 0 : width + self.pad].astype(np.float32)
        a, b = rng.uniform(20, 170, size=(2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        along = (yy * np.sin(angle) + xx * np.cos(angle)) / (width + self.pad)
        along = (along - along.min()) / max(1e-6, float(along.max() - along.min()))
        canvas = a + (b - a) * along[..., None]
        period = short / rng.uniform(4, 8)  # stripes: detail that blur removes
        canvas += 12 * np.sign(np.sin(2 * np.pi * (xx + 0.5 * yy) / period))[..., None]
        canvas += rng.normal(0, 6, size=(1, 1, 3))
        grain = np.random.default_rng((1000 + scene, 1))  # size-dependent draws: a generator of their own
        canvas += grain.normal(0, 4, size=canvas.shape[:2])[..., None]
        self.canvas = np.clip(canvas, 0, 255).astype(np.uint8)
        self.pan = rng.uniform(0.04, 0.08) * short  # pixels per second
        self.shapes = []
        for _ in range(int(rng.integers(2, 5))):
            side = max(3, int(short * rng.uniform(0.12, 0.25)))
            yy_s, xx_s = np.mgrid[0:side, 0:side]
            r = (side - 1) / 2
            mask = (
                (yy_s - r) ** 2 + (xx_s - r) ** 2 <= r * r
                if rng.uniform() < 0.5
                else np.ones((side, side), bool)
            )
            colour = rng.uniform(180, 255, size=3).astype(np.uint8)
            start = rng.uniform(0, 1, size=2) * (height - side, width - side)
            heading = rng.uniform(0, 2 * np.pi)
            speed = rng.uniform(0.1, 0.25) * short * np.array([np.sin(heading), np.cos(heading)])
            self.shapes.append((mask, colour, start, speed))

    @staticmethod
    def _bounce(p: float, limit: float) -> float:
        if limit <= 0:
            return 0.0
        p = p % (2 * limit)
        return p if p <= limit else 2 * limit - p

    def frame(self, seconds: float) -> np.ndarray:
        """``uint8 [H, W, 3]`` at time ``seconds`` into the shot."""
        t = seconds if self.moving else 0.0
        x0 = round(self._bounce(self.pan * t, self.pad))
        image = self.canvas[:, x0 : x0 + self.width].copy()
        for mask, colour, start, speed in self.shapes:
            side = mask.shape[0]
            y = round(self._bounce(start[0] + speed[0] * t, self.height - side))
            x = round(self._bounce(start[1] + speed[1] * t, self.width - side))
            image[y : y + side, x : x + side][mask] = colour
        return image


def _render(shot: Shot, height: int, width: int, fps: float) -> Iterator[np.ndarray]:
    import cv2

    if shot.kind not in SHOT_KINDS:
        raise ValueError(f"shot kind {shot.kind!r} is not one of {SHOT_KINDS}")
    scene = _Scene(shot.scene, height, width, moving=shot.kind != "static")
    for i in range(max(1, round(shot.seconds * fps))):
        image = scene.frame(i / fps)
        if shot.kind == "blurry":
            image = cv2.GaussianBlur(image, (0, 0), min(height, width) / 20)
        elif shot.kind == "bright":
            image = (255 - (255 - image.astype(np.uint16)) // 10).astype(np.uint8)
        elif shot.kind == "dark":
            image = (image.astype(np.uint16) * 6 // 100).astype(np.uint8)
        yield image


def write_shot_video(
    path: str | Path,
    shots: Sequence[Shot],
    *,
    size: tuple[int, int],
    fps: float = 8.0,
    codec: str = "libx264",
) -> Path:
    """Write ``shots`` back to back as one video of ``size = (height, width)`` (even) at ``fps``;
    ``codec``: ``libx264`` (mp4; ``veryfast``), ``mpeg4`` or ``mjpeg`` (any container FFmpeg picks
    from the suffix: ``.avi``, ``.mkv``, ...). The file appears complete or not at all."""
    import av

    height, width = size
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
            if codec == "libx264":
                stream.options = {"preset": "veryfast", "crf": "20"}
            elif codec == "mpeg4":
                stream.bit_rate = int(2 * width * height * fps)
            n = 0
            for shot in shots:
                for image in _render(shot, height, width, fps):
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts = n
                    container.mux(stream.encode(frame))
                    n += 1
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_broken_videos(root: str | Path, reference: str | Path, seed: int = 0) -> dict[str, Path]:
    """Inputs a pipeline must survive, written into ``root``: ``corrupt.mp4`` (random bytes),
    ``truncated.mp4`` (the first half of ``reference``'s bytes; an mp4 whose index, at its end, is
    cut off), ``empty.mp4`` (0 bytes) and ``audio_only.mp4`` (one second of AAC, no video)."""
    import av

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    data = Path(reference).read_bytes()
    files = {
        "corrupt": root / "corrupt.mp4",
        "truncated": root / "truncated.mp4",
        "empty": root / "empty.mp4",
        "audio_only": root / "audio_only.mp4",
    }
    files["corrupt"].write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    rate = 16000
    with av.open(str(files["audio_only"]), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return files


@dataclass(frozen=True, slots=True)
class Corpus:
    """What :func:`write_curation_corpus` wrote: every video's shots, and the broken files."""

    root: Path
    videos: dict[str, list[Shot]] = field(default_factory=dict)  # name relative to root -> shots
    broken: dict[str, Path] = field(default_factory=dict)

    def shots(self, kind: str) -> list[tuple[str, int]]:
        """``(video name, shot index)`` of every shot of ``kind``."""
        return [
            (name, i) for name, shots in self.videos.items() for i, s in enumerate(shots) if s.kind == kind
        ]


def write_curation_corpus(
    root: str | Path,
    *,
    num_videos: int = 8,
    shots_per_video: int = 3,
    shot_seconds: tuple[float, float] = (2.5, 4.0),
    sizes: Sequence[tuple[int, int]] = ((64, 96),),
    fps: float = 8.0,
    seed: int = 0,
    degraded: bool = True,
    broken: bool = True,
) -> Corpus:
    """``num_videos`` videos ``root/shots/v0000.mp4, ...`` of ``shots_per_video`` shots each, each
    shot a new scene of ``shot_seconds`` (uniform), at a size taken in turn from ``sizes``
    (``(height, width)``), h264.

    ``degraded``: the first videos' second shot is, in turn, ``static``, ``blurry``, ``bright`` and
    ``dark``; the next video (``v0004``, needs ``num_videos >= 6``) repeats ``v0000``'s first scene
    at another size and ``v0005`` gets a 0.75 s shot (``too_short``); a ``.avi`` of MJPEG (no
    motion vectors) is added as ``odd/mjpeg.avi``. ``broken``: :func:`write_broken_videos` into
    ``root/broken``.
    """
    if num_videos < (6 if degraded else 1):
        raise ValueError(f"num_videos={num_videos}: degraded=True needs at least 6 videos")
    root = Path(root).expanduser()
    rng = np.random.default_rng(seed)
    corpus = Corpus(root=root)
    scene = seed * 10_000
    for v in range(num_videos):
        shots = []
        for _ in range(shots_per_video):
            shots.append(Shot(round(float(rng.uniform(*shot_seconds)), 3), scene))
            scene += 1
        size = sizes[v % len(sizes)]
        if degraded and v < 4:
            i = min(1, len(shots) - 1)
            shots[i] = Shot(shots[i].seconds, shots[i].scene, SHOT_KINDS[v + 1])
        if degraded and v == 4:
            shots[0] = corpus.videos["shots/v0000.mp4"][0]
            size = (size[0] * 3 // 2 // 2 * 2, size[1] * 3 // 2 // 2 * 2)
        if degraded and v == 5:
            shots.insert(1, Shot(0.75, scene))
            scene += 1
        name = f"shots/v{v:04d}.mp4"
        write_shot_video(root / name, shots, size=size, fps=fps)
        corpus.videos[name] = shots
    if degraded:
        odd = [Shot(round(float(rng.uniform(*shot_seconds)), 3), scene + i) for i in range(2)]
        write_shot_video(root / "odd" / "mjpeg.avi", odd, size=sizes[0], fps=fps, codec="mjpeg")
        corpus.videos["odd/mjpeg.avi"] = odd
    if broken:
        corpus.broken.update(write_broken_videos(root / "broken", root / "shots" / "v0000.mp4", seed=seed))
    return corpus
