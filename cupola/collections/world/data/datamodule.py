"""Video-clip batches for training causal video tokenizers, sharded over data-parallel ranks and
resumable mid-epoch.

Batch contract::

    video   float32 [B, 3, T, H, W]   in [-1, 1]; T = num_frames consecutive frames after temporal
                                      subsampling by frame_stride, H = W = size
    ids     list[str]                 the id of each clip's video (see clips.py)

Each epoch gives one clip per video: the training videos are shuffled per epoch and each rank gets
the same number of full batches of its own videos (the remainder is dropped); each clip's start and
crop are drawn from ``(seed, epoch, video index)`` (:class:`~.clips.VideoClipDataset`). The sampler
(:class:`EpochIndexSampler`) yields ``(epoch, index)`` pairs, so the epoch that Lightning sets on the
sampler reaches the draws in loader workers too, and a run resumed from a ``StatefulDataLoader``
state — mid-epoch, in any epoch — sees exactly the batches of the uninterrupted run.

Train with ``Trainer(use_distributed_sampler=False)`` (as with
:class:`~cupola.collections.llm.data.pretrain.PretrainDataModule`): this module brings its own
samplers and a ``StatefulDataLoader`` whose state Lightning checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from cupola.collections.llm.data.pretrain import ResumableDistributedSampler
from cupola.collections.world.data.clips import ON_BAD_MEDIA, VideoClipDataset, _check_int, _is_glob
from cupola.collections.world.data.synthetic import SYNTHETIC, parse_synthetic_spec, synthetic_videos
from cupola.toolkit.config import ConfigError, check_choice

__all__ = ["EpochIndexSampler", "ShardedLoaders", "VideoClipDataModule", "collate_clips"]


class EpochIndexSampler(ResumableDistributedSampler):
    """:class:`ResumableDistributedSampler` that yields ``(epoch, index)``: the dataset draws each clip
    for the epoch the sampler is in (set by Lightning's ``set_epoch``, or restored with the loader
    state), wherever the dataset runs."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        indices = super().__iter__()  # taken now: a resumed epoch skips what it already gave
        return ((epoch, index) for index in indices)


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"video": torch.stack([item["video"] for item in items]), "ids": [item["id"] for item in items]}


