"""Transcoding: clips re-encoded with PyAV to H.264 (or MPEG-4 Part 2) mp4 at a target size and
frame rate, frame by frame as they are decoded (a clip is never held in memory whole).

Encoders run with one thread: parallelism comes from curating several videos at once, and a
single-threaded x264 gives the same bytes for the same frames on every run, which is what makes a
resumed run's shards equal an uninterrupted run's. x264's macroblock-tree rate control is off for
the same reason: on CPUs with AVX-512 its lookahead reads memory it never wrote, so with it on the
same frames encode to different bytes depending on what the process did before.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

from cupola.collections.world.curation.config import TranscodeConfig

__all__ = ["ClipEncoder", "FrameRate", "output_size"]


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """``(width, height)`` of the transcoded frames: the shorter side scaled to ``short_side``
    (never up), the other in proportion, both even (4:2:0 chroma)."""
    if short_side is None or min(width, height) <= short_side:
        return _even(width), _even(height)
    scale = short_side / min(width, height)
    return _even(width * scale), _even(height * scale)


class FrameRate:
    """Which source frames a clip keeps to play at ``out`` frames per second: frame ``j`` of the clip
    (counted from its first) is kept when ``floor(j * out / source)`` moves on — evenly spread drops,
    none when the source is no faster than the target."""

    def __init__(self, source: Fraction, target: float | None) -> None:
        self.source = source
        self.out = source if target is None or target >= source else Fraction(target).limit_denominator(1001)
        self._ratio = self.out / self.source

    def keep(self, j: int) -> bool:
        return j == 0 or math.floor(j * self._ratio) != math.floor((j - 1) * self._ratio)


class ClipEncoder:
    """An mp4 written frame by frame; it appears at ``path`` only when :meth:`close` finishes."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction, cfg: TranscodeConfig) -> None:
        import av

        if cfg.codec not in av.codecs_available:
            raise RuntimeError(
                f"transcode.codec={cfg.codec!r}: the FFmpeg bundled with PyAV {av.__version__} does not have "
                "it; set transcode.codec=mpeg4"
            )
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.mp4")
        self._container = av.open(str(self._tmp), mode="w")
        self._stream = self._container.add_stream(cfg.codec, rate=fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        if cfg.codec == "libx264":
            self._stream.options = {
                "preset": cfg.preset,
                "crf": str(cfg.crf),
                "threads": "1",
                "x264-params": "mbtree=0",  # deterministic bytes (see the module docstring)
            }
        else:  # MPEG-4 Part 2 has no crf: a bit rate of 2 bits per pixel, as write_video uses
            self._stream.options = {"threads": "1"}
            self._stream.bit_rate = int(2 * width * height * fps)
        self._time_base = 1 / fps
        self.frames = 0

    def write(self, frame) -> None:  # frame: av.VideoFrame, yuv420p at the stream's size
        frame.pts, frame.time_base = self.frames, self._time_base
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> int:
        """Flush, close and move the file into place; returns its size in bytes."""
        self._container.mux(self._stream.encode())
        self._container.close()
        os.replace(self._tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        """Stop without a file (a failed video)."""
        import av

        try:
            self._container.close()
        except (av.FFmpegError, OSError):
            pass  # the video is already failing; its error is the one recorded
        finally:
            self._tmp.unlink(missing_ok=True)
