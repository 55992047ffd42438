"""Sharding: kept clips into webdataset tars, grouped by resolution, aspect ratio and length.

A group is ``<short side>p_<aspect>_<length bucket>`` (``256p_16x9_5-10s``); its clips, in key
order, fill ``<group>/shard-000000.tar``, ``shard-000001.tar``, ... up to ``shard.max_clips`` clips
or about ``shard.max_megabytes`` each. A shard holds ``<key>.json`` (the clip's record and caption)
and ``<key>.mp4`` per clip, members sorted by name, as a plain uncompressed tar (PAX) with every
header field that could vary fixed (mtime 0, uid/gid 0, no user names, mode 0644): the same clips
give the same bytes. :class:`~cupola.collections.world.data.clips.VideoClipDataset` (and so the
tokenizer and world-model DataModules) reads these folders directly.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cupola.collections.world.curation.config import ShardConfig, parse_ratio

__all__ = ["ShardPlan", "clip_metadata", "group_name", "plan_shards", "write_shard"]


def _number(x: float) -> str:
    return f"{x:g}".replace(".", "_")


def group_name(width: int, height: int, seconds: float, cfg: ShardConfig) -> str:
    """The group of a ``width x height`` clip of ``seconds``: the short side, the nearest of
    ``cfg.aspect_ratios`` (in log ratio), and the ``cfg.length_buckets`` bucket."""
    ratio = math.log(width / height)
    aspect = min(cfg.aspect_ratios, key=lambda r: abs(math.log(parse_ratio(r)) - ratio))
    edges = list(cfg.length_buckets)
    if seconds < edges[0]:
        length = f"0-{_number(edges[0])}s"
    elif seconds >= edges[-1]:
        length = f"{_number(edges[-1])}s+"
    else:
        upper = next(i for i, e in enumerate(edges) if seconds < e)
        length = f"{_number(edges[upper - 1])}-{_number(edges[upper])}s"
    return f"{min(width, height)}p_{aspect.replace(':', 'x')}_{length}"


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One tar: its path relative to the shards folder, and per clip (key, mp4 path, json record)."""

    name: str
    clips: tuple[tuple[str, str, str], ...]


def plan_shards(clips: list[dict[str, Any]], cfg: ShardConfig) -> list[ShardPlan]:
    """Shards for ``clips`` (each with ``key``, ``group``, ``bytes``, ``mp4`` and ``meta``: the
    JSON text stored beside it), in group then key order."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for clip in sorted(clips, key=lambda c: c["key"]):
        by_group.setdefault(clip["group"], []).append(clip)
    limit = cfg.max_megabytes * 2**20
    plans = []
    for group in sorted(by_group):
        batches: list[list[dict[str, Any]]] = [[]]
        size = 0
        for clip in by_group[group]:
            if batches[-1] and (len(batches[-1]) == cfg.max_clips or size + clip["bytes"] > limit):
                batches.append([])
                size = 0
            batches[-1].append(clip)
            size += clip["bytes"]
        plans += [_plan(group, i, batch) for i, batch in enumerate(batches)]
    return plans


def _plan(group: str, index: int, clips: list[dict[str, Any]]) -> ShardPlan:
    return ShardPlan(
        name=f"{group}/shard-{index:06d}.tar", clips=tuple((c["key"], c["mp4"], c["meta"]) for c in clips)
    )


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(plan: ShardPlan, root: str | Path) -> Path:
    """Write ``root/plan.name`` (through a temporary file and a rename); returns its path."""
    path = Path(root) / plan.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    members: list[tuple[str, Path | bytes]] = []
    for key, mp4, meta in plan.clips:
        members += [(f"{key}.json", meta.encode()), (f"{key}.mp4", Path(mp4))]
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in sorted(members, key=lambda m: m[0]):
                if isinstance(data, bytes):
                    tar.addfile(_member(name, len(data)), io.BytesIO(data))
                else:
                    with open(data, "rb") as clip:
                        tar.addfile(_member(name, data.stat().st_size), clip)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def clip_metadata(clip: dict[str, Any]) -> str:
    """The ``<key>.json`` member of a clip: its manifest record (no embedding), keys sorted."""
    return json.dumps({k: v for k, v in clip.items() if k != "embedding"}, sort_keys=True)
