"""Fixed-length video clips for training causal video tokenizers.

Sources (:class:`VideoClipDataset`'s ``source``; a list mixes them, in order):

- a folder: every ``*.mp4``, ``*.mov``, ``*.mkv``, ``*.webm`` below it (recursive, sorted by path;
  hidden files — such as :func:`~cupola.toolkit.data.video.write_video`'s unfinished temporaries —
  are left out); id = the path relative to the folder, without its suffix. A folder holding no
  videos but ``.tar`` files is read as shards (below).
- a video file (id = its stem), or a glob (``"clips/*.mp4"``, ``"shards/*.tar"``, sorted).
- a ``.txt`` list: one video or ``.tar`` path a line (relative to the list's folder; blank lines and
  ``#`` comments ignored); id = the line without its suffix.
- webdataset shards: plain (uncompressed) ``.tar`` files whose members are ``<key>.mp4`` (any of
  the suffixes above), optionally with ``<key>.json`` metadata — what the curation pipeline writes.
  The key is the member's path up to the first ``.`` of its file name (webdataset's rule); id = key.

Tar shards are read with the standard library's ``tarfile``, not the ``webdataset`` package: this
dataset is map-style (random access by index, every video probed once at construction, clip draws
keyed by index, sharding and mid-epoch resume by the sampler), while ``webdataset.WebDataset`` is an
``IterableDataset`` that streams shards in order with its own sharding, shuffling and resume
semantics, and its random-access reader (``wids``) needs a separate JSON shard index. ``tarfile``
lists each shard once (headers only: each member's byte offset and size), and an item then reads
exactly its member's bytes with one seek. The bytes are decoded from memory (decord reads
file-like objects; the pixels equal those of the same file on disk): no extraction cache to keep in
step with the shards or to fill a disk with a second copy of the data.

Clips: ``num_frames`` frames taken every ``frame_stride``-th frame (a window of
``(num_frames - 1) * frame_stride + 1`` source frames), resized inside the decoder so the short side
is ``size`` (aspect ratio kept), then cropped to ``size x size`` — square, because tokenizer training
wants fixed shapes and the spatial compression divides a square as well as any rectangle. Training
clips (``train=True``) take the window's start and the crop's place along the long side at random;
validation clips the temporal centre and the centre crop. Only the clip's frames are decoded
(:func:`~cupola.toolkit.data.video.read_frames_at`).

A causal tokenizer encodes the first frame alone and then groups of ``temporal_compression`` frames:
``num_frames`` must be ``1 + k * temporal_compression`` (:func:`check_num_frames`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cupola.toolkit.config import ConfigError, check_choice, config_error
from cupola.toolkit.data.video import MediaError, VideoInfo, probe_video, read_frames_at

__all__ = ["VIDEO_SUFFIXES", "VideoClipDataset", "VideoRef", "check_num_frames", "clip_span", "find_videos"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
ON_BAD_MEDIA = ("error", "skip")


def check_num_frames(num_frames: int, temporal_compression: int) -> int:
    """Check that a causal tokenizer with ``temporal_compression`` takes clips of ``num_frames``
    (``1 + k * temporal_compression``); returns the latent frame count ``1 + k``."""
    if not isinstance(temporal_compression, int) or temporal_compression < 1:
        raise config_error(
            "check_num_frames", "temporal_compression", temporal_compression, "must be an integer >= 1"
        )
    tc = temporal_compression
    if isinstance(num_frames, int) and not isinstance(num_frames, bool) and num_frames >= 1:
        if (num_frames - 1) % tc == 0:
            return (num_frames - 1) // tc + 1
        k = (num_frames - 1) // tc
        nearest = f"{1 + k * tc} = 1 + {k}*{tc} or {1 + (k + 1) * tc} = 1 + {k + 1}*{tc}"
    else:
        nearest = f"{1 + tc} = 1 + 1*{tc}"
    raise ConfigError(
        f"num_frames={num_frames!r} is not valid for temporal_compression={tc}: a causal tokenizer "
        f"encodes the first frame alone, then groups of {tc}, so num_frames must be 1 + k*{tc} "
        f"(1, {1 + tc}, {1 + 2 * tc}, {1 + 3 * tc}, ...); nearest: {nearest}"
    )


def clip_span(num_frames: int, frame_stride: int) -> int:
    """Source frames a clip covers: ``(num_frames - 1) * frame_stride + 1``."""
    return (num_frames - 1) * frame_stride + 1


def _check_int(owner: object, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise config_error(owner, name, value, f"must be an integer >= {minimum}")


@dataclass(frozen=True, slots=True)
class VideoRef:
    """One video: a file, or a member of a tar shard (``member``, its data at ``offset``, ``size`` bytes)."""

    id: str
    path: Path
    member: str | None = None
    offset: int = 0
    size: int = 0
    meta: tuple[int, int] | None = None  # the <key>.json member's (offset, size)

    @property
    def name(self) -> str:
        """How errors name it: the path, or ``shard.tar:member``."""
        return f"{self.path}:{self.member}" if self.member is not None else str(self.path)

    def _read(self, offset: int, size: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise MediaError(f"video {self.name} cannot be read: {e}") from e
        if len(data) != size:
            raise MediaError(
                f"video {self.name}: the shard ends inside it (the shard changed since it was listed)"
            )
        return data

    def source(self) -> Path | bytes:
        """What the video helpers read: the file's path, or the member's bytes."""
        return self.path if self.member is None else self._read(self.offset, self.size)

    def metadata(self) -> dict[str, Any] | None:
        if self.meta is None:
            return None
        return json.loads(self._read(*self.meta))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _split_key(member: str) -> tuple[str, str]:
    """webdataset's rule: ``"a/b/0001.seg.mp4"`` -> key ``"a/b/0001"``, extension ``"seg.mp4"``."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _shard(path: Path) -> list[VideoRef]:
    """The videos of one tar shard, in member order: each key's first video member, with its json."""
    videos: dict[str, tarfile.TarInfo] = {}
    metas: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if f".{ext}" in VIDEO_SUFFIXES:
                    videos.setdefault(key, m)
                elif ext == "json":
                    metas.setdefault(key, m)
    except (tarfile.TarError, OSError) as e:
        raise MediaError(
            f"tar shard {path} cannot be listed: corrupt, truncated, or compressed (shards must be plain "
            f".tar files, read by byte offset) ({e})"
        ) from e
    return [
        VideoRef(
            id=key,
            path=path,
            member=m.name,
            offset=m.offset_data,
            size=m.size,
            meta=(metas[key].offset_data, metas[key].size) if key in metas else None,
        )
        for key, m in videos.items()
    ]


