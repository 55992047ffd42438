"""Video curation on Ray (Cosmos-style): split source videos into shots and clips, transcode, filter,
caption, deduplicate and shard them into webdataset tars, with a manifest that records every
source video and every clip, kept or dropped, and why. See ``README.md`` beside this file."""

from cupola.collections.world.curation.config import CurateConfig, load_config
from cupola.collections.world.curation.corpus import (
    Corpus,
    Shot,
    write_broken_videos,
    write_curation_corpus,
    write_shot_video,
)
from cupola.collections.world.curation.pipeline import CurationResult, curate, ray_session

__all__ = [
    "Corpus",
    "CurateConfig",
    "CurationResult",
    "Shot",
    "curate",
    "load_config",
    "ray_session",
    "write_broken_videos",
    "write_curation_corpus",
    "write_shot_video",
]
