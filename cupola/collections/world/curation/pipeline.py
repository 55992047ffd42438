"""The curation pipeline on Ray: :func:`curate` turns a folder (or list) of videos into webdataset
shards and a manifest, resumably.

Stages::

    per video, Ray Data (one task per source video, in parallel):
      clip      decode once -> split (PySceneDetect) -> transcode (PyAV, h264) -> filter -> embed
      annotate  captions for the clips that passed (metadata, or a VLM in a pool of Ray actors)
      commit    the video's clips + result.json moved into place with one atomic rename
    global, on the driver, over every committed result sorted by key:
      dedup     k-means semantic deduplication of the embeddings
      shard     tars per (resolution, aspect, length) group, written by Ray Data tasks
      manifest  manifest.parquet and summary.json

The output folder::

    OUT/manifest.parquet            one row per source video and per clip (manifest.py)
    OUT/summary.json                counts: videos ok/failed, clips kept/dropped by reason, shards
    OUT/shards/<group>/shard-NNNNNN.tar
    OUT/curate.yaml                 the config of the last run
    OUT/work/settings.json          the per-video settings the finished videos were made with
    OUT/work/videos/<key>/          a finished video: result.json + its kept clips' mp4s
    OUT/work/staging/               videos in progress (cleared when a run starts)

Resume: a video is finished when ``work/videos/<key>/result.json`` exists and the source's size and
modification time still match; a re-run skips it. Videos are committed whole (written under
``staging/``, then renamed), so a run killed at any point leaves finished videos or nothing of a
video. Dedup, sharding and the manifest are always recomputed from the finished videos, sorted by
key, with deterministic tar headers and a single-threaded x264: a killed-and-resumed run ends with
the same bytes as an uninterrupted one, whatever order Ray ran the videos in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cupola.collections.world.curation.annotate import MetadataCaptioner, VLMCaptioner
from cupola.collections.world.curation.config import CurateConfig, load_config, per_video_settings
from cupola.collections.world.curation.dedup import load_embedder, semantic_dedup
from cupola.collections.world.curation.filters import LearnedFilter
from cupola.collections.world.curation.manifest import write_manifest
from cupola.collections.world.curation.process import curate_video
from cupola.collections.world.curation.shard import clip_metadata, group_name, plan_shards, write_shard
from cupola.collections.world.curation.sources import Source, find_sources
from cupola.toolkit.config import ConfigError, to_yaml, validate

__all__ = ["CurationResult", "curate", "ray_session"]

WORK, VIDEOS, STAGING, SHARDS = "work", "videos", "staging", "shards"
MANIFEST, SUMMARY, SETTINGS, RESULT = "manifest.parquet", "summary.json", "settings.json", "result.json"
UNFINISHED = "its Ray task failed without a result (see the Ray logs); re-run to retry it"
MAX_ATTEMPTS = 2  # tries of a video whose worker dies before it is recorded as failed
AUTH_MODE = "RAY_AUTH_MODE"  # Ray's token-authentication switch ("token" / "disabled")


@dataclass(frozen=True, slots=True)
class CurationResult:
    """What a call of :func:`curate` produced. ``summary`` is what ``summary.json`` holds (the same
    for a resumed run as for an uninterrupted one); ``curated`` / ``resumed`` count the videos this
    call processed and the finished ones it found; ``seconds`` is its wall time."""

    output: Path
    manifest: Path
    shards: list[Path]
    summary: dict[str, Any]
    curated: int
    resumed: int
    seconds: float


def _say(text: str) -> None:
    print(f"[curate] {text}", file=sys.stderr, flush=True)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``[ray://]HOST:PORT`` nobody listens on (``ray.init`` retries for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if sep and host and port.isdigit():
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the duration: the running instance if this process already joined one; else a new
    local instance (``num_cpus``, no dashboard), or the cluster at ``address`` — shut down after."""
    import ray

    if ray.is_initialized():
        yield
        return
    # a new local instance turns token auth on in this process's environment (seen with Ray 2.60),
    # and processes started later inherit it: a driver in token mode joining a cluster without auth
    # stalls with its tasks shown running. The variable is put back as it was.
    auth_mode = os.environ.get(AUTH_MODE)
    try:
        if address:
            try:
                _check_reachable(address)
                ray.init(address=address)
            except (ConnectionError, RuntimeError, OSError) as e:
                raise ConfigError(
                    f"--ray-address {address}: no Ray cluster could be joined there "
                    f"({str(e).splitlines()[0]}). Give the head node's GCS address (HOST:6379, 'auto' on a "
                    "cluster node, ray://HOST:10001), or leave --ray-address out to run on a local Ray instance"
                ) from e
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        _restore_env(AUTH_MODE, auth_mode)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _fingerprint(path: str) -> dict[str, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_settings(work: Path, cfg: CurateConfig) -> None:
    """Refuse to resume into a work folder made with other per-video settings."""
    file = work / SETTINGS
    current = json.loads(json.dumps(per_video_settings(cfg)))
    if file.is_file():
        before = json.loads(file.read_text())
        if before != current:
            old, new = _flat(before), _flat(current)
            changed = ", ".join(
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            )
            raise ConfigError(
                f"{work.parent} holds videos curated with other settings ({changed}); their clips would not "
                f"match this config. Use another --output, or delete {work} to curate every video again"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{SETTINGS}.tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
    os.replace(tmp, file)


def _check_models(cfg: CurateConfig) -> None:
    """Load the learned filters (and score blank frames) and the embedding here, once: a missing or
    broken model file stops the run with its error, instead of failing every video as if the
    videos were at fault (failures a resumed run would keep)."""
    for spec in cfg.filter.learned:
        LearnedFilter(spec).score(np.zeros((spec.frames, spec.size, spec.size, 3), dtype=np.uint8))
    load_embedder(cfg.dedup.embedding)


def _finished(work: Path, source: Source) -> dict[str, Any] | None:
    file = work / VIDEOS / source.key / RESULT
    if not file.is_file():
        return None
    result = json.loads(file.read_text())
    return result if result.get("fingerprint") == _fingerprint(source.path) else None


# --- the per-video Ray Data stages --------------------------------------------------------------


def _clip_stage(row: dict[str, Any], cfg: CurateConfig, work: str) -> dict[str, Any]:
    source = Source(row["key"], row["name"], row["path"])
    staging = Path(work) / STAGING / f"{source.key}.{uuid.uuid4().hex[:8]}"  # fresh for a retried task
    # Ray Data retries a task whose worker died (a decoder crash) without limit: count the attempts
    # in a file and, past the limit, record the video as failed instead of crashing again
    attempts = Path(work) / STAGING / f"{source.key}.attempts"
    tries = attempts.stat().st_size if attempts.exists() else 0
    with open(attempts, "ab") as f:
        f.write(b".")
    if tries >= MAX_ATTEMPTS:
        staging.mkdir(parents=True)
        result = _crashed_result(source, f"the worker curating it died {tries} times (a decoder crash?)")
    else:
        result = curate_video(source, staging, cfg)
    result["fingerprint"] = _fingerprint(source.path)
    return {"key": source.key, "staging": str(staging), "result": json.dumps(result)}


def _caption_all(row: dict[str, Any], captioner: Any) -> dict[str, Any]:
    result = json.loads(row["result"])
    for clip in result["clips"]:
        if clip["decision"] == "kept":
            clip["caption"] = captioner.caption(Path(row["staging"]) / clip["file"], clip, result["video"])
    return {**row, "result": json.dumps(result)}


def _annotate_stage(row: dict[str, Any]) -> dict[str, Any]:
    return _caption_all(row, MetadataCaptioner())


class _VLMAnnotateStage:
    """A Ray actor holding one VLM captioner (loaded once, used for many videos)."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.captioner = VLMCaptioner(cfg.annotate)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return _caption_all(row, self.captioner)


def _commit_stage(row: dict[str, Any], work: str) -> dict[str, Any]:
    staging, final = Path(row["staging"]), Path(work) / VIDEOS / row["key"]
    (staging / RESULT).write_text(row["result"])
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # an older result of a source that changed since
        stale = staging.with_name(f"{staging.name}.stale")
        final.rename(stale)
        shutil.rmtree(stale)
    staging.rename(final)
    video = json.loads(row["result"])["video"]
    return {
        "source": video["source"],
        "status": video["status"],
        "error": video["error"] or "",
        "clips": video["clips"],
        "kept": video["kept"],
    }


def _curate_videos(todo: list[Source], cfg: CurateConfig, work: Path, say: Callable[[str], None]) -> None:
    """Run the per-video stages over ``todo``; each finished video is committed under ``work``."""
    import ray.data

    rows = [{"key": s.key, "name": s.name, "path": s.path} for s in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(_clip_stage, fn_kwargs={"cfg": cfg, "work": str(work)}, num_cpus=1)
    if cfg.annotate.captioner == "vlm":
        ds = ds.map(
            _VLMAnnotateStage,
            fn_constructor_kwargs={"cfg": cfg},
            concurrency=cfg.annotate.workers,
            num_cpus=1,
        )
    else:
        ds = ds.map(_annotate_stage, num_cpus=1)
    ds = ds.map(_commit_stage, fn_kwargs={"work": str(work)}, num_cpus=1)
    context = ray.data.DataContext.get_current()
    allowed, context.max_errored_blocks = context.max_errored_blocks, len(rows)
    try:
        for n, row in enumerate(ds.iter_rows(), 1):
            what = (
                f"failed: {row['error']}"
                if row["status"] == "failed"
                else f"{row['clips']} clips, {row['kept']} passed the filters"
            )
            say(f"{n}/{len(rows)} {row['source']}: {what}")
    finally:
        context.max_errored_blocks = allowed


# --- the global stages ------------------------------------------------------------------------


def _write_shard_stage(row: dict[str, Any], root: str) -> dict[str, Any]:
    from cupola.collections.world.curation.shard import ShardPlan

    plan = ShardPlan(name=row["name"], clips=tuple(tuple(c) for c in json.loads(row["clips"])))
    path = write_shard(plan, root)
    return {"name": row["name"], "bytes": path.stat().st_size}


def _write_shards(plans: list[Any], out: Path) -> list[Path]:
    """All shards into a fresh folder, then swapped in for the old one."""
    import ray.data

    partial, old = out / f".{SHARDS}.partial", out / f".{SHARDS}.old"
    for stale in (partial, old):
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    if plans:
        rows = [{"name": p.name, "clips": json.dumps(p.clips)} for p in plans]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        written = list(ds.map(_write_shard_stage, fn_kwargs={"root": str(partial)}, num_cpus=1).iter_rows())
        if len(written) != len(plans):
            raise RuntimeError(f"{len(plans) - len(written)} of {len(plans)} shards were not written")
    final = out / SHARDS
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return [final / p.name for p in plans]


def _crashed_result(source: Source, error: str) -> dict[str, Any]:
    video = {
        "key": source.key,
        "source": source.name,
        "status": "failed",
        "error": error,
        "clips": 0,
        "kept": 0,
    }
    return {"video": video, "clips": []}


def _unfinished(source: Source, say: Callable[[str], None]) -> dict[str, Any]:
    """The record of a video whose task never committed a result."""
    say(f"{source.name}: {UNFINISHED}")
    return _crashed_result(source, UNFINISHED)


def _failure_kind(error: str) -> str:
    """``"decoding failed after 12 frames (FFmpeg: ...)"`` -> ``"decoding failed after N frames"``."""
    return re.sub(r"\d+", "N", re.split(r" \(|: ", error, maxsplit=1)[0])


def _dedup(clips: list[dict[str, Any]], cfg: CurateConfig) -> None:
    """Mark semantic duplicates among the kept clips (in place)."""
    candidates = sorted((c for c in clips if c["decision"] == "kept"), key=lambda c: c["key"])
    if not cfg.dedup.enabled or len(candidates) < 2:
        return
    embeddings_N_D = np.array([c["embedding"] for c in candidates], dtype=np.float64)
    duplicates = semantic_dedup([c["key"] for c in candidates], embeddings_N_D, cfg.dedup)
    for clip in candidates:
        if clip["key"] in duplicates:
            clip.update(decision="dropped", reason=f"duplicate_of:{duplicates[clip['key']]}")


def _summary(
    videos: list[dict[str, Any]], clips: list[dict[str, Any]], shards: int, ignored: int
) -> dict[str, Any]:
    ok = [v for v in videos if v["status"] == "ok"]
    dropped: Counter[str] = Counter()
    for clip in clips:
        if clip["decision"] == "dropped":
            duplicate = clip["reason"].startswith("duplicate_of:")
            dropped.update(["duplicate"] if duplicate else clip["reason"].split(","))
    kept = [c for c in clips if c["decision"] == "kept"]
    return {
        "videos": len(videos),
        "videos_ok": len(ok),
        "videos_failed": len(videos) - len(ok),
        "failures": dict(
            sorted(Counter(_failure_kind(v["error"]) for v in videos if v["status"] != "ok").items())
        ),
        "source_minutes": round(sum(v["duration_s"] for v in ok) / 60, 4),
        "clips": len(clips),
        "clips_kept": len(kept),
        "clips_dropped": dict(sorted(dropped.items())),
        "kept_minutes": round(sum(c["end_s"] - c["start_s"] for c in kept) / 60, 4),
        "shards": shards,
        "groups": dict(sorted(Counter(c["group"] for c in kept).items())),
        "ignored_files": ignored,
    }


def _manifest_rows(results: list[dict[str, Any]], learned: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        video = result["video"]
        rows.append({**video, "kind": "video", "video_key": video["key"]})
        for clip in result["clips"]:
            rows.append(
                {
                    **{k: v for k, v in clip.items() if k not in ("index", "embedding", "file")},
                    "kind": "clip",
                    "video_key": video["key"],
                    "source": video["source"],
                    "clip_index": clip["index"],
                }
            )
    return rows


def curate(
    input: str | Path,
    output: str | Path,
    config: CurateConfig | None = None,
    *,
    ray_address: str | None = None,
    retry_failed: bool = False,
    say: Callable[[str], None] = _say,
) -> CurationResult:
    """Curate the videos of ``input`` (a folder or a ``.txt`` list) into ``output`` (see the module
    docstring), resuming what an earlier run into ``output`` finished. Ray: the instance this process
    already joined, else ``ray_address``, else a local one with ``config.num_cpus``.
    ``retry_failed``: curate again the videos an earlier run recorded as failed (after fixing a
    disk, a codec or a file), not only the unfinished ones. ``say`` gets the progress lines."""
    started = time.perf_counter()
    cfg = validate(config if config is not None else load_config())
    out = Path(output).expanduser().resolve()
    work = out / WORK
    sources, ignored = find_sources(input, exclude=out)
    if not sources:
        raise ConfigError(f"--input {input} holds no videos (suffixes: .mp4, .mov, .mkv, .webm, .avi, ...)")
    _check_models(cfg)
    _check_settings(work, cfg)
    shutil.rmtree(work / STAGING, ignore_errors=True)
    (work / STAGING).mkdir(parents=True)

    def done(source: Source) -> bool:
        result = _finished(work, source)
        return result is not None and not (retry_failed and result["video"]["status"] == "failed")

    todo = [s for s in sources if not done(s)]
    resumed = len(sources) - len(todo)
    say(f"{len(sources)} videos in {input}: {resumed} already curated in {out}, {len(todo)} to curate")
    with ray_session(ray_address, cfg.num_cpus):
        if todo:
            _curate_videos(todo, cfg, work, say)
        results = [_finished(work, source) or _unfinished(source, say) for source in sources]
        clips = [c for r in results for c in r["clips"]]
        _dedup(clips, cfg)
        shardable = []
        for result in results:
            video = result["video"]
            for clip in result["clips"]:
                clip["group"] = clip["shard"] = None
                if clip["decision"] != "kept":
                    continue
                seconds = clip["end_s"] - clip["start_s"]
                clip["group"] = group_name(clip["width"], clip["height"], seconds, cfg.shard)
                meta = {**clip, "source": video["source"], "video_key": video["key"]}
                shardable.append(
                    {
                        "key": clip["key"],
                        "group": clip["group"],
                        "bytes": clip["bytes"],
                        "mp4": str(work / VIDEOS / video["key"] / clip["file"]),
                        "meta": clip_metadata({k: v for k, v in meta.items() if k not in ("file", "shard")}),
                    }
                )
        plans = plan_shards(shardable, cfg.shard)
        by_key = {c["key"]: c for c in clips}
        for plan in plans:
            for key, _, _ in plan.clips:
                by_key[key]["shard"] = plan.name
        say(f"dedup and grouping done: {len(shardable)} clips into {len(plans)} shards")
        shards = _write_shards(plans, out)
    for result in results:
        result["video"]["kept"] = sum(c["decision"] == "kept" for c in result["clips"])
    learned = [f.name for f in cfg.filter.learned]
    manifest = write_manifest(_manifest_rows(results, learned), out / MANIFEST, learned)
    summary = _summary([r["video"] for r in results], clips, len(shards), len(ignored))
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    to_yaml(cfg, out / "curate.yaml")
    return CurationResult(
        output=out,
        manifest=manifest,
        shards=shards,
        summary=summary,
        curated=len(todo),
        resumed=resumed,
        seconds=time.perf_counter() - started,
    )