def _file(path: Path, video_id: str) -> list[VideoRef]:
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return [VideoRef(id=video_id, path=path.resolve())]
    if suffix == ".tar":
        return _shard(path.resolve())
    raise ConfigError(
        f"{path} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a .tar shard; a source is a folder, "
        "a video, a .txt list of videos or shards, a .tar shard, or a glob of those"
    )


def _folder(root: Path) -> list[VideoRef]:
    def below(suffixes: tuple[str, ...]) -> list[Path]:
        return sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()
        )

    videos, shards = below(VIDEO_SUFFIXES), below((".tar",))
    if videos and shards:
        raise ConfigError(
            f"folder {root} holds both videos ({len(videos)}, e.g. {videos[0]}) and .tar shards "
            f"({len(shards)}, e.g. {shards[0]}): point at one kind (a subfolder, or a glob such as "
            f"'{root}/*.tar')"
        )
    if not videos and not shards:
        raise ConfigError(f"folder {root} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no .tar shards")
    if shards:
        return [v for s in shards for v in _shard(s.resolve())]
    return [VideoRef(id=p.relative_to(root).with_suffix("").as_posix(), path=p.resolve()) for p in videos]


def _listed(list_file: Path) -> list[VideoRef]:
    found = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else list_file.parent / path
        if path.suffix.lower() in VIDEO_SUFFIXES:  # a missing one is bad media, found by the probe
            found.append(VideoRef(id=str(Path(entry).with_suffix("")), path=path.resolve()))
        elif path.is_file():
            found += _file(path, path.stem)
        else:
            raise FileNotFoundError(f"{list_file}:{n}: {entry!r} is not a file")
    return found


