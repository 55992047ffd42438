"""The curation stages one at a time, without Ray: config loading, sources and keys, shot splitting,
transcoding, the filters' scores, deduplication and deterministic shards."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from cupola.collections.world.curation import Shot, load_config, write_shot_video
from cupola.collections.world.curation.config import DEFAULT_CONFIG, TranscodeConfig, per_video_settings
from cupola.collections.world.curation.dedup import load_embedder, semantic_dedup, thumbnail_embedding
from cupola.collections.world.curation.filters import LearnedFilter, exposure, flow_motion, reasons, sharpness
from cupola.collections.world.curation.process import curate_video
from cupola.collections.world.curation.shard import group_name, plan_shards, write_shard
from cupola.collections.world.curation.sources import Source, find_sources, video_key
from cupola.collections.world.curation.split import Splitter
from cupola.collections.world.curation.transcode import ClipEncoder, FrameRate, output_size
from cupola.toolkit.config import ConfigError

# --- config ----------------------------------------------------------------------------------------


def test_the_packaged_curate_yaml_spells_out_the_defaults():
    assert load_config(DEFAULT_CONFIG) == load_config()


def test_overrides_apply_and_bad_settings_name_the_field_and_what_is_allowed(tmp_path):
    cfg = load_config(overrides=["split.threshold=30", "filter.min_motion=null", "shard.max_clips=7"])
    assert (cfg.split.threshold, cfg.filter.min_motion, cfg.shard.max_clips) == (30.0, None, 7)
    bad = {
        "split.detector=histogram": r"SplitConfig.detector='histogram' is not valid: choose one of",
        "split.max_clip_seconds=1": r"max_clip_seconds=1.0 is not valid: must be >= min_clip_seconds",
        "filter.max_brightness=1.5": r"FilterConfig.max_brightness=1.5 is not valid: must lie in \[0.0, 1.0\]",
        "shard.aspect_ratios=['16/9']": r"aspect ratio '16/9' is not valid: write width:height",
        "annotate.captioner=vlm": r"captioner 'vlm' needs a local cupola VLM run",
        "filter.learned=[{name: a, path: m.pt}]": r"give min_score or max_score",
        "filter.learned=[{name: a, path: m.pt, max_score: 1}, {name: a, path: n.pt, max_score: 1}]": (
            r"each learned filter needs its own name"
        ),
        "filter.learned=[{name: a, max_score: 1}]": r"path",
        "dedup.treshold=0.1": r"unknown field 'treshold'. Did you mean: threshold",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[override])
    with pytest.raises(FileNotFoundError, match=r"nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_only_per_video_settings_bind_a_resumed_run():
    base = per_video_settings(load_config())
    for global_setting in (
        "dedup.threshold=0.1",
        "dedup.clips_per_cluster=4",
        "shard.max_clips=3",
        "num_cpus=1",
    ):
        assert per_video_settings(load_config(overrides=[global_setting])) == base, global_setting
    for per_video in (
        "split.threshold=30",
        "transcode.crf=30",
        "filter.min_motion=0.1",
        "dedup.embed_size=16",
    ):
        assert per_video_settings(load_config(overrides=[per_video])) != base, per_video


# --- sources ---------------------------------------------------------------------------------------


def test_a_folder_gives_its_videos_sorted_by_key_without_hidden_files_or_the_output(tmp_path):
    root = tmp_path / "in"
    for name in ("b.mp4", "a/c.MOV", "a/d.avi", ".hidden.mp4", ".cache/e.mp4", "out/f.mp4", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    sources, ignored = find_sources(root, exclude=root / "out")
    assert sorted(s.name for s in sources) == ["a/c.MOV", "a/d.avi", "b.mp4"]
    assert [s.key for s in sources] == sorted(s.key for s in sources) and ignored == ["notes.txt"]
    assert all(Path(s.path).is_file() and "." not in s.key for s in sources)


def test_keys_are_stable_webdataset_safe_and_distinct_for_paths_that_sanitise_alike():
    assert video_key("a b/c.d.mp4") == video_key("a b/c.d.mp4")
    assert video_key("a b/c.mp4") != video_key("a_b/c.mp4")
    assert video_key("a b/c.mp4").startswith("a_b_c-")
    assert "." not in video_key("x.y/z.tar.mp4")


def test_a_txt_list_resolves_relative_paths_skips_comments_and_keeps_missing_files(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("# my videos\n\nv/a.mp4\nv/a.mp4\nv/missing.mp4\n")
    sources, _ = find_sources(listing)
    assert {s.name: s.path for s in sources} == {
        "v/a.mp4": str(tmp_path / "v" / "a.mp4"),
        "v/missing.mp4": str(tmp_path / "v" / "missing.mp4"),
    }
    missing = next(s for s in sources if s.name == "v/missing.mp4")
    result = curate_video(missing, tmp_path / "work", load_config())
    assert result["video"]["status"] == "failed" and result["video"]["error"] == "the file does not exist"
    with pytest.raises(ConfigError, match=r"neither a folder nor a .txt list"):
        find_sources(tmp_path / "v" / "a.mp4")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        find_sources(tmp_path / "nowhere")


# --- split -----------------------------------------------------------------------------------------


class RecordingSink:
    def __init__(self) -> None:
        self.clips: list[tuple[int, list[int]]] = []  # (shot, frame indices)
        self.open_clip = False

    def open(self, shot: int) -> None:
        assert not self.open_clip, "a clip was opened before the previous one was closed"
        self.open_clip = True
        self.clips.append((shot, []))

    def frame(self, index: int, item: object) -> None:
        assert self.open_clip and item == index
        self.clips[-1][1].append(index)

    def close(self) -> None:
        self.open_clip = False


def test_shots_are_cut_where_the_scene_changes_then_trimmed_and_cut_into_clips():
    # three shots of 40, 60 and 10 frames at 8 fps; clips of at most 3 s (24 frames); trim 0.1 s (1 frame)
    cfg = load_config(overrides=["split.max_clip_seconds=3"]).split
    sink = RecordingSink()
    splitter = Splitter(cfg, Fraction(8), sink)
    scenes = [np.random.default_rng(k).integers(0, 256, (36, 64, 3), dtype=np.uint8) for k in range(3)]
    frames = [k for k, n in enumerate((40, 60, 10)) for _ in range(n)]
    for index, scene in enumerate(frames):
        splitter.push(index, index, scenes[scene])
    splitter.finish()
    assert splitter.shots == 3 and not sink.open_clip
    spans = [(shot, idx[0], idx[-1] + 1) for shot, idx in sink.clips]
    assert spans == [(0, 1, 25), (0, 25, 39), (1, 41, 65), (1, 65, 89), (1, 89, 99), (2, 101, 109)]
    for _, idx in sink.clips:
        assert idx == list(range(idx[0], idx[-1] + 1))  # consecutive frames, in order


# --- transcode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "short_side", "expected"),
    [
        ((1920, 1080), 256, (456, 256)),
        ((1080, 1920), 256, (256, 456)),
        ((96, 64), 256, (96, 64)),
        ((97, 63), None, (96, 64)),
    ],
)
def test_output_size_scales_the_short_side_down_never_up_and_keeps_sizes_even(source, short_side, expected):
    assert output_size(*source, short_side) == expected


def test_frame_rate_drops_frames_evenly_and_never_duplicates():
    keep = FrameRate(Fraction(30), 10.0)
    kept = [j for j in range(30) if keep.keep(j)]
    assert keep.out == 10 and kept == list(range(0, 30, 3))
    assert FrameRate(Fraction(8), 24.0).out == 8 and all(
        FrameRate(Fraction(8), 24.0).keep(j) for j in range(8)
    )
    assert FrameRate(Fraction(30000, 1001), None).out == Fraction(30000, 1001)


@pytest.fixture(scope="module")
def scene_frames(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """18 yuv420p frames of a moving generated scene, 96x64."""
    path = write_shot_video(tmp_path_factory.mktemp("scene") / "s.mp4", [Shot(2.25, 7)], size=(64, 96))
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]


def test_the_same_frames_encode_to_the_same_bytes_whatever_ran_in_between(scene_frames, tmp_path):
    # what makes resumed runs equal uninterrupted ones; OpenCV's allocations between the frames
    # used to change x264's mb-tree decisions on AVX-512 machines
    rng = np.random.default_rng(0)
    encoded = set()
    for n in range(6):
        encoder = ClipEncoder(tmp_path / f"c{n}.mp4", 96, 64, Fraction(8), TranscodeConfig())
        for frame in scene_frames:
            encoder.write(av.VideoFrame.from_ndarray(frame, format="yuv420p"))
            noise = rng.integers(0, 256, (64, 96), dtype=np.uint8)
            cv2.calcOpticalFlowFarneback(noise, noise, None, 0.5, 2, 9, 2, 5, 1.1, 0)
        assert not encoder.path.exists()  # the file appears only when it is complete
        encoder.close()
        encoded.add(encoder.path.read_bytes())
    assert len(encoded) == 1
    aborted = ClipEncoder(tmp_path / "aborted.mp4", 96, 64, Fraction(8), TranscodeConfig())
    aborted.write(av.VideoFrame.from_ndarray(scene_frames[0], format="yuv420p"))
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"c{n}.mp4" for n in range(6)]


# --- filters ---------------------------------------------------------------------------------------


def test_scores_see_blur_exposure_and_motion():
    rng = np.random.default_rng(0)
    texture = cv2.resize(
        rng.integers(0, 256, (16, 24), dtype=np.uint8), (96, 64), interpolation=cv2.INTER_NEAREST
    )
    assert sharpness(cv2.GaussianBlur(texture, (0, 0), 3)) < 0.1 * sharpness(texture)
    assert exposure(np.zeros((8, 8), np.uint8)) == (0.0, 1.0)
    assert exposure(np.full((8, 8), 255, np.uint8)) == (1.0, 1.0)
    brightness, clipped = exposure(np.full((8, 8), 128, np.uint8))
    assert brightness == pytest.approx(128 / 255) and clipped == 0.0
    smooth = cv2.GaussianBlur(texture, (0, 0), 1.5)
    shifted = np.roll(smooth, 3, axis=1)  # 3 pixels of a 64-pixel short side
    assert flow_motion(smooth, shifted) == pytest.approx(3 / 64, rel=0.3)
    assert flow_motion(smooth, smooth) < 1e-3


def test_reasons_name_every_limit_a_clip_breaks_in_a_fixed_order():
    cfg = load_config(overrides=["filter.max_motion=1.0"]).filter
    fine = {"motion": 0.1, "sharpness": 100.0, "brightness": 0.5, "clipped": 0.0}
    assert reasons(fine, cfg, []) == []
    assert reasons({**fine, "motion": 0.0}, cfg, []) == ["low_motion"]
    assert reasons({**fine, "motion": 2.0}, cfg, []) == ["high_motion"]
    dark_and_blurry = {**fine, "sharpness": 1.0, "brightness": 0.02, "clipped": 0.9}
    assert reasons(dark_and_blurry, cfg, []) == ["blurry", "underexposed", "clipped"]
    assert reasons({**fine, "brightness": 0.95}, cfg, []) == ["overexposed"]
    assert reasons({**fine, "motion": None}, cfg, []) == []  # not measured: no verdict
    off = load_config(overrides=["filter.min_motion=null", "filter.min_sharpness=null"]).filter
    assert reasons({**fine, "motion": 0.0, "sharpness": 0.0}, off, []) == []


class TwoScores(torch.nn.Module):
    def forward(self, x_N_3_S_S: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x_N_3_S_S.shape[0], 2)


def test_a_learned_filter_must_return_one_score_per_frame(tmp_path):
    torch.jit.script(TwoScores()).save(str(tmp_path / "two.pt"))
    spec = load_config(
        overrides=[f"filter.learned=[{{name: two, path: '{tmp_path / 'two.pt'}', max_score: 1}}]"]
    )
    model = LearnedFilter(spec.filter.learned[0])
    with pytest.raises(
        ValueError, match=r"returned \[4, 2\] for 4 frames: it must return one score per frame"
    ):
        model.score(np.zeros((4, 64, 64, 3), np.uint8))


# --- dedup -----------------------------------------------------------------------------------------


def _thumbnails(path: Path, size: int = 32) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = np.linspace(0, len(frames) - 1, 8).round().astype(int)
    return np.stack([cv2.resize(frames[i], (size, size), interpolation=cv2.INTER_AREA) for i in picks])


def test_the_thumbnail_embedding_finds_a_scene_at_another_size_and_tells_scenes_apart(tmp_path):
    small = write_shot_video(tmp_path / "small.mp4", [Shot(2.0, 3)], size=(64, 96))
    large = write_shot_video(tmp_path / "large.mp4", [Shot(2.0, 3)], size=(96, 144))
    other = write_shot_video(tmp_path / "other.mp4", [Shot(2.0, 4)], size=(64, 96))
    a, b, c = (thumbnail_embedding(_thumbnails(p)) for p in (small, large, other))
    threshold = load_config().dedup.threshold
    assert 1 - float(a @ b) < threshold < 1 - float(a @ c)
    dupes = semantic_dedup(["k0", "k1", "k2"], np.stack([a, c, b]), load_config().dedup)
    assert dupes == {"k2": "k0"}  # the later key is the duplicate, of the earlier one


def test_semantic_dedup_keeps_the_first_key_of_each_near_duplicate_group():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 16))
    x_N_D = np.concatenate([base, base + 1e-3 * rng.normal(size=base.shape)])  # keys e0..e2, then f0..f2
    keys = ["e0", "e1", "e2", "f0", "f1", "f2"]
    cfg = load_config(overrides=["dedup.clips_per_cluster=2"]).dedup
    found = semantic_dedup(keys, x_N_D, cfg)
    assert set(found.items()) <= {("f0", "e0"), ("f1", "e1"), ("f2", "e2")} and found  # split pairs: missed
    assert semantic_dedup(keys, x_N_D, load_config().dedup) == {"f0": "e0", "f1": "e1", "f2": "e2"}
    assert semantic_dedup(keys, x_N_D, load_config(overrides=["dedup.threshold=0"]).dedup) == {}
    with pytest.raises(ValueError, match=r"unique keys in sorted order"):
        semantic_dedup(["b", "a"], x_N_D[:2], cfg)


def test_a_bad_embedding_spec_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"use 'thumbnail', 'package.module:function', or a local model"):
        load_embedder("clip")
    with pytest.raises(ConfigError, match=r"cannot import it"):
        load_embedder("no_such_package.embed:fn")


# --- shard -----------------------------------------------------------------------------------------


def test_groups_are_resolution_nearest_aspect_and_length_bucket():
    cfg = load_config().shard
    assert group_name(456, 256, 7.5, cfg) == "256p_16x9_5-10s"
    assert group_name(256, 456, 1.0, cfg) == "256p_9x16_0-2s"
    assert group_name(96, 64, 61.0, cfg) == "64p_4x3_60s+"
    assert group_name(100, 100, 2.0, cfg) == "100p_1x1_2-5s"  # an edge starts the bucket above it


def test_shards_split_at_max_clips_and_max_megabytes_in_group_then_key_order():
    clips = [
        {"key": f"k{i}", "group": "g1" if i % 2 else "g0", "bytes": 400_000, "mp4": "", "meta": ""}
        for i in range(7)
    ]
    cfg = load_config(overrides=["shard.max_clips=3", "shard.max_megabytes=1"]).shard
    plans = plan_shards(list(reversed(clips)), cfg)
    assert [(p.name, [c[0] for c in p.clips]) for p in plans] == [
        ("g0/shard-000000.tar", ["k0", "k2"]),  # a third clip would pass 1 MiB
        ("g0/shard-000001.tar", ["k4", "k6"]),
        ("g1/shard-000000.tar", ["k1", "k3"]),
        ("g1/shard-000001.tar", ["k5"]),
    ]
    assert [len(p.clips) for p in plan_shards(clips, load_config(overrides=["shard.max_clips=3"]).shard)] == [
        3,
        1,
        3,
    ]


def test_a_shard_is_the_same_bytes_whatever_the_files_times_and_order(tmp_path):
    clips = []
    for key in ("b", "a"):
        mp4 = tmp_path / f"{key}.mp4"
        mp4.write_bytes(os.urandom(1000))
        clips.append(
            {"key": key, "group": "g", "bytes": 1000, "mp4": str(mp4), "meta": json.dumps({"key": key})}
        )
    (plan,) = plan_shards(clips, load_config().shard)
    first = write_shard(plan, tmp_path / "one").read_bytes()
    for clip in clips:
        os.utime(clip["mp4"], (1e9, 1e9))
    (plan,) = plan_shards(list(reversed(clips)), load_config().shard)
    assert write_shard(plan, tmp_path / "two").read_bytes() == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["a.json", "a.mp4", "b.json", "b.mp4"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "", "", 0o644)
        }
        assert tar.extractfile("a.mp4").read() == Path(clips[1]["mp4"]).read_bytes()
    assert not [p for p in (tmp_path / "one").rglob("*") if p.name.startswith(".")]  # no temporary left


def test_a_video_that_cannot_be_decoded_is_a_failed_record_not_an_exception(tmp_path):
    good = write_shot_video(tmp_path / "good.mp4", [Shot(2.5, 1)], size=(64, 96))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = curate_video(Source("cut", "cut.mp4", str(cut)), tmp_path / "work", load_config())
    assert result["video"]["status"] == "failed" and result["video"]["error"].startswith("cannot be opened")
    assert result["clips"] == [] and not list((tmp_path / "work").iterdir())
    ok = curate_video(Source("good", "good.mp4", str(good)), tmp_path / "work", load_config())
    assert ok["video"]["status"] == "ok" and [c["decision"] for c in ok["clips"]] == ["kept"]
    assert math.isclose(ok["video"]["duration_s"], 2.5) and ok["clips"][0]["motion_method"] == "mv"
