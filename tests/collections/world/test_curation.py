"""`curate` / `cupola curate` end to end on Ray, on generated videos with shot cuts, degraded shots,
a repeated scene and broken files: every input and every clip is accounted for in the manifest,
the shards feed the tokenizer's dataset, and a resumed or killed-and-rerun run ends with the bytes
of an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from cupola.collections.world.curation import (
    Corpus,
    CurationResult,
    Shot,
    curate,
    load_config,
    ray_session,
    write_curation_corpus,
    write_shot_video,
)
from cupola.collections.world.data.clips import VideoClipDataset
from cupola.toolkit.cli import main
from cupola.toolkit.config import ConfigError
from cupola.toolkit.testing import kill_marked_processes

BROKEN_ERRORS = {  # the corpus's broken file -> what its manifest error says
    "broken/corrupt.mp4": "cannot be opened: corrupt, truncated, or not a media file",
    "broken/truncated.mp4": "cannot be opened: corrupt, truncated, or not a media file",
    "broken/empty.mp4": "empty file (0 bytes)",
    "broken/audio_only.mp4": "holds no video stream (1 audio)",
}
DEGRADED_REASONS = {
    "static": "low_motion",
    "blurry": "blurry",
    "bright": "overexposed",
    "dark": "underexposed",
}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module; `curate` joins it instead of starting its own."""
    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return write_curation_corpus(tmp_path_factory.mktemp("curation") / "in")


