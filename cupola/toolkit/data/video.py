"""Video and image I/O: frames read with decord (random access), mp4 written with PyAV, pixels for a
SigLIP-style vision tower.

Reads never decode a whole video: :func:`read_frames` computes the frame indices it wants
(:func:`sample_indices`) and decodes only those (``VideoReader.get_batch``; decord seeks to the
keyframe before each and decodes forward). Both libraries bundle FFmpeg; nothing needs a system
install.

A file that is missing, unreadable, corrupt or holds no frames raises :class:`MediaError` (a
``ValueError``) whose message names the file and the problem, so a data pipeline can report it
against the sample that points to it, or skip it.
"""

from __future__ import annotations

import fractions
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "ImageInfo",
    "MediaError",
    "VideoInfo",
    "image_info",
    "probe_video",
    "read_frames",
    "read_frames_at",
    "read_image",
    "sample_indices",
    "to_pixels",
    "video_info",
    "write_video",
]

# SigLIP's image processor: rescale to [0, 1], then (x - 0.5) / 0.5 -> [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class MediaError(ValueError):
    """A video or image cannot be used: missing, unreadable, corrupt or empty. The message names the file."""


@dataclass(frozen=True, slots=True)
class VideoInfo:
    frames: int
    fps: float  # the container's average frame rate
    width: int
    height: int

    @property
    def duration(self) -> float:
        """Seconds: ``frames / fps``."""
        return self.frames / self.fps


@dataclass(frozen=True, slots=True)
class ImageInfo:
    width: int
    height: int


