"""The curation config: one dataclass per stage, loaded from YAML (``curate.yaml``) with dotted
``key=value`` overrides. Every threshold lives here; :func:`load_config` validates the whole tree,
and an error names the field, the value and what is allowed.

Units: seconds for lengths, frames per second for rates, pixels for sizes. Scores are documented
in :mod:`cupola.collections.world.curation.filters`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cupola.toolkit.config import (
    ConfigError,
    check_choice,
    check_positive,
    config_error,
    from_yaml,
    to_dict,
    to_yaml,
    validate,
)

__all__ = [
    "DETECTORS",
    "AnnotateConfig",
    "CurateConfig",
    "DedupConfig",
    "FilterConfig",
    "LearnedFilterConfig",
    "ShardConfig",
    "SplitConfig",
    "TranscodeConfig",
    "load_config",
    "parse_ratio",
    "per_video_settings",
]

DETECTORS = ("content", "adaptive")
MOTION_METHODS = ("mv", "flow")
CODECS = ("libx264", "mpeg4")
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)
CAPTIONERS = ("metadata", "vlm")
DEFAULT_CONFIG = Path(__file__).with_name("curate.yaml")


def _check_optional_range(owner: object, name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise config_error(owner, name, value, f"must lie in [{low}, {high}], or be null to turn it off")


def parse_ratio(text: str) -> float:
    """``"16:9"`` -> 16/9 (width over height)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", str(text))
    if not found or float(found[2]) == 0 or float(found[1]) == 0:
        raise ConfigError(f"aspect ratio {text!r} is not valid: write width:height, e.g. '16:9'")
    return float(found[1]) / float(found[2])


@dataclass(kw_only=True, slots=True)
class SplitConfig:
    """Shot detection (PySceneDetect) and cutting shots into clips.

    ``content`` compares consecutive frames in HSV and cuts where the change passes ``threshold``;
    ``adaptive`` cuts where a frame's change passes ``adaptive_threshold`` times its neighbours'
    average (and ``min_content_val``), which tolerates fast camera motion better. Detection runs on
    frames downscaled to ``detect_width`` pixels wide. Each shot loses ``trim_seconds`` at both ends
    (transition frames), is cut into clips of at most ``max_clip_seconds``, and a piece shorter than
    ``min_clip_seconds`` is recorded as ``too_short`` and not encoded.
    """

    detector: str = "content"
    threshold: float = 27.0
    adaptive_threshold: float = 3.0
    min_content_val: float = 15.0
    min_scene_seconds: float = 0.5
    min_clip_seconds: float = 2.0
    max_clip_seconds: float = 60.0
    trim_seconds: float = 0.1
    detect_width: int = 128

    def validate(self) -> None:
        check_choice(self, "detector", self.detector, DETECTORS)
        for name in ("threshold", "adaptive_threshold", "min_clip_seconds", "max_clip_seconds"):
            check_positive(self, name, getattr(self, name))
        for name in ("min_content_val", "min_scene_seconds", "trim_seconds"):
            check_positive(self, name, getattr(self, name), allow_zero=True)
        if self.max_clip_seconds < self.min_clip_seconds:
            raise config_error(
                self,
                "max_clip_seconds",
                self.max_clip_seconds,
                f"must be >= min_clip_seconds ({self.min_clip_seconds})",
            )
        if not isinstance(self.detect_width, int) or self.detect_width < 16:
            raise config_error(self, "detect_width", self.detect_width, "must be an integer >= 16")


@dataclass(kw_only=True, slots=True)
class TranscodeConfig:
    """Clips are re-encoded with PyAV to mp4 (yuv420p): ``libx264`` at ``crf`` with an x264
    ``preset``, or ``mpeg4`` (MPEG-4 Part 2) where an FFmpeg build lacks x264.

    ``short_side``: frames are scaled so their shorter side is this many pixels (aspect kept, even
    sizes; never upscaled); null keeps the source size. ``fps``: frames are dropped to reach this
    rate (never duplicated: a slower source keeps its own rate); null keeps the source rate.
    """

    short_side: int | None = 256
    fps: float | None = None
    codec: str = "libx264"
    preset: str = "veryfast"
    crf: int = 23

    def validate(self) -> None:
        if self.short_side is not None and (not isinstance(self.short_side, int) or self.short_side < 16):
            raise config_error(self, "short_side", self.short_side, "must be an integer >= 16, or null")
        if self.fps is not None:
            check_positive(self, "fps", self.fps)
        check_choice(self, "codec", self.codec, CODECS)
        check_choice(self, "preset", self.preset, X264_PRESETS)
        if not isinstance(self.crf, int) or not 0 <= self.crf <= 51:
            raise config_error(self, "crf", self.crf, "must be an integer in [0, 51] (lower: better quality)")