@pytest.fixture(scope="module")
def run(ray_cluster, corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> CurationResult:
    """The uninterrupted run every other result is compared with."""
    return curate(corpus.root, tmp_path_factory.mktemp("curated") / "out")


def manifest(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def videos_by_source(out: Path) -> dict[str, dict[str, Any]]:
    return {r["source"]: r for r in manifest(out) if r["kind"] == "video"}


def clips_by_shot(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Clip rows by (source, shot); every shot of the corpus is shorter than a clip's maximum."""
    rows = [r for r in manifest(out) if r["kind"] == "clip"]
    by_shot = {(r["source"], r["shot"]): r for r in rows}
    assert len(by_shot) == len(rows), "a shot gave more than one clip"
    return by_shot


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every file under ``out/shards`` (only tars, and no temporary left behind), by relative path."""
    files = sorted(p for p in (out / "shards").rglob("*") if p.is_file())
    return {p.relative_to(out / "shards").as_posix(): p.read_bytes() for p in files}


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# --- one run over the whole corpus -----------------------------------------------------------------


def test_broken_inputs_are_failed_videos_with_their_error_and_the_run_goes_on(run, corpus):
    videos = videos_by_source(run.output)
    assert set(videos) == set(corpus.videos) | set(BROKEN_ERRORS)
    for source, error in BROKEN_ERRORS.items():
        row = videos[source]
        assert row["status"] == "failed" and row["error"].startswith(error), row
        assert row["clips"] == row["kept"] == 0, row
    for source in corpus.videos:
        assert videos[source]["status"] == "ok" and videos[source]["error"] is None, videos[source]
    s = run.summary
    assert (s["videos"], s["videos_ok"], s["videos_failed"]) == (13, 9, 4)
    assert s["failures"] == {"cannot be opened": 2, "empty file": 1, "holds no video stream": 1}
    assert json.loads((run.output / "summary.json").read_text()) == s


def test_shots_are_found_and_each_degraded_shot_is_dropped_for_its_reason(run, corpus):
    videos, clips = videos_by_source(run.output), clips_by_shot(run.output)
    for source, shots in corpus.videos.items():
        assert videos[source]["shots"] == len(shots), source  # every cut found, no false cut
    first_clip = clips[("shots/v0000.mp4", 0)]
    expected: dict[tuple[str, int], str | None] = {}
    for source, shots in corpus.videos.items():
        for i, shot in enumerate(shots):
            expected[(source, i)] = "too_short" if shot.seconds < 2.0 else DEGRADED_REASONS.get(shot.kind)
    expected[("shots/v0004.mp4", 0)] = f"duplicate_of:{first_clip['key']}"  # v0000's first scene, larger
    assert set(clips) == set(expected)
    for where, reason in expected.items():
        clip = clips[where]
        if reason is None:
            assert clip["decision"] == "kept" and clip["reason"] is None, clip
        elif reason in DEGRADED_REASONS.values():  # a dark or bright shot may be blurry as well
            assert clip["decision"] == "dropped" and reason in clip["reason"].split(","), (reason, clip)
        else:
            assert clip["decision"] == "dropped" and clip["reason"] == reason, (reason, clip)
    assert first_clip["decision"] == "kept"
    assert clips[("odd/mjpeg.avi", 0)]["motion_method"] == "flow"  # MJPEG carries no motion vectors
    kept = [c for c in clips.values() if c["decision"] == "kept"]
    assert run.summary["clips"] == len(clips) == 27 and run.summary["clips_kept"] == len(kept) == 21


def test_every_kept_clip_is_in_exactly_one_shard_and_every_dropped_one_has_a_reason(run):
    rows = [r for r in manifest(run.output) if r["kind"] == "clip"]
    for row in rows:
        assert row["decision"] in ("kept", "dropped"), row
        if row["decision"] == "dropped":
            assert row["reason"] and row["shard"] is None, row
        else:
            assert row["reason"] is None and row["shard"] and row["caption"], row
    files = sorted(run.output / "shards" / name for name in shard_bytes(run.output))
    assert [p.suffix for p in files] == [".tar"] * run.summary["shards"] and len(files) == 2
    found: dict[str, str] = {}  # clip key -> its shard
    for tar in files:
        names = tar_members(tar)
        assert names == sorted(names), tar
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert names == sorted([f"{k}.json" for k in keys] + [f"{k}.mp4" for k in keys]), names
        for key in keys:
            assert key not in found, f"{key} is in {found[key]} and {tar}"
            found[key] = tar.relative_to(run.output / "shards").as_posix()
    assert found == {r["key"]: r["shard"] for r in rows if r["decision"] == "kept"}
    for row in rows:
        if row["decision"] == "kept":
            assert row["shard"].startswith(f"{row['group']}/"), row


def test_the_shards_are_read_by_the_tokenizers_clip_dataset(run):
    kept = {r["key"]: r for r in manifest(run.output) if r["kind"] == "clip" and r["decision"] == "kept"}
    dataset = VideoClipDataset(str(run.output / "shards"), num_frames=9, size=32, train=False)
    assert sorted(v.id for v in dataset.videos) == sorted(kept)
    for i, (video, info) in enumerate(zip(dataset.videos, dataset.infos)):
        clip = kept[video.id]
        assert (info.frames, info.width, info.height) == (clip["out_frames"], clip["width"], clip["height"])
        assert info.fps == pytest.approx(clip["out_fps"], rel=1e-3)
        meta = dataset.metadata(i)
        assert meta["key"] == video.id and meta["caption"] == clip["caption"], meta
        item = dataset[i]
        x_3_T_H_W = item["video"]
        assert item["id"] == video.id and x_3_T_H_W.shape == (3, 9, 32, 32)
        assert torch.isfinite(x_3_T_H_W).all() and x_3_T_H_W.abs().max() <= 1.0
        assert x_3_T_H_W.std() > 0.05, f"{video.id} decodes to a flat picture"


# --- resuming --------------------------------------------------------------------------------------


def test_a_second_run_resumes_every_video_and_writes_the_same_bytes(run, corpus):
    shards, rows = shard_bytes(run.output), manifest(run.output)
    summary = (run.output / "summary.json").read_bytes()
    again = curate(corpus.root, run.output)
    assert (again.curated, again.resumed) == (0, 13)
    assert shard_bytes(run.output) == shards
    assert manifest(run.output) == rows
    assert (run.output / "summary.json").read_bytes() == summary and again.summary == run.summary


def _committed(out: Path) -> int:
    return len(list((out / "work" / "videos").glob("*/result.json")))


def _kill_leftovers(marker: str, since: float) -> None:
    kill_marked_processes("CURATION_TEST_RUN", marker, since)


def test_a_killed_run_rerun_to_completion_writes_the_uninterrupted_runs_bytes(run, corpus, tmp_path):
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    env = {**os.environ, "CURATION_TEST_RUN": marker}
    command = [sys.executable, "-m", "cupola", "curate", "--input", str(corpus.root), "--output", str(out)]
    command += ["--num-cpus", "2"]
    started = time.time()
    with open(tmp_path / "killed.log", "wb") as log:
        killed = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            while _committed(out) == 0:
                assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.time() - started < 180, "no video was committed in 3 minutes"
                time.sleep(0.05)
        finally:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
            _kill_leftovers(marker, started)
    committed = _committed(out)
    assert 1 <= committed < 13 and not (out / "summary.json").exists()

    rerun = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    _kill_leftovers(marker, started)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    found = re.search(r"this run: (\d+) videos curated, (\d+) already done", rerun.stdout)
    assert found and (int(found[1]), int(found[2])) == (13 - committed, committed), rerun.stdout
    assert shard_bytes(out) == shard_bytes(run.output)
    assert manifest(out) == manifest(run.output)
    assert json.loads((out / "summary.json").read_text()) == run.summary


def test_changed_per_video_settings_are_refused_naming_the_setting(run, corpus, capsys):
    shards = shard_bytes(run.output)
    with pytest.raises(ConfigError, match=r"split\.threshold: 27\.0 -> 30\.0.*Use another --output"):
        curate(corpus.root, run.output, load_config(overrides=["split.threshold=30"]))
    argv = ["curate", "--input", str(corpus.root), "--output", str(run.output), "transcode.crf=30"]
    assert main(argv) == 2
    assert "transcode.crf: 23 -> 30" in capsys.readouterr().err
    assert shard_bytes(run.output) == shards


def test_dedup_and_sharding_settings_change_without_curating_again(run, corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run.output, out)
    kept = {r["key"] for r in manifest(run.output) if r["kind"] == "clip" and r["decision"] == "kept"}
    duplicate = clips_by_shot(run.output)[("shots/v0004.mp4", 0)]["key"]
    again = curate(corpus.root, out, load_config(overrides=["dedup.enabled=false", "shard.max_clips=4"]))
    assert (again.curated, again.resumed) == (0, 13)
    rows = [r for r in manifest(out) if r["kind"] == "clip"]
    assert {r["key"] for r in rows if r["decision"] == "kept"} == kept | {duplicate}
    tars = [p for p in (out / "shards").rglob("*.tar")]
    assert again.summary["groups"] == {"64p_4x3_2-5s": 19, "96p_4x3_2-5s": 3}  # the duplicate is 96p
    assert len(tars) == again.summary["shards"] == 5 + 1
    assert all(len(tar_members(t)) <= 2 * 4 for t in tars)
    assert sum(len(tar_members(t)) for t in tars) == 2 * len(kept | {duplicate})


def test_failed_videos_are_kept_on_resume_and_curated_again_with_retry_failed(run, corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run.output, out)
    # a video a transient error (a full disk, say) failed: its unchanged source is finished, as failed
    key = videos_by_source(run.output)["shots/v0001.mp4"]["key"]
    result_json = out / "work" / "videos" / key / "result.json"
    result = json.loads(result_json.read_text())
    result["video"].update(status="failed", error="OSError: [Errno 28] No space left on device", kept=0)
    result["clips"] = []
    result_json.write_text(json.dumps(result))
    kept = curate(corpus.root, out)
    assert (kept.curated, kept.resumed) == (0, 13)
    assert videos_by_source(out)["shots/v0001.mp4"]["status"] == "failed"
    retried = curate(corpus.root, out, retry_failed=True)
    assert (retried.curated, retried.resumed) == (5, 8)  # it and the four broken inputs, nothing else
    assert shard_bytes(out) == shard_bytes(run.output)
    assert manifest(out) == manifest(run.output) and retried.summary == run.summary


# --- errors and exit codes -------------------------------------------------------------------------


def test_an_input_without_videos_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("no videos here")
    with pytest.raises(ConfigError, match=r"holds no videos"):
        curate(tmp_path / "in", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"missing does not exist"):
        curate(tmp_path / "missing", tmp_path / "out")
    assert main(["curate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    assert "holds no videos" in capsys.readouterr().err


def test_cli_exits_1_when_no_video_can_be_curated_and_2_for_a_bad_setting(
    ray_cluster, corpus, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(["curate", "--input", str(corpus.root / "broken"), "--output", str(out)]) == 1
    assert "no video could be curated" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["videos_ok"], summary["videos_failed"], summary["shards"]) == (0, 4, 0)

    assert (
        main(["curate", "--input", str(corpus.root), "--output", str(tmp_path / "o2"), "split.treshold=3"])
        == 2
    )
    assert "unknown field 'treshold'. Did you mean: threshold" in capsys.readouterr().err
    assert (
        main(["curate", "--input", str(corpus.root), "--output", str(tmp_path / "o2"), "filter.motion=fast"])
        == 2
    )
    assert "FilterConfig.motion='fast' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


# --- a learned filter ------------------------------------------------------------------------------


class MeanBrightness(torch.nn.Module):
    """Scores a frame by its mean pixel value: a stand-in for a trained classifier."""

    def forward(self, x_N_3_S_S: torch.Tensor) -> torch.Tensor:
        return x_N_3_S_S.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def bright_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bright")
    shots = [Shot(2.5, 100), Shot(2.5, 101, "bright"), Shot(2.5, 102)]
    write_shot_video(root / "in" / "v.mp4", shots, size=(64, 96))
    return root / "in"


def _learned(path: Path) -> str:
    return f"filter.learned=[{{name: bright, path: '{path}', max_score: 0.8}}]"


def test_a_learned_torchscript_filter_scores_every_clip_and_drops_by_its_score(
    ray_cluster, bright_video, tmp_path
):
    model = tmp_path / "bright.pt"
    torch.jit.script(MeanBrightness()).save(str(model))
    # the built-in exposure and sharpness limits off: only the learned filter can drop the bright shot
    overrides = [
        _learned(model),
        "filter.max_brightness=null",
        "filter.max_clipped=null",
        "filter.min_sharpness=null",
    ]
    result = curate(bright_video, tmp_path / "out", load_config(overrides=overrides))
    clips = sorted((r for r in manifest(result.output) if r["kind"] == "clip"), key=lambda r: r["shot"])
    assert [c["reason"] for c in clips] == [None, "learned:bright", None]
    for clip in clips:  # the model's score: mean RGB, close to the measured mean luma
        assert clip["learned_bright"] == pytest.approx(clip["brightness"], abs=0.06), clip
    assert clips[1]["learned_bright"] > 0.8 > max(clips[0]["learned_bright"], clips[2]["learned_bright"])
    assert result.summary["clips_dropped"] == {"learned:bright": 1}
    (tar,) = (result.output / "shards").rglob("*.tar")
    with tarfile.open(tar) as shard:
        meta = json.load(shard.extractfile(f"{clips[0]['key']}.json"))
    assert meta["learned_bright"] == clips[0]["learned_bright"]


class TwoScores(torch.nn.Module):
    def forward(self, x_N_3_S_S: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x_N_3_S_S.shape[0], 2)


def test_a_missing_or_wrong_learned_filter_is_a_clear_error_before_any_video(
    ray_cluster, bright_video, tmp_path
):
    missing = tmp_path / "nowhere" / "filter.pt"
    with pytest.raises(FileNotFoundError, match=rf"model file {re.escape(str(missing))} does not exist"):
        curate(bright_video, tmp_path / "out", load_config(overrides=[_learned(missing)]))
    argv = ["curate", "--input", str(bright_video), "--output", str(tmp_path / "out"), _learned(missing)]
    assert main(argv) == 2
    two = tmp_path / "two.pt"
    torch.jit.script(TwoScores()).save(str(two))
    with pytest.raises(ValueError, match=r"it must return one score per frame"):
        curate(bright_video, tmp_path / "out", load_config(overrides=[_learned(two)]))
    assert not (tmp_path / "out" / "work").exists()  # no video recorded as failed