def find_videos(source: str | Path | list[str | Path]) -> list[VideoRef]:
    """Every video that ``source`` names (see the module docstring), in order."""
    if isinstance(source, (list, tuple)):
        return [v for s in source for v in find_videos(s)]
    text = os.path.expanduser(str(source))
    path = Path(text)
    if not path.exists() and _is_glob(text):
        files = [Path(m) for m in sorted(glob.glob(text, recursive=True)) if Path(m).is_file()]
        if not files:
            raise FileNotFoundError(f"{str(source)!r} matches no files")
        return [v for f in files for v in _file(f, f.stem)]
    if not path.exists():
        raise FileNotFoundError(f"{str(source)!r} does not exist")
    if path.is_dir():
        return _folder(path)
    if path.suffix.lower() == ".txt":
        return _listed(path)
    return _file(path, path.stem)


class VideoClipDataset(Dataset):
    """One clip per video (see the module docstring):
    ``{"video": float32 [3, T, H, W] in [-1, 1], "id": str}`` with ``T = num_frames``,
    ``H = W = size``.

    The clip's start and crop come from ``numpy.random.default_rng((seed, epoch, index))``: the same
    for the same seed, epoch and index on every rank, worker and resumed run. ``dataset[i]`` draws
    in the epoch of :meth:`set_epoch`; ``dataset[(epoch, i)]`` in the one given, which is what
    :class:`~cupola.collections.world.data.datamodule.EpochIndexSampler` yields, so loader workers
    never hold a stale epoch. Validation clips (``train=False``) do not depend on the epoch.

    Every video is probed once, here (frame count, frame rate, size; its first frame decoded).
    ``on_bad_media``: an unreadable video, or one shorter than the clip (:func:`clip_span`), raises
    :class:`~cupola.toolkit.data.video.MediaError` naming the file and the fix (``"error"``), or is
    left out with one warning per file (``"skip"``), counted in :attr:`stats`. A video that fails
    later, when its clip is decoded (the file changed, or is damaged past its first frame), raises
    likewise, or under ``"skip"`` gives way, with a warning, to the next video that reads.
    """

    def __init__(
        self,
        source: str | Path | list[str | Path],
        *,
        num_frames: int,
        size: int,
        frame_stride: int = 1,
        train: bool = True,
        seed: int = 0,
        on_bad_media: str = "error",
    ) -> None:
        _check_int(self, "num_frames", num_frames, 1)
        _check_int(self, "size", size, 1)
        _check_int(self, "frame_stride", frame_stride, 1)
        _check_int(self, "seed", seed, 0)
        check_choice(self, "on_bad_media", on_bad_media, ON_BAD_MEDIA)
        self.source = source
        self.num_frames, self.size, self.frame_stride = num_frames, size, frame_stride
        self.train, self.seed, self.on_bad_media = train, seed, on_bad_media
        self.epoch = 0
        self.skipped_bad_media = 0
        self.skipped_too_short = 0
        self.bad_files: dict[str, str] = {}  # name -> why it cannot be used
        self.videos: list[VideoRef] = []
        self.infos: list[VideoInfo] = []
        span = clip_span(num_frames, frame_stride)
        for video in find_videos(source):
            try:
                info = probe_video(video.source(), name=video.name)
            except MediaError as e:
                self._bad(video, str(e), "Remove or re-encode it")
                self.skipped_bad_media += 1
                continue
            if info.frames < span:
                why = (
                    f"video {video.name} holds {info.frames} frames; a clip of num_frames={num_frames} "
                    f"at frame_stride={frame_stride} needs {span}"
                )
                self._bad(video, why, "Lower num_frames or frame_stride, or remove the video")
                self.skipped_too_short += 1
                continue
            self.videos.append(video)
            self.infos.append(info)
        if not self.videos:
            raise ValueError(
                f"{source}: no usable videos ({self.skipped_bad_media} unreadable, {self.skipped_too_short} "
                f"shorter than the {span} frames a clip covers)"
            )
        log.info("%s: %s", source, self.stats)

    def _bad(self, video: VideoRef, why: str, fix: str) -> None:
        if self.on_bad_media == "error":
            raise MediaError(f"{why}. {fix}, or pass on_bad_media='skip' to leave such videos out")
        if video.name not in self.bad_files:
            log.warning("skipping video %s: %s", video.name, why)
        self.bad_files[video.name] = why

    @property
    def stats(self) -> dict[str, int]:
        return {
            "videos": len(self.videos),
            "frames": sum(info.frames for info in self.infos),
            "skipped_bad_media": self.skipped_bad_media,
            "skipped_too_short": self.skipped_too_short,
            "bad_files": len(self.bad_files),
        }

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``dataset[i]`` draws its clips in."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.videos)

    def resized(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of video ``index``'s frames once its short side is ``size`` (what is cropped)."""
        info = self.infos[index]
        scale = self.size / min(info.height, info.width)
        return max(self.size, round(info.height * scale)), max(self.size, round(info.width * scale))

    def clip_window(self, index: int, epoch: int | None = None) -> tuple[int, int, int]:
        """``(first frame, top, left)`` of video ``index``'s clip in ``epoch`` (default: the
        dataset's): frames ``first + frame_stride * t``, rows ``top:top + size`` and columns
        ``left:left + size`` of the resized frames (:meth:`resized`)."""
        epoch = self.epoch if epoch is None else int(epoch)
        frames = self.infos[index].frames - clip_span(self.num_frames, self.frame_stride) + 1
        height, width = self.resized(index)
        rows, cols = height - self.size + 1, width - self.size + 1
        if not self.train:
            return (frames - 1) // 2, (rows - 1) // 2, (cols - 1) // 2
        rng = np.random.default_rng((self.seed, epoch, index))
        return int(rng.integers(frames)), int(rng.integers(rows)), int(rng.integers(cols))

    def _clip(self, index: int, epoch: int) -> dict[str, Any]:
        video, info = self.videos[index], self.infos[index]
        first, top, left = self.clip_window(index, epoch)
        resized = self.resized(index)
        frames_T_H_W_3 = read_frames_at(
            video.source(),
            range(first, first + clip_span(self.num_frames, self.frame_stride), self.frame_stride),
            size=None if resized == (info.height, info.width) else resized,
            name=video.name,
        )
        crop = frames_T_H_W_3[:, top : top + self.size, left : left + self.size]
        x_3_T_H_W = torch.from_numpy(np.ascontiguousarray(crop)).permute(3, 0, 1, 2).float()
        return {"video": x_3_T_H_W.div_(127.5).sub_(1.0).contiguous(), "id": video.id}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} videos")
        for attempt in range(len(self)):
            j = (index + attempt) % len(self)
            try:
                return self._clip(j, int(epoch))
            except MediaError as e:
                if self.on_bad_media == "error":
                    raise MediaError(
                        f"{e}. It was probed fine when the dataset was built; rebuild the dataset, or pass "
                        "on_bad_media='skip' to replace its clips by the next video's"
                    ) from e
                name = self.videos[j].name
                if name not in self.bad_files:
                    log.warning("video %s cannot be read, using the next video's clip: %s", name, e)
                self.bad_files[name] = str(e)
        raise MediaError(f"{self.source}: none of its {len(self)} videos can be read any more")

    def metadata(self, index: int) -> dict[str, Any] | None:
        """The ``<key>.json`` beside video ``index`` in its tar shard, or ``None``."""
        return self.videos[index].metadata()

    def __repr__(self) -> str:
        return (
            f"VideoClipDataset({str(self.source)!r}, num_frames={self.num_frames}, size={self.size}, "
            f"frame_stride={self.frame_stride}, train={self.train}: {self.stats})"
        )