@dataclass(kw_only=True, slots=True)
class LearnedFilterConfig:
    """A clip classifier from a local file: TorchScript (``torch.jit.save``) or a pickled
    ``nn.Module`` (``torch.save(model)``; only load files you trust). It takes ``frames`` frames
    of the clip as ``float32 [N, 3, size, size]`` in [0, 1] and returns ``[N]`` or ``[N, 1]``
    scores; the clip's score (the mean) must lie in [``min_score``, ``max_score``] or the clip is
    dropped with reason ``learned:<name>``."""

    name: str
    path: str
    min_score: float | None = None
    max_score: float | None = None
    size: int = 64
    frames: int = 4

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(self.name)):
            raise config_error(self, "name", self.name, "must be letters, digits and '_' (it names a column)")
        if self.min_score is None and self.max_score is None:
            raise config_error(self, "min_score", None, "give min_score or max_score (or both)")
        for name in ("size", "frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise config_error(self, name, getattr(self, name), "must be an integer >= 1")


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    """Scores measured on every clip, and the ranges a kept clip must fall in (null: no limit).

    - motion: mean displacement per second as a fraction of the frame's short side, from the
      codec's motion vectors (``mv``; intra-only codecs fall back to flow) or from Farnebäck optical
      flow on small frames (``flow``);
    - sharpness: variance of the Laplacian of the luma at the transcoded size (low: blurry);
    - brightness: mean luma in [0, 1]; clipped: fraction of pixels at black or white.

    Scores come from frames sampled ``sample_fps`` times a second.
    """

    motion: str = "mv"
    min_motion: float | None = 0.01
    max_motion: float | None = None
    min_sharpness: float | None = 25.0
    min_brightness: float | None = 0.1
    max_brightness: float | None = 0.9
    max_clipped: float | None = 0.6
    sample_fps: float = 4.0
    learned: list[LearnedFilterConfig] = field(default_factory=list)

    def validate(self) -> None:
        check_choice(self, "motion", self.motion, MOTION_METHODS)
        for name in ("min_motion", "max_motion", "min_sharpness"):
            if getattr(self, name) is not None:
                check_positive(self, name, getattr(self, name), allow_zero=True)
        for name in ("min_brightness", "max_brightness", "max_clipped"):
            _check_optional_range(self, name, getattr(self, name), 0.0, 1.0)
        check_positive(self, "sample_fps", self.sample_fps)
        names = [f.name for f in self.learned]
        if len(set(names)) != len(names):
            raise config_error(self, "learned", names, "each learned filter needs its own name")


@dataclass(kw_only=True, slots=True)
class AnnotateConfig:
    """Captions for kept clips: ``metadata`` (from the clip's source, length, size, motion and
    exposure; no model) or ``vlm``: a cupola VLM run (``vlm_checkpoint``: its output_dir or a
    checkpoint folder; ``tokenizer``: default the run's) answers ``prompt`` about ``frames`` frames
    sampled uniformly, greedily, in ``workers`` Ray actors."""

    captioner: str = "metadata"
    vlm_checkpoint: str | None = None
    tokenizer: str | None = None
    prompt: str = "Describe this video in one sentence."
    frames: int = 8
    max_new_tokens: int = 48
    workers: int = 1
    device: str = "cpu"

    def validate(self) -> None:
        check_choice(self, "captioner", self.captioner, CAPTIONERS)
        if self.captioner == "vlm" and not self.vlm_checkpoint:
            raise config_error(
                self,
                "vlm_checkpoint",
                self.vlm_checkpoint,
                "captioner 'vlm' needs a local cupola VLM run (its output_dir) or checkpoint folder",
            )
        for name in ("frames", "max_new_tokens", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise config_error(self, name, getattr(self, name), "must be an integer >= 1")


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    """Semantic deduplication of the clips that passed the filters.

    ``embedding``: ``thumbnail`` (colour thumbnails and HSV histograms of ``embed_frames`` frames
    resized to ``embed_size``, no model), ``"module:function"`` (``function(frames_uint8_N_S_S_3)
    -> vector``), or a local TorchScript / torch file (``[N, 3, S, S]`` in [0, 1] -> ``[N, D]``,
    averaged). Clips are clustered by k-means (about ``clips_per_cluster`` per cluster, ``seed``);
    inside a cluster, in key order, a clip within cosine distance ``threshold`` of a clip already
    kept is dropped as ``duplicate_of:<that clip's key>``.
    """

    enabled: bool = True
    embedding: str = "thumbnail"
    embed_size: int = 32
    embed_frames: int = 8
    threshold: float = 0.03
    clips_per_cluster: int = 64
    seed: int = 0

    def validate(self) -> None:
        for name in ("embed_size", "embed_frames", "clips_per_cluster"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise config_error(self, name, getattr(self, name), "must be an integer >= 1")
        if not 0.0 <= self.threshold <= 2.0:
            raise config_error(self, "threshold", self.threshold, "is a cosine distance: must lie in [0, 2]")


@dataclass(kw_only=True, slots=True)
class ShardConfig:
    """webdataset tars, one folder per group ``<short side>p_<aspect>_<length bucket>``: the nearest
    of ``aspect_ratios`` (width:height) and the bucket of ``length_buckets`` (edges in seconds) the
    clip's length falls in; a shard holds at most ``max_clips`` clips and about ``max_megabytes``."""

    max_clips: int = 500
    max_megabytes: float = 1024.0
    aspect_ratios: list[str] = field(default_factory=lambda: ["1:1", "4:3", "3:4", "16:9", "9:16", "21:9"])
    length_buckets: list[float] = field(default_factory=lambda: [2.0, 5.0, 10.0, 20.0, 60.0])

    def validate(self) -> None:
        if not isinstance(self.max_clips, int) or self.max_clips < 1:
            raise config_error(self, "max_clips", self.max_clips, "must be an integer >= 1")
        check_positive(self, "max_megabytes", self.max_megabytes)
        if not self.aspect_ratios:
            raise config_error(self, "aspect_ratios", self.aspect_ratios, "give at least one, e.g. ['16:9']")
        for ratio in self.aspect_ratios:
            parse_ratio(ratio)
        edges = list(self.length_buckets)
        if not edges or any(e <= 0 for e in edges) or edges != sorted(set(edges)):
            raise config_error(
                self, "length_buckets", edges, "must be increasing positive seconds, e.g. [2, 5, 10]"
            )


@dataclass(kw_only=True, slots=True)
class CurateConfig:
    """The whole pipeline. ``num_cpus``: CPUs of the local Ray instance (null: all of the
    machine's; ignored with ``--ray-address``)."""

    split: SplitConfig = field(default_factory=SplitConfig)
    transcode: TranscodeConfig = field(default_factory=TranscodeConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    num_cpus: int | None = None

    def validate(self) -> None:
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus < 1):
            raise config_error(self, "num_cpus", self.num_cpus, "must be an integer >= 1, or null")


def per_video_settings(cfg: CurateConfig) -> dict[str, Any]:
    """The settings a finished video's clips depend on; a resumed run must use the same ones
    (dedup's threshold and clustering, and sharding, are global steps that may change)."""
    plain = to_dict(cfg)
    dedup = plain["dedup"]
    return {
        "split": plain["split"],
        "transcode": plain["transcode"],
        "filter": plain["filter"],
        "annotate": plain["annotate"],
        "embedding": {k: dedup[k] for k in ("embedding", "embed_size", "embed_frames")},
    }


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> CurateConfig:
    """The config in ``path`` (YAML; default: the defaults, which the packaged ``curate.yaml``
    spells out) with dotted ``key=value`` overrides (``split.threshold=30``), validated."""
    if path is None:
        source: str | Path = to_yaml(CurateConfig())
    else:
        source = Path(path).expanduser()
        if not source.is_file():
            raise FileNotFoundError(
                f"config {source} does not exist: pass --config a YAML file like {DEFAULT_CONFIG}"
            )
    try:
        cfg = from_yaml(CurateConfig, source, list(overrides))
    except TypeError as e:  # a required field left out (e.g. a learned filter without a path)
        raise ConfigError(f"{path}: {e}") from e
    return validate(cfg)
