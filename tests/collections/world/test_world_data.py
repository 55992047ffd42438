import hashlib
import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch

from cupola.collections.world.data import (
    VideoClipDataModule,
    VideoClipDataset,
    check_num_frames,
    synthetic_videos,
    write_bouncing_shapes,
    write_moving_digits,
)
from cupola.toolkit.config import ConfigError
from cupola.toolkit.data.video import MediaError, read_frames_at, write_video


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """8 moving-digit clips of 20 frames at 32x32."""
    root = tmp_path_factory.mktemp("digits")
    write_moving_digits(root, num_videos=8, frames=20, size=32, seed=3)
    return root


def digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def to_uint8(video_3_T_H_W):
    return ((video_3_T_H_W + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def same_items(a, b):
    return a["id"] == b["id"] and torch.equal(a["video"], b["video"])


def test_generated_videos_are_deterministic_and_move(tmp_path):
    kw = {"num_videos": 2, "frames": 12, "size": 32}
    for write, name in ((write_moving_digits, "digits"), (write_bouncing_shapes, "shapes")):
        first = write(tmp_path / f"{name}_a", seed=7, **kw)
        assert [p.name for p in first] == [f"{name}0000.mp4", f"{name}0001.mp4"]
        assert digest(first) == digest(write(tmp_path / f"{name}_b", seed=7, **kw))
        assert digest(first) != digest(write(tmp_path / f"{name}_c", seed=8, **kw))
        for path in first:
            frames = read_frames_at(path, range(12)).astype(np.int64)
            assert frames.shape == (12, 32, 32, 3)
            # things move: most frames differ from the one before, and the first from the last clearly
            steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
            assert (steps > 0.1).sum() >= 8 and np.abs(frames[-1] - frames[0]).mean() > 2
            if name == "digits":
                # bright grey strokes on black, covering some but not most of the frame
                assert np.median(frames) < 8 and frames.max() > 150
                assert 0.02 < (frames[..., 0] > 64).mean() < 0.5
                assert np.abs(frames[..., 0] - frames[..., 1]).mean() < 2  # grey as RGB
            else:
                assert np.abs(frames[..., 0] - frames[..., 2]).mean() > 5  # colour


def test_synthetic_specs_build_once_and_feed_the_datamodule(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPOLA_CACHE", str(tmp_path))
    train, val = synthetic_videos("synthetic:shapes"), synthetic_videos("synthetic:shapes:val")
    assert len(list(train.glob("*.mp4"))) == 24 and len(list(val.glob("*.mp4"))) == 6
    stamps = [p.stat().st_mtime_ns for p in sorted(train.glob("*.mp4"))]
    assert synthetic_videos("synthetic:shapes:train") == train  # reused, not rewritten
    assert [p.stat().st_mtime_ns for p in sorted(train.glob("*.mp4"))] == stamps
    with pytest.raises(ValueError, match=r"'synthetic:mnist' names no generated videos.*'synthetic:digits'"):
        synthetic_videos("synthetic:mnist")
    with pytest.raises(ValueError, match="names no generated videos"):
        VideoClipDataModule(train="synthetic:shapes:test")

    dm = VideoClipDataModule(
        train="synthetic:shapes", val="synthetic:shapes:val", num_frames=17, micro_batch_size=4
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"video", "ids"} and batch["video"].shape == (4, 3, 17, 64, 64)
    assert batch["video"].dtype == torch.float32 and len(batch["ids"]) == 4
    assert -1 <= batch["video"].min() and batch["video"].max() <= 1
    val_ids = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert val_ids == [f"shapes{k:04d}" for k in range(6)]


def test_clips_are_strided_windows_of_the_short_side_resized_frames(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (24, 40, 56, 3), dtype=np.uint8)  # H x W = 40 x 56
    path = write_video(tmp_path / "wide.mp4", noise, 8, codec="mpeg4")
    full = read_frames_at(path, range(24), size=(24, 34))  # short side 24, aspect kept: 56 * 24/40 = 33.6
    span = (5 - 1) * 3 + 1

    def windows(clip):
        return [
            (s, x)
            for s in range(24 - span + 1)
            for x in range(34 - 24 + 1)
            if np.array_equal(full[s : s + span : 3, :, x : x + 24], clip)
        ]

    ds = VideoClipDataset(path, num_frames=5, size=24, frame_stride=3, seed=1)
    found = set()
    for epoch in range(3):
        item = ds[(epoch, 0)]
        assert item["id"] == "wide" and item["video"].dtype == torch.float32
        assert item["video"].shape == (3, 5, 24, 24)
        assert item["video"].min() >= -1 and item["video"].max() <= 1
        (window,) = windows(to_uint8(item["video"]))  # frames s, s+3, .., s+12 of one crop
        found.add(window)
    assert len(found) == 3  # a new clip every epoch

    val = VideoClipDataset(path, num_frames=5, size=24, frame_stride=3, train=False)
    centre = full[(24 - span) // 2 :: 3][:5, :, 5:29]  # temporal centre, centre crop
    for epoch in range(2):
        val.set_epoch(epoch)
        assert np.array_equal(to_uint8(val[0]["video"]), centre)


def test_the_same_clip_for_the_same_seed_epoch_and_index(digits):
    kw = {"num_frames": 5, "size": 24}
    ds = VideoClipDataset(digits, seed=5, **kw)
    first = ds[2]
    assert first["id"] == "digits0002"
    assert same_items(first, VideoClipDataset(digits, seed=5, **kw)[2])
    ds.set_epoch(1)
    assert not same_items(first, ds[2]) and same_items(first, ds[(0, 2)])
    assert same_items(ds[2], ds[(1, 2)])
    assert not same_items(first, VideoClipDataset(digits, seed=6, **kw)[2])
    val = VideoClipDataset(digits, train=False, **kw)
    before = val[2]
    val.set_epoch(3)
    assert same_items(before, val[2])


def make_dm(source, **kw):
    args = {"train": str(source), "num_frames": 9, "size": 24, "micro_batch_size": 2, "seed": 3}
    dm = VideoClipDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("epoch", "num_workers"), [(0, 0), (1, 0), (1, 2)])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(digits, epoch, num_workers):
    loader = make_dm(digits, num_workers=num_workers).train_dataloader()
    loader.sampler.set_epoch(epoch)
    expected = list(loader)
    assert len(expected) == 4

    loader = make_dm(digits, num_workers=num_workers).train_dataloader()
    loader.sampler.set_epoch(epoch)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    resumed = make_dm(digits, num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)  # Lightning restores the state, then iterates; no set_epoch first
    got = list(resumed)
    assert len(got) == 3
    for a, b in zip(expected[1:], got):
        assert a["ids"] == b["ids"] and torch.equal(a["video"], b["video"])
    # each clip is the one drawn for (seed, epoch, index): the epoch reached the draws (in workers too)
    reference = VideoClipDataset(digits, num_frames=9, size=24, seed=3)
    index = {v.id: k for k, v in enumerate(reference.videos)}
    for batch in expected:
        for i, video in zip(batch["ids"], batch["video"]):
            assert torch.equal(video, reference[(epoch, index[i])]["video"])


def test_dp_ranks_read_disjoint_videos(digits):
    shares = []
    for rank in range(2):
        dm = VideoClipDataModule(train=str(digits), num_frames=9, size=24, micro_batch_size=2)
        dm.dp_rank, dm.dp_size = rank, 2
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert len(batches) == 2
        shares.append({i for b in batches for i in b["ids"]})
    assert len(shares[0]) == len(shares[1]) == 4 and not shares[0] & shares[1]


def write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_folder_list_and_tar_shards_give_the_same_clips(digits, tmp_path):
    videos = sorted(digits.glob("*.mp4"))
    (tmp_path / "list.txt").write_text("# the clips\n" + "".join(f"{v.name}\n\n" for v in videos))
    shutil.copytree(digits, tmp_path, dirs_exist_ok=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, part in enumerate((videos[:5], videos[5:])):
        members = []
        for v in part:
            members += [(f"{v.stem}.mp4", v.read_bytes())]
            members += [(f"{v.stem}.json", json.dumps({"caption": f"clip {v.stem}"}).encode())]
        write_shard(shards / f"shard-{k:03d}.tar", members)

    def items(source):
        ds = VideoClipDataset(source, num_frames=9, size=24, seed=2)
        ds.set_epoch(1)
        return ds, [ds[i] for i in range(len(ds))]

    folder_ds, expected = items(digits)
    assert [x["id"] for x in expected] == [v.stem for v in videos]
    for source in (
        tmp_path / "list.txt",
        shards,
        str(shards / "*.tar"),
        [shards / "shard-000.tar", shards / "shard-001.tar"],
        [str(digits / "digits000[0-4].mp4"), shards / "shard-001.tar"],
    ):
        got = items(source)[1]
        assert len(got) == len(expected) and all(same_items(a, b) for a, b in zip(expected, got)), source
    tar_ds = items(shards)[0]
    assert tar_ds.metadata(6) == {"caption": "clip digits0006"} and folder_ds.metadata(6) is None


def test_bad_and_too_short_videos_error_naming_the_file_or_are_skipped(digits, tmp_path, caplog):
    for v in sorted(digits.glob("*.mp4"))[:2]:
        shutil.copy(v, tmp_path / v.name)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(2048))
    short = write_video(tmp_path / "short.mp4", np.zeros((5, 32, 32, 3), np.uint8), 8, codec="mpeg4")
    kw = {"num_frames": 5, "size": 24, "frame_stride": 2}  # a clip covers 9 frames
    with pytest.raises(MediaError, match=rf"video {broken} cannot be opened.*on_bad_media='skip'"):
        VideoClipDataset(tmp_path, **kw)
    listed = tmp_path / "list.txt"
    listed.write_text("digits0000.mp4\nshort.mp4\n")
    with pytest.raises(
        MediaError,
        match=rf"video {short} holds 5 frames; a clip of num_frames=5 at frame_stride=2 needs 9\. "
        "Lower num_frames or frame_stride",
    ):
        VideoClipDataset(listed, **kw)
    listed.write_text("digits0000.mp4\ngone.mp4\n")
    with pytest.raises(MediaError, match=rf"video {tmp_path / 'gone.mp4'} does not exist"):
        VideoClipDataset(listed, **kw)
    assert [x["id"] for x in VideoClipDataset(listed, on_bad_media="skip", **kw)] == ["digits0000"]
    listed.unlink()
    with caplog.at_level(logging.WARNING):
        ds = VideoClipDataset([tmp_path, broken], on_bad_media="skip", **kw)  # broken.mp4 listed twice
    assert [x["id"] for x in ds] == ["digits0000", "digits0001"]
    assert ds.stats == {
        "videos": 2,
        "frames": 40,
        "skipped_bad_media": 2,
        "skipped_too_short": 1,
        "bad_files": 2,
    }
    assert len([r for r in caplog.records if "broken.mp4" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "short.mp4" in r.getMessage()]) == 1

    # a shard member is named shard:member
    shard = write_shard(
        tmp_path / "bad.tar",
        [("a.mp4", (tmp_path / "digits0000.mp4").read_bytes()), ("b.mp4", broken.read_bytes())],
    )
    with pytest.raises(MediaError, match=rf"video {shard}:b.mp4 cannot be opened"):
        VideoClipDataset(shard, **kw)
    assert [x["id"] for x in VideoClipDataset(shard, on_bad_media="skip", **kw)] == ["a"]

    # a file that breaks after the build: the error names it, or its clip gives way to the next video's
    late = tmp_path / "late"
    late.mkdir()
    for name in ("digits0000.mp4", "digits0001.mp4"):
        shutil.copy(tmp_path / name, late / name)
    strict = VideoClipDataset(late, **kw)
    lenient = VideoClipDataset(late, on_bad_media="skip", **kw)
    (late / "digits0000.mp4").write_bytes(b"broken")
    with pytest.raises(MediaError, match=rf"video {late / 'digits0000.mp4'}.*rebuild the dataset"):
        strict[0]
    with caplog.at_level(logging.WARNING):
        assert lenient[0]["id"] == "digits0001"
    assert lenient.stats["bad_files"] == 1


def test_config_errors(digits, tmp_path):
    assert check_num_frames(17, 8) == 3 and check_num_frames(1, 4) == 1 and check_num_frames(5, 1) == 5
    with pytest.raises(
        ConfigError,
        match=r"num_frames=16 is not valid for temporal_compression=8.*9 = 1 \+ 1\*8 or 17 = 1 \+ 2\*8",
    ):
        check_num_frames(16, 8)
    with pytest.raises(ConfigError, match="num_frames=0 is not valid"):
        check_num_frames(0, 4)
    with pytest.raises(ConfigError, match="temporal_compression=0"):
        check_num_frames(17, 0)

    kw = {"num_frames": 9, "size": 24}
    for bad, match in (
        ({"num_frames": 0}, "VideoClipDataset.num_frames=0 is not valid"),
        ({"frame_stride": 0}, "frame_stride=0"),
        ({"size": 1.5}, "size=1.5"),
        ({"on_bad_media": "ignore"}, r"on_bad_media='ignore'.*\['error', 'skip'\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            VideoClipDataset(digits, **{**kw, **bad})
    with pytest.raises(FileNotFoundError, match="gone"):
        VideoClipDataset(tmp_path / "gone", **kw)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        VideoClipDataset(str(tmp_path / "*.mp4"), **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no videos"):
        VideoClipDataset(tmp_path / "empty", **kw)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"notes.csv is neither a video \(.mp4"):
        VideoClipDataset(tmp_path / "notes.csv", **kw)
    mixed = tmp_path / "mixed"
    shutil.copytree(digits, mixed)
    write_shard(mixed / "s.tar", [("a.mp4", b"")])
    with pytest.raises(ConfigError, match=r"holds both videos.*and \.tar shards"):
        VideoClipDataset(mixed, **kw)
    gz = tmp_path / "gz.tar"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(next(digits.glob("*.mp4")), arcname="a.mp4")
    with pytest.raises(MediaError, match=rf"tar shard {gz} cannot be listed.*plain"):
        VideoClipDataset(gz, **kw)

    with pytest.raises(FileNotFoundError, match=r"VideoClipDataModule\.val"):
        VideoClipDataModule(train=str(digits), val=str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match=r"VideoClipDataModule\.micro_batch_size=0"):
        VideoClipDataModule(train=str(digits), micro_batch_size=0)
    with pytest.raises(
        ConfigError,
        match=r"8 usable videos.*dp_size=2.*4 per rank, less than one batch of micro_batch_size=5",
    ):
        dm = VideoClipDataModule(train=str(digits), num_frames=9, micro_batch_size=5)
        dm.dp_rank, dm.dp_size = 0, 2
        dm.setup("fit")
    with pytest.raises(ConfigError, match=r"dp_rank=2 is not in \[0, dp_size=2\)"):
        dm = VideoClipDataModule(train=str(digits), num_frames=9)
        dm.dp_rank, dm.dp_size = 2, 2
        dm.setup("fit")
