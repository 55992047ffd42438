"""The source videos a run curates, and the keys that name them and their clips.

``--input`` is a folder (every file below it with a video suffix, recursive, hidden files and the
run's own output folder left out) or a ``.txt`` list (one path a line, relative to the list's
folder; blank lines and ``#`` comments ignored). A listed file that does not exist is still a
source: it fails, and the manifest says so.

Keys are stable and webdataset-safe: a video's key is its relative path with every character other
than letters, digits, ``_`` and ``-`` replaced by ``_``, then ``-`` and 8 hex digits of the
path's SHA-1 (two paths never share a key even when they sanitise alike); clip ``i`` of it is
``<video key>-<i:04d>``. No key holds a dot, so ``<key>.mp4`` / ``<key>.json`` split where
webdataset splits them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cupola.toolkit.config import ConfigError

__all__ = ["VIDEO_SUFFIXES", "Source", "clip_key", "find_sources", "video_key"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".ts",
    ".mts",
    ".flv",
    ".wmv",
    ".3gp",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_READABLE = 80  # characters of the sanitised path kept in a key


@dataclass(frozen=True, slots=True)
class Source:
    """One input video: ``name`` is how the manifest records it (its path relative to the input
    folder, or as the list wrote it), ``path`` where it is read."""

    key: str
    name: str
    path: str


def video_key(name: str) -> str:
    """The key of the source recorded as ``name`` (see the module docstring)."""
    stem = name.rsplit(".", 1)[0] if "." in Path(name).name else name
    readable = _UNSAFE.sub("_", stem.strip("/"))[-_MAX_READABLE:].strip("_") or "video"
    return f"{readable}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def clip_key(video: str, index: int) -> str:
    """The key of clip ``index`` (in time order, counting too-short pieces) of video ``video``."""
    return f"{video}-{index:04d}"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def find_sources(input: str | Path, exclude: str | Path | None = None) -> tuple[list[Source], list[str]]:
    """``(sources sorted by key, ignored files)`` of a folder or a ``.txt`` list; files under
    ``exclude`` (the run's output folder) are never sources. Ignored: files in the folder whose
    suffix is not a video suffix."""
    root = Path(input).expanduser()
    excluded = Path(exclude).expanduser().resolve() if exclude is not None else None
    if not root.exists():
        raise FileNotFoundError(
            f"--input {root} does not exist: give a folder of videos or a .txt list of them"
        )
    found: dict[str, Source] = {}
    ignored: list[str] = []
    if root.is_dir():
        base = root.resolve()
        for path in sorted(base.rglob("*")):
            if not path.is_file() or _hidden(path, base) or _inside(path, excluded):
                continue
            name = path.relative_to(base).as_posix()
            if path.suffix.lower() in VIDEO_SUFFIXES:
                found.setdefault(video_key(name), Source(video_key(name), name, str(path)))
            else:
                ignored.append(name)
    elif root.suffix.lower() == ".txt":
        for line in root.read_text().splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = Path(entry).expanduser()
            path = path if path.is_absolute() else root.parent / path
            key = video_key(entry)
            if key in found:
                log.warning("%s lists %s more than once; curating it once", root, entry)
            found.setdefault(key, Source(key, entry, os.path.abspath(path)))
    else:
        raise ConfigError(
            f"--input {root} is neither a folder nor a .txt list: give a folder of videos or a text file "
            "with one video path a line"
        )
    if ignored:
        log.info("%s: %d files without a video suffix ignored (e.g. %s)", root, len(ignored), ignored[0])
    return [found[k] for k in sorted(found)], ignored
