"""One source video curated in a single decoding pass: split, transcode, filter and embed.

PyAV decodes each frame once (with the codec's motion vectors exported); one swscale call takes it
to the output size (yuv420p, what the encoder takes), a second to the small BGR frame that shot
detection, exposure and optical flow look at. The :class:`~.split.Splitter` routes frames to clips
and :class:`_Clips` encodes them as they come, accumulating their scores; when a clip ends its
scores decide whether it stays (a dropped clip's file is deleted). Nothing but the splitter's
short look-ahead and a clip's first ``min_clip_seconds`` is held in memory.

A video that cannot be curated — missing, empty, corrupt, truncated, without a video stream, failing
to decode — gives a ``failed`` record with the error; it never raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from cupola.collections.world.curation.config import CurateConfig
from cupola.collections.world.curation.dedup import Embedder, load_embedder
from cupola.collections.world.curation.filters import (
    ClipScores,
    LearnedFilter,
    flow_motion,
    mv_motion,
    reasons,
)
from cupola.collections.world.curation.sources import Source, clip_key
from cupola.collections.world.curation.split import Splitter, clip_frame_limits
from cupola.collections.world.curation.transcode import ClipEncoder, FrameRate, output_size
from cupola.toolkit.data.video import MediaError

__all__ = ["curate_video"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Frame:
    """A decoded frame on its way through the splitter."""

    index: int
    time: float  # seconds since the video's first frame
    picture: Any  # av.VideoFrame, yuv420p at the output size
    small_bgr: np.ndarray  # uint8 [h, w, 3] at the detection size
    prev_small_bgr: np.ndarray | None  # the frame before's, for optical flow
    mv: float | None  # codec motion: displacement / short side (None: no vectors)


@dataclass(slots=True)
class _OpenClip:
    index: int
    shot: int
    scores: ClipScores
    rate: FrameRate
    start: _Frame | None = None
    last_index: int = 0
    last_time: float = 0.0
    frames: int = 0
    waiting: list[Any] = field(default_factory=list)  # pictures held until the clip is long enough
    encoder: ClipEncoder | None = None


def _luma(picture: Any) -> np.ndarray:
    """The Y plane of a yuv420p ``av.VideoFrame`` as ``uint8 [H, W]`` (a view, no copy)."""
    plane = picture.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


class _Clips:
    """The splitter's sink for one video: encodes, scores and decides each clip (see the module
    docstring); ``clips`` holds the records in time order."""

    def __init__(
        self,
        *,
        video: str,
        folder: Path,
        size: tuple[int, int],
        fps: Fraction,
        cfg: CurateConfig,
        learned: list[LearnedFilter],
        embedder: Embedder,
    ) -> None:
        from av.video.reformatter import VideoReformatter

        self.video, self.folder, self.size, self.fps, self.cfg = video, folder, size, fps, cfg
        self.learned, self.embedder = learned, embedder
        self.min_frames, _ = clip_frame_limits(cfg.split, float(fps))
        self.stride = max(1, round(float(fps) / cfg.filter.sample_fps))
        self.out_fps = FrameRate(fps, cfg.transcode.fps).out
        self.thumb_sizes = sorted({cfg.dedup.embed_size, *(f.cfg.size for f in learned)})
        self.thumbnailers = {s: VideoReformatter() for s in self.thumb_sizes}
        self.video_has_mv = False  # set by the decoder once any frame carried motion vectors
        self.clips: list[dict[str, Any]] = []
        self.current: _OpenClip | None = None

    def open(self, shot: int) -> None:
        self.current = _OpenClip(
            index=len(self.clips),
            shot=shot,
            scores=ClipScores(self.stride, float(self.fps)),
            rate=FrameRate(self.fps, self.cfg.transcode.fps),
        )

    def frame(self, index: int, item: _Frame) -> None:
        import cv2

        clip = self.current
        j = clip.frames
        if j == 0:
            clip.start = item
        clip.frames += 1
        clip.last_index, clip.last_time = index, item.time
        scores = clip.scores
        if j > 0 and item.mv is not None:
            scores.mv.append(item.mv)
        flow_needed = self.cfg.filter.motion == "flow" or not self.video_has_mv
        if flow_needed and scores.motion_sample(j) and item.prev_small_bgr is not None:
            scores.flow.append(
                flow_motion(
                    cv2.cvtColor(item.prev_small_bgr, cv2.COLOR_BGR2GRAY),
                    cv2.cvtColor(item.small_bgr, cv2.COLOR_BGR2GRAY),
                )
            )
        if scores.sample(j):
            scores.add_quality(_luma(item.picture), cv2.cvtColor(item.small_bgr, cv2.COLOR_BGR2GRAY))
            for size in self.thumb_sizes:
                thumb = self.thumbnailers[size].reformat(
                    item.picture, width=size, height=size, format="rgb24", interpolation="AREA"
                )
                scores.add_thumbnail(size, thumb.to_ndarray())
        if clip.rate.keep(j):
            if clip.encoder is not None:
                clip.encoder.write(item.picture)
            else:
                clip.waiting.append(item.picture)
        if clip.encoder is None and clip.frames >= self.min_frames:
            clip.encoder = ClipEncoder(
                self.folder / f"{clip_key(self.video, clip.index)}.mp4",
                *self.size,
                self.out_fps,
                self.cfg.transcode,
            )
            for picture in clip.waiting:
                clip.encoder.write(picture)
            clip.waiting.clear()

    def close(self) -> None:
        clip, self.current = self.current, None
        key = clip_key(self.video, clip.index)
        record: dict[str, Any] = {
            "key": key,
            "index": clip.index,
            "shot": clip.shot,
            "start_frame": clip.start.index,
            "end_frame": clip.last_index + 1,
            "start_s": round(clip.start.time, 6),
            "end_s": round(clip.last_time + 1 / float(self.fps), 6),
            "frames": clip.frames,
            "out_fps": round(float(self.out_fps), 6),
            "width": self.size[0],
            "height": self.size[1],
            "motion": None,
            "motion_method": None,
            "sharpness": None,
            "brightness": None,
            "clipped": None,
            **{f"learned_{f.cfg.name}": None for f in self.learned},
            "out_frames": 0,
            "bytes": 0,
            "file": None,
            "embedding": None,
            "caption": None,
        }
        if clip.encoder is None:  # fewer than min_clip_seconds: never encoded
            record.update(decision="dropped", reason="too_short")
            self.clips.append(record)
            return
        out_frames = clip.encoder.frames
        size = clip.encoder.close()
        record.update(clip.scores.summary())
        for model in self.learned:
            frames = clip.scores.thumbnails_at(model.cfg.size, model.cfg.frames)
            record[f"learned_{model.cfg.name}"] = round(model.score(frames), 6)
        why = reasons(record, self.cfg.filter, self.learned)
        if why:
            clip.encoder.path.unlink()
            record.update(decision="dropped", reason=",".join(why))
        else:
            embedding = self.embedder(
                clip.scores.thumbnails_at(self.cfg.dedup.embed_size, self.cfg.dedup.embed_frames)
            )
            record.update(
                decision="kept",
                reason=None,
                out_frames=out_frames,
                bytes=size,
                file=clip.encoder.path.name,
                embedding=[float(v) for v in np.asarray(embedding, dtype=np.float32).ravel()],
            )
        self.clips.append(record)

    def abort(self) -> None:
        if self.current is not None and self.current.encoder is not None:
            self.current.encoder.abort()
        self.current = None
        for record in self.clips:
            if record["file"]:
                (self.folder / record["file"]).unlink(missing_ok=True)
        self.clips = []


def _open(path: Path) -> Any:  # -> av.container.InputContainer
    import av

    if not path.exists():
        raise MediaError("the file does not exist")
    if not path.is_file():
        raise MediaError("not a file")
    if path.stat().st_size == 0:
        raise MediaError("empty file (0 bytes)")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as e:
        raise MediaError(
            f"cannot be opened: corrupt, truncated, or not a media file (FFmpeg: {e.strerror or e})"
        ) from e


def _video_stream(container: Any) -> Any:  # -> av.VideoStream
    streams = container.streams.video
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        held = ", ".join(f"{sum(s.type == k for s in container.streams)} {k}" for k in kinds) or "no streams"
        raise MediaError(f"holds no video stream ({held}): audio-only or not a video")
    stream = streams[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise MediaError(f"the video stream ({stream.codec_context.name}) reports no frame rate")
    return stream


def _time(frame: Any, index: int, fps: Fraction, first: float | None) -> float:
    if frame.time is None or first is None:
        return index / float(fps)
    return frame.time - first


def curate_video(
    source: Source,
    folder: Path,
    cfg: CurateConfig,
    learned: list[LearnedFilter] | None = None,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Curate ``source`` into ``folder`` (its kept clips' mp4s); returns ``{"video": record,
    "clips": [record, ...]}`` (see :mod:`~.manifest` for the fields). ``learned`` / ``embedder``:
    already loaded models (default: loaded from ``cfg``)."""
    import av
    from av.video.reformatter import VideoReformatter

    folder.mkdir(parents=True, exist_ok=True)
    path = Path(source.path)
    video: dict[str, Any] = {
        "key": source.key,
        "source": source.name,
        "status": "failed",
        "error": None,
        "size_bytes": path.stat().st_size if path.is_file() else None,
        "container": None,
        "codec": None,
        "width": None,
        "height": None,
        "fps": None,
        "frames": None,
        "duration_s": None,
        "shots": None,
    }
    sink: _Clips | None = None
    try:
        learned = [LearnedFilter(f) for f in cfg.filter.learned] if learned is None else learned
        embedder = load_embedder(cfg.dedup.embedding) if embedder is None else embedder
        with _open(path) as container:
            stream = _video_stream(container)
            fps = Fraction(stream.average_rate or stream.guessed_rate)
            context = stream.codec_context
            context.thread_count = 1  # parallel across videos instead
            if cfg.filter.motion == "mv":
                context.options = {"flags2": "+export_mvs"}
            video.update(container=container.format.name, codec=context.name, fps=round(float(fps), 6))
            to_output, to_small = VideoReformatter(), VideoReformatter()
            splitter: Splitter | None = None
            index, first_time, prev_small = -1, None, None
            try:
                for index, frame in enumerate(container.decode(stream)):
                    if splitter is None:  # sizes are known once a frame is decoded
                        video.update(width=frame.width, height=frame.height)
                        size = output_size(frame.width, frame.height, cfg.transcode.short_side)
                        small_w = min(size[0], cfg.split.detect_width)
                        small = (small_w, max(2, round(size[1] * small_w / size[0])))
                        first_time = frame.time
                        sink = _Clips(
                            video=source.key,
                            folder=folder,
                            size=size,
                            fps=fps,
                            cfg=cfg,
                            learned=learned,
                            embedder=embedder,
                        )
                        splitter = Splitter(cfg.split, fps, sink)
                    motion = (
                        mv_motion(frame, min(frame.width, frame.height))
                        if cfg.filter.motion == "mv"
                        else None
                    )
                    sink.video_has_mv |= motion is not None
                    picture = to_output.reformat(
                        frame, width=size[0], height=size[1], format="yuv420p", interpolation="AREA"
                    )
                    small_bgr = to_small.reformat(
                        picture, width=small[0], height=small[1], format="bgr24", interpolation="AREA"
                    ).to_ndarray()
                    item = _Frame(
                        index, _time(frame, index, fps, first_time), picture, small_bgr, prev_small, motion
                    )
                    splitter.push(index, item, small_bgr)
                    prev_small = small_bgr
            except av.FFmpegError as e:
                raise MediaError(
                    f"decoding failed after {index + 1} frames (FFmpeg: {e.strerror or e})"
                ) from e
            if splitter is None:
                raise MediaError(f"no frame of the {context.name} video stream could be decoded")
            splitter.finish()
        frames = index + 1
        video.update(
            status="ok", frames=frames, duration_s=round(frames / float(fps), 6), shots=splitter.shots
        )
        clips = sink.clips
    except Exception as e:  # one input's failure, whatever it is, is recorded against it
        if sink is not None:
            sink.abort()
        video["error"] = str(e) if isinstance(e, MediaError) else f"{type(e).__name__}: {e}"
        log.warning("%s failed: %s", source.name, video["error"])
        clips = []
    video["clips"] = len(clips)
    video["kept"] = sum(c["decision"] == "kept" for c in clips)
    return {"video": video, "clips": clips}
