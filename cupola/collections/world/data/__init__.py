"""Video-clip data for training causal video tokenizers: clips from folders, lists and webdataset
tar shards, the DataModule, and generated videos (moving digits, bouncing shapes)."""

from cupola.collections.world.data.clips import VideoClipDataset, check_num_frames, find_videos
from cupola.collections.world.data.datamodule import EpochIndexSampler, VideoClipDataModule, collate_clips
from cupola.collections.world.data.synthetic import (
    synthetic_videos,
    write_bouncing_shapes,
    write_moving_digits,
)

__all__ = [
    "EpochIndexSampler",
    "VideoClipDataModule",
    "VideoClipDataset",
    "check_num_frames",
    "collate_clips",
    "find_videos",
    "synthetic_videos",
    "write_bouncing_shapes",
    "write_moving_digits",
]