class ShardedLoaders(pl.LightningDataModule):
    """The sampling and resume of the world DataModules: ``train_dataset`` shuffled per epoch by
    :class:`EpochIndexSampler` over ``dp_size`` ranks (each rank the same number of full batches),
    ``val_dataset`` in order, both in a ``StatefulDataLoader`` whose state resumes mid-epoch with the
    uninterrupted run's batches. Subclasses set ``collate``, ``micro_batch_size``, ``num_workers``,
    ``seed`` and the datasets, and call :meth:`_check_shares` at the end of ``setup``.

    ``dp_rank``/``dp_size`` pick this process's share; the trainer glue sets them before ``setup``
    (default: the torch.distributed rank and world size, or 0 and 1).
    """

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    micro_batch_size: int
    num_workers: int
    seed: int
    dp_rank: int | None = None
    dp_size: int | None = None
    train_dataset: Dataset | None = None
    val_dataset: Dataset | None = None

    def _check_shares(self, available: int, described: str, more: str) -> None:
        """Fill in ``dp_rank``/``dp_size`` if the trainer glue did not, and check that every rank gets
        a full batch of the ``available`` training items (``described`` says where they come from,
        ``more`` how to get more)."""
        name = type(self).__name__
        if self.dp_size is None or self.dp_rank is None:
            distributed = dist.is_available() and dist.is_initialized()
            self.dp_rank = dist.get_rank() if distributed else 0
            self.dp_size = dist.get_world_size() if distributed else 1
        if not 0 <= self.dp_rank < self.dp_size:
            raise ConfigError(f"{name}: dp_rank={self.dp_rank} is not in [0, dp_size={self.dp_size})")
        if available // self.dp_size < self.micro_batch_size:
            raise ConfigError(
                f"{name}: {described}; over dp_size={self.dp_size} ranks that is {available // self.dp_size} "
                f"per rank, less than one batch of micro_batch_size={self.micro_batch_size}. {more}, or lower "
                "micro_batch_size."
            )

    def _loader(self, dataset: Dataset, sampler: DistributedSampler, drop_last: bool) -> StatefulDataLoader:
        return StatefulDataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=type(self).collate,
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled per epoch (Lightning calls ``sampler.set_epoch``); each rank gets the same number
        of full batches of its own items."""
        sampler = EpochIndexSampler(
            self.train_dataset,
            num_replicas=self.dp_size,
            rank=self.dp_rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
            batch_size=self.micro_batch_size,
        )
        return self._loader(self.train_dataset, sampler, drop_last=True)

    def val_dataloader(self) -> StatefulDataLoader | list:
        """In order, sharded over dp ranks (a few repeat to give every rank the same count; the last
        batch may be short); ``[]`` without a validation set: Lightning then skips validation."""
        if self.val_dataset is None:
            return []
        sampler = DistributedSampler(
            self.val_dataset, num_replicas=self.dp_size, rank=self.dp_rank, shuffle=False, drop_last=False
        )
        return self._loader(self.val_dataset, sampler, drop_last=False)


class VideoClipDataModule(ShardedLoaders):
    """Clip batches (see the module docstring for the batch contract).

    ``train`` / ``val``: a folder of videos, a video, a ``.txt`` list, ``.tar`` shards (a shard, a
    folder or glob of them), see :mod:`~cupola.collections.world.data.clips`; or generated videos,
    ``"synthetic:digits"`` / ``"synthetic:shapes"`` (``":val"`` for their validation split, built once
    into the cache, :func:`~cupola.collections.world.data.synthetic.synthetic_videos`). No ``val``,
    no validation. ``num_frames`` must suit the tokenizer (1 + k x its temporal compression,
    :func:`~cupola.collections.world.data.clips.check_num_frames`). ``on_bad_media``: ``"error"``
    or ``"skip"`` (:class:`~cupola.collections.world.data.clips.VideoClipDataset`).
    Sampling, sharding and resume: :class:`ShardedLoaders`.
    """

    collate = staticmethod(collate_clips)

    def __init__(
        self,
        *,
        train: str,
        val: str | None = None,
        num_frames: int = 17,
        size: int = 64,
        frame_stride: int = 1,
        micro_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 1234,
        on_bad_media: str = "error",
    ) -> None:
        super().__init__()
        for name in ("num_frames", "size", "frame_stride", "micro_batch_size"):
            _check_int(self, name, locals()[name], 1)
        _check_int(self, "num_workers", num_workers, 0)
        _check_int(self, "seed", seed, 0)
        check_choice(self, "on_bad_media", on_bad_media, ON_BAD_MEDIA)
        for name, source in (("train", train), ("val", val)):
            if source is None:
                continue
            if str(source).startswith(SYNTHETIC):
                parse_synthetic_spec(source)
            elif not _is_glob(str(source)) and not Path(source).expanduser().exists():
                raise FileNotFoundError(f"VideoClipDataModule.{name}: {str(source)!r} does not exist")
        self.save_hyperparameters()
        self.train, self.val = str(train), None if val is None else str(val)
        self.num_frames, self.size, self.frame_stride = num_frames, size, frame_stride
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        self.seed, self.on_bad_media = seed, on_bad_media

    @staticmethod
    def _resolve(source: str) -> str:
        return str(synthetic_videos(source)) if source.startswith(SYNTHETIC) else source

    def prepare_data(self) -> None:
        # Lightning calls this on local rank 0 only: generated videos are written once per node
        for source in (self.train, self.val):
            if source is not None:
                self._resolve(source)

    def _dataset(self, source: str, train: bool) -> VideoClipDataset:
        return VideoClipDataset(
            self._resolve(source),
            num_frames=self.num_frames,
            size=self.size,
            frame_stride=self.frame_stride,
            train=train,
            seed=self.seed,
            on_bad_media=self.on_bad_media,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = self._dataset(self.train, train=True)
        if self.val is not None and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val, train=False)
        stats = self.train_dataset.stats
        videos = len(self.train_dataset)
        self._check_shares(
            videos,
            f"train={self.train!r} gives {videos} usable videos ({stats['skipped_bad_media']} unreadable "
            f"and {stats['skipped_too_short']} too short left out)",
            "Add videos",
        )