def _existing_file(path: str | Path, kind: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MediaError(f"{kind} {path} does not exist")
    if not path.is_file():
        raise MediaError(f"{kind} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{kind} {path} is not readable (permission denied)")
    return path


def _open_video(path: str | Path, size: tuple[int, int] | None = None):  # -> decord.VideoReader
    import decord

    path = _existing_file(path, "video")
    height, width = (-1, -1) if size is None else _check_size(size)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height)
    except (RuntimeError, decord.DECORDError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise MediaError(
            f"video {path} cannot be opened: corrupt, truncated, or not a video with a video stream "
            f"(decord: {reason})"
        ) from e
    return _checked(reader, path)


def _checked(reader, name: object):  # -> the reader, once it holds frames at a usable rate
    if len(reader) == 0:
        raise MediaError(f"video {name} holds no frames")
    fps = reader.get_avg_fps()
    if not np.isfinite(fps) or fps <= 0:
        raise MediaError(f"video {name} reports a frame rate of {fps}; cannot sample it in time")
    return reader


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(not isinstance(s, (int, np.integer)) or s <= 0 for s in size):
        raise ValueError(f"size={size!r} is not valid: give (height, width) as two integers > 0")
    return int(size[0]), int(size[1])


def _decode(reader, indices: Sequence[int], path: Path) -> np.ndarray:
    import decord

    try:
        batch = reader.get_batch(list(indices))
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # decord's torch bridge
    except (RuntimeError, decord.DECORDError) as e:
        # decord 0.6 fails get_batch when FFmpeg pads the rows of an RGB frame (some small widths:
        # 16, 24, 48, 72, ...). Frame by frame it returns the padded rows as [H, W, row_bytes / W];
        # the first 3 * W bytes of each row are the pixels.
        try:
            frames = np.stack([_unpadded(reader[int(i)]) for i in indices])
        except (RuntimeError, decord.DECORDError, ValueError):
            where = f"{len(indices)} frames in [{min(indices)}, {max(indices)}]"
            raise MediaError(f"video {path}: {where} cannot be decoded, the file is damaged ({e})") from e
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _unpadded(frame) -> np.ndarray:
    frame = frame.asnumpy() if hasattr(frame, "asnumpy") else np.asarray(frame)
    height, width = frame.shape[:2]
    if frame.shape[2] == 3:
        return frame
    return frame.reshape(height, -1)[:, : 3 * width].reshape(height, width, 3)


def video_info(path: str | Path) -> VideoInfo:
    """Frame count, average fps and size of a video (decodes its first frame, which also proves the
    file decodes). Raises :class:`MediaError` as :func:`read_frames` does."""
    reader = _open_video(path)
    height, width = _decode(reader, [0], Path(path)).shape[1:3]
    return VideoInfo(
        frames=len(reader), fps=float(reader.get_avg_fps()), width=int(width), height=int(height)
    )


def _uniform(n: int, count: int) -> np.ndarray:
    # the centre of each of `count` equal segments of [0, n): floor((j + 1/2) * n / count)
    j = np.arange(count, dtype=np.int64)
    return (2 * j + 1) * n // (2 * count)


def sample_indices(
    total_frames: int,
    video_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """The frame indices :func:`read_frames` decodes, ascending (``int64 [F]``). Exactly one rule:

    - ``num_frames=K``: the video's ``N`` frames are cut into ``K`` equal segments and the frame at the
      centre of each is taken: index ``floor((j + 1/2) * N / K)``, ``j = 0..K-1``. Always ``K`` frames
      (a video shorter than ``K`` frames repeats frames), so a sample's token count does not
      depend on the video's length.
    - ``fps=r``: one frame every ``1/r`` seconds from the start: index ``floor(k * video_fps / r)`` for
      ``k = 0, 1, ...`` while inside the video (``r`` at or above the video's rate gives every frame);
      then, if more than ``max_frames``, thinned to ``max_frames`` by the centre rule above applied to
      that list.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError(f"give exactly one of num_frames= or fps= (got num_frames={num_frames}, fps={fps})")
    if total_frames <= 0:
        raise ValueError(f"total_frames={total_frames}: the video holds no frames")
    if num_frames is not None:
        if num_frames <= 0:
            raise ValueError(f"num_frames={num_frames} is not valid: must be > 0")
        return _uniform(total_frames, num_frames)
    if fps <= 0 or video_fps <= 0:
        raise ValueError(f"fps={fps}, video_fps={video_fps}: both must be > 0")
    if max_frames is not None and max_frames <= 0:
        raise ValueError(f"max_frames={max_frames} is not valid: must be > 0 (or None: no cap)")
    step = max(1.0, video_fps / fps)  # source frames per sampled frame
    count = int(np.ceil(total_frames / step - 1e-9))
    indices = np.minimum(np.floor(np.arange(count) * step + 1e-9).astype(np.int64), total_frames - 1)
    if max_frames is not None and count > max_frames:
        indices = indices[_uniform(count, max_frames)]
    return indices


def read_frames(
    path: str | Path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
    part: slice | None = None,
) -> np.ndarray:
    """Frames of a video as ``uint8 [F, H, W, 3]`` (RGB), chosen by :func:`sample_indices`.

    ``size=(H, W)`` resizes inside decord's decoder (FFmpeg scaling), cheaper than decoding full
    frames and resizing afterwards. ``part``: decode only these of the sampled frames (e.g. one
    sequence-parallel rank's share, :func:`~cupola.toolkit.parallel.sequence.multimodal.media_share`).
    """
    reader = _open_video(path, size)
    indices = sample_indices(
        len(reader), reader.get_avg_fps(), num_frames=num_frames, fps=fps, max_frames=max_frames
    )
    if part is not None:
        indices = indices[part]
        if len(indices) == 0:
            height, width = size if size is not None else _unpadded(reader[0]).shape[:2]
            return np.zeros((0, height, width, 3), dtype=np.uint8)
    return _decode(reader, indices, Path(path))


def _open_video_source(video: str | Path | bytes, size: tuple[int, int] | None, name: str | None):
    # -> (decord.VideoReader, the name errors use)
    if not isinstance(video, (bytes, bytearray, memoryview)):
        return _open_video(video, size), str(Path(video).expanduser())
    import io

    import decord

    name = name or f"<{len(video)} bytes>"
    height, width = (-1, -1) if size is None else _check_size(size)
    if len(video) == 0:
        raise MediaError(f"video {name} is empty (0 bytes)")
    try:
        reader = decord.VideoReader(io.BytesIO(video), ctx=decord.cpu(0), width=width, height=height)
    except (RuntimeError, decord.DECORDError) as e:
        # decord echoes the bytes as the "file name" before FFmpeg's reason: keep only the reason
        lines = str(e).strip().splitlines()
        reason = lines[-1].rsplit(", ", 1)[-1][:200] if lines else type(e).__name__
        raise MediaError(
            f"video {name} cannot be opened: corrupt, truncated, or not a video with a video stream "
            f"(decord: {reason})"
        ) from e
    return _checked(reader, name), name


def probe_video(video: str | Path | bytes, *, name: str | None = None) -> VideoInfo:
    """:func:`video_info` of a path, or of a video file's bytes held in memory (e.g. a tar member);
    ``name`` is what errors call in-memory bytes (e.g. ``"shard.tar:key.mp4"``)."""
    reader, name = _open_video_source(video, None, name)
    height, width = _decode(reader, [0], name).shape[1:3]
    return VideoInfo(
        frames=len(reader), fps=float(reader.get_avg_fps()), width=int(width), height=int(height)
    )


def read_frames_at(
    video: str | Path | bytes,
    indices: Sequence[int],
    *,
    size: tuple[int, int] | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Frames ``indices`` of a video (a path, or its bytes as in :func:`probe_video`) as
    ``uint8 [F, H, W, 3]`` (RGB), decoding only those; ``size=(H, W)`` resizes inside the decoder
    as in :func:`read_frames`. An index outside the video raises :class:`MediaError`."""
    reader, name = _open_video_source(video, size, name)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices is empty: give at least one frame index")
    outside = [i for i in indices if not 0 <= i < len(reader)]
    if outside:
        raise MediaError(
            f"video {name} holds {len(reader)} frames; frame {outside[0]} was asked for "
            "(did the file change since it was probed?)"
        )
    return _decode(reader, indices, name)


def _open_image(path: str | Path):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    path = _existing_file(path, "image")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"image {path} cannot be opened: corrupt or not an image ({e})") from e


def image_info(path: str | Path) -> ImageInfo:
    """Size of an image, after checking the file's structure (Pillow ``verify``, no full decode)."""
    with _open_image(path) as image:
        try:
            image.verify()
        except Exception as e:  # Pillow raises assorted types (SyntaxError, OSError, struct.error) here
            raise MediaError(f"image {path} is corrupt ({type(e).__name__}: {e})") from e
        width, height = image.size
    if width == 0 or height == 0:
        raise MediaError(f"image {path} is empty ({width}x{height})")
    return ImageInfo(width=width, height=height)


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as ``uint8 [H, W, 3]`` (RGB; alpha dropped, palettes and greyscale expanded);
    ``size=(H, W)`` resizes with bicubic filtering (what SigLIP's processor uses)."""
    from PIL import Image

    if size is not None:
        height, width = _check_size(size)
    with _open_image(path) as image:
        try:
            rgb = image.convert("RGB")
            if size is not None and rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
            pixels = np.array(rgb, dtype=np.uint8)  # a writable copy
        except (OSError, ValueError, SyntaxError) as e:
            raise MediaError(f"image {path} cannot be decoded: corrupt or truncated ({e})") from e
    if pixels.size == 0:
        raise MediaError(f"image {path} is empty ({pixels.shape[1]}x{pixels.shape[0]})")
    return pixels


def write_video(
    path: str | Path, frames_F_H_W_3: np.ndarray, fps: float, *, codec: str | None = None
) -> Path:
    """Write ``uint8 [F, H, W, 3]`` RGB frames as an mp4 (``yuv420p``); returns the path. Height and
    width must be even (4:2:0 chroma). Parent folders are created; the file appears complete or not
    at all.

    ``codec``: ``"libx264"`` (H.264 at crf 18, visually lossless; the default where the bundled
    FFmpeg has it) or ``"mpeg4"`` (MPEG-4 Part 2 at 2 bits per pixel; the fallback). libx264's
    output is not bit-exact from run to run (PyAV 18: a few clips in a hundred re-encode to other
    bytes, rarely other pixels); ``"mpeg4"`` is, so generators of test data use it.
    """
    import av

    frames = np.asarray(frames_F_H_W_3)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3]; got {frames.dtype} {list(frames.shape)}")
    n, height, width = frames.shape[:3]
    if n == 0:
        raise ValueError("frames is empty: a video needs at least one frame")
    if height % 2 or width % 2:
        raise ValueError(f"frame size {height}x{width} (HxW): yuv420p needs an even height and width")
    if not fps > 0:
        raise ValueError(f"fps={fps} is not valid: must be > 0")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix or '.mp4'}")
    rate = fractions.Fraction(fps).limit_denominator(1001)
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    if codec == "libx264":
        options, bit_rate = {"crf": "18"}, 0
    elif codec == "mpeg4":  # no crf in MPEG-4 Part 2: a generous bit rate instead
        options, bit_rate = {}, int(2 * width * height * rate)
    else:
        raise ValueError(f"codec={codec!r} is not supported: use 'libx264' or 'mpeg4' (or None)")
    if codec not in av.codecs_available:
        raise ValueError(f"codec={codec!r}: the FFmpeg bundled with PyAV {av.__version__} does not have it")
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = options
            if bit_rate:
                stream.bit_rate = bit_rate
            for i, pixels in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts = i  # in the encoder's time base, 1 / fps
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the encoder's delayed frames
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_pixels(
    frames_F_H_W_3: np.ndarray | torch.Tensor,
    image_size: int,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` frames → ``float32 [F, 3, S, S]`` for the vision tower.

    Each frame is resized to ``S x S`` without cropping or keeping the aspect ratio (what SigLIP's
    image processor does: bicubic resize to the square), scaled to ``[0, 1]``, then normalised with
    ``mean``/``std``; with SigLIP's defaults the result lies in ``[-1, 1]``.
    """
    if torch.is_tensor(frames_F_H_W_3):
        frames = frames_F_H_W_3
    else:
        array = np.asarray(frames_F_H_W_3)
        frames = torch.from_numpy(array if array.flags.writeable else array.copy())
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3]; got {frames.dtype} {list(frames.shape)}")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size={image_size!r} is not valid: must be an integer > 0")
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # [F, 3, H, W] in [0, 1]
    if x.shape[0] == 0:
        return x.new_zeros(0, 3, image_size, image_size)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False
        )
        x = x.clamp_(0.0, 1.0)  # bicubic overshoots at edges; uint8 resizers clamp the same way
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
