"""The manifest: one Parquet table, one row per source video and one per clip.

Every source video has a row (``kind = "video"``), failed ones with their error; every piece of a
shot has a row (``kind = "clip"``), dropped ones with the reason. :data:`COLUMNS` is the schema and
its documentation (the README's table is checked against it); a configured learned filter adds a
``learned_<name>`` column. Rows are sorted by key, so the same run gives the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "manifest_schema", "write_manifest"]

# name -> (Arrow type, what it holds); video rows fill the first group, clip rows the second
COLUMNS: dict[str, tuple[str, str]] = {
    "kind": ("string", "`video` or `clip`"),
    "key": (
        "string",
        "the video's key, or the clip's (`<video key>-<index>`); also the clip's name in its shard",
    ),
    "video_key": ("string", "the source video's key (on both kinds of rows)"),
    "source": ("string", "the source video's path relative to `--input` (or as the list wrote it)"),
    "status": ("string", "video rows: `ok` or `failed`"),
    "error": ("string", "video rows: why a failed video failed (the decoder's message included)"),
    "size_bytes": ("int64", "video rows: the source file's size"),
    "container": (
        "string",
        "video rows: the container format FFmpeg found (`mov,mp4,m4a,3gp,3g2,mj2`, `avi`, ...)",
    ),
    "codec": ("string", "video rows: the video codec (`h264`, `mpeg4`, `mjpeg`, ...)"),
    "width": ("int32", "source width (video rows) or transcoded width (clip rows), pixels"),
    "height": ("int32", "source height (video rows) or transcoded height (clip rows), pixels"),
    "fps": ("float64", "video rows: the source's average frame rate"),
    "frames": ("int64", "frames decoded (video rows) or source frames the clip spans (clip rows)"),
    "duration_s": ("float64", "video rows: frames / fps"),
    "shots": ("int32", "video rows: shots detected"),
    "clips": ("int32", "video rows: clip rows of this video (kept and dropped)"),
    "kept": ("int32", "video rows: clips of this video that reached a shard"),
    "clip_index": ("int32", "clip rows: position in the video, in time order"),
    "shot": ("int32", "clip rows: the shot it was cut from (from 0)"),
    "start_frame": ("int64", "clip rows: first source frame"),
    "end_frame": ("int64", "clip rows: source frame after the last"),
    "start_s": ("float64", "clip rows: start in the source, seconds"),
    "end_s": ("float64", "clip rows: end in the source, seconds"),
    "out_fps": ("float64", "clip rows: frame rate of the transcoded clip"),
    "out_frames": ("int64", "clip rows: frames in the transcoded clip (0 if not kept)"),
    "bytes": ("int64", "clip rows: size of the transcoded mp4 (0 if not kept)"),
    "motion": ("float64", "clip rows: motion, fraction of the short side per second"),
    "motion_method": ("string", "clip rows: `mv` (codec motion vectors) or `flow` (optical flow)"),
    "sharpness": ("float64", "clip rows: variance of the Laplacian of the luma"),
    "brightness": ("float64", "clip rows: mean luma in [0, 1]"),
    "clipped": ("float64", "clip rows: fraction of pixels at black or white"),
    "decision": ("string", "clip rows: `kept` or `dropped`"),
    "reason": (
        "string",
        "clip rows: why it was dropped: `too_short`, `low_motion`, `high_motion`, `blurry`, `underexposed`, "
        "`overexposed`, `clipped`, `learned:<name>` (comma-separated when several), or `duplicate_of:<key>`",
    ),
    "caption": ("string", "clip rows: the caption (clips that passed the filters)"),
    "group": ("string", "clip rows: the shard group, `<short side>p_<aspect>_<length bucket>`"),
    "shard": ("string", "clip rows: the tar holding it, relative to `shards/` (kept clips)"),
}


def manifest_schema(learned: list[str]) -> Any:  # -> pyarrow.Schema
    """The table's schema: :data:`COLUMNS`, then ``learned_<name>`` (float64) per learned filter."""
    import pyarrow as pa

    fields = [pa.field(name, getattr(pa, kind)()) for name, (kind, _) in COLUMNS.items()]
    fields += [pa.field(f"learned_{name}", pa.float64()) for name in learned]
    return pa.schema(fields)


def write_manifest(rows: list[dict[str, Any]], path: Path, learned: list[str]) -> Path:
    """Write ``rows`` (dicts with any subset of the columns; missing ones are null), sorted by
    ``(video_key, kind != video, key)``, as Parquet at ``path`` (through a temporary file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = manifest_schema(learned)
    ordered = sorted(rows, key=lambda r: (r["video_key"], r["kind"] != "video", r["key"]))
    table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in ordered], schema=schema)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
