"""Video/image conversation batches for VLM training: JSONL conversations → packed rows, media
decoded lazily, sharded over data-parallel ranks and resumable mid-epoch.

Batch contract (every key of :func:`~cupola.collections.vlm.data.conversations.collate_rows`)::

    tokens        int64   [B, T]       T = seq_len; padding = tokenizer.pad_id (else eos_id)
    labels        int64   [B, T]       next-token targets on answers and their eos, else -100
    positions     int64   [B, T]       0.. per packed sample (padding: 0)
    document_ids  int64   [B, T]       0, 1, 2, .. per sample in its row, -1 on padding:
                                       attend only where equal (block-diagonal causal)
    media         float32 [N, 3, S, S] every frame of the batch, row by row, each row's samples in
                                       order, each sample's media in marker order; SigLIP-normalised,
                                       [-1, 1]. N = (number of media_token_id in tokens) / tokens_per_frame
    ids           list[list[str]]      the sample ids of each row
    media_share   int64   [3]          only under sequence parallelism (sp_size > 1): media then holds
                                       frames [first, end) of the batch's total, this SP rank's share

Rows are planned once, when the dataset is built (:class:`PackedConversationDataset`): every
media file is probed (opened, first frame decoded) for its frame count, every conversation is
tokenized for its length, samples are ordered by a ``seed``-permutation and packed first-fit. The
plan is the same on every rank, so the sampler shards rows, and a resumed run finds the same rows.

Train with ``Trainer(use_distributed_sampler=False)`` (as with
:class:`~cupola.collections.llm.data.pretrain.PretrainDataModule`): this module brings its own
:class:`~cupola.collections.llm.data.pretrain.ResumableDistributedSampler` and a
``StatefulDataLoader`` whose state Lightning checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from cupola.collections.llm.data.pretrain import ResumableDistributedSampler
from cupola.collections.vlm.data.conversations import (
    IGNORE_INDEX,
    Conversation,
    Media,
    collate_rows,
    first_fit,
    pack_row,
    read_conversations,
    tokenize_conversation,
    too_long_message,
)
from cupola.collections.vlm.data.synthetic import SYNTHETIC, synthetic_dataset_file
from cupola.toolkit.config import ConfigError, check_choice, config_error
from cupola.toolkit.data.tokenizer import Tokenizer, load_tokenizer
from cupola.toolkit.data.video import (
    MediaError,
    image_info,
    read_frames,
    read_image,
    sample_indices,
    to_pixels,
    video_info,
)
from cupola.toolkit.parallel.sequence.multimodal import media_share

__all__ = ["DEFAULT_NUM_FRAMES", "MediaShareCollate", "PackedConversationDataset", "VLMDataModule"]

log = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 8
ON_BAD_MEDIA = ("error", "skip")
ON_TOO_LONG = ("error", "skip")


def _check_int(owner: object, name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise config_error(
            owner, name, value, f"must be an integer >= {minimum}" + (" or None" if optional else "")
        )


def _check_frame_sampling(
    owner: object, num_frames: int | None, fps: float | None, max_frames: int | None
) -> None:
    """``num_frames`` xor ``fps``; ``max_frames`` only caps ``fps`` sampling."""
    if (num_frames is None) == (fps is None):
        raise config_error(
            owner,
            "num_frames",
            num_frames,
            f"give exactly one of num_frames and fps (fps={fps}); a clip is "
            "sampled either as num_frames frames spread over it, or at fps frames per second",
        )
    _check_int(owner, "num_frames", num_frames, optional=True)
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise config_error(owner, "fps", fps, "must be a number > 0, or None")
    _check_int(owner, "max_frames", max_frames, optional=True)
    if max_frames is not None and fps is None:
        raise config_error(
            owner,
            "max_frames",
            max_frames,
            "only caps fps sampling; with num_frames, lower num_frames instead",
        )


class PackedConversationDataset(Dataset):
    """Packed rows (see the module docstring) of the conversations in one JSONL file.

    ``num_frames`` / ``fps`` / ``max_frames``: how frames are sampled from each video
    (:func:`~cupola.toolkit.data.video.sample_indices`); images are one frame. Frames are decoded at
    ``image_size x image_size`` (decord resizes videos while decoding, Pillow resizes images).

    ``on_bad_media``: a missing, corrupt or empty media file raises :class:`MediaError` naming the
    file and the sample (``"error"``), or drops every sample using it (``"skip"``, one warning per
    file). ``on_too_long``: a sample longer than ``seq_len`` raises naming it (``"error"``) or is
    dropped (``"skip"``). Dropped samples are counted in :attr:`stats`. A file found bad only when
    a row is read (changed since the build) raises, or in ``"skip"`` mode leaves that sample's
    tokens in the row as ignored padding without media.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        tokens_per_frame: int,
        image_size: int,
        num_frames: int | None = DEFAULT_NUM_FRAMES,
        fps: float | None = None,
        max_frames: int | None = None,
        media_token_id: int | None = None,
        on_bad_media: str = "error",
        on_too_long: str = "error",
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        for name in ("seq_len", "tokens_per_frame", "image_size"):
            _check_int(self, name, locals()[name])
        _check_frame_sampling(self, num_frames, fps, max_frames)
        check_choice(self, "on_bad_media", on_bad_media, ON_BAD_MEDIA)
        check_choice(self, "on_too_long", on_too_long, ON_TOO_LONG)
        self.path = Path(path).expanduser().resolve()
        self.tokenizer = tokenizer
        self.seq_len, self.tokens_per_frame, self.image_size = seq_len, tokens_per_frame, image_size
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames
        self.media_token_id = tokenizer.vocab_size if media_token_id is None else media_token_id
        self.pad_id = tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id
        self.on_bad_media = on_bad_media
        self.skipped_bad_media = 0
        self.skipped_too_long = 0
        self.bad_files: dict[str, str] = {}  # path -> why it cannot be used
        # False: rows carry media_refs instead of pixels (MediaShareCollate decodes a share of them)
        self.decode_media = True
        self._probed: dict[Path, int | MediaError] = {}

        kept: list[tuple[Conversation, tuple[int, ...]]] = []
        lengths: list[int] = []
        for conversation in read_conversations(self.path):
            try:
                frames = tuple(self._probe(m) for m in conversation.media)
            except MediaError as e:
                if on_bad_media == "error":
                    raise MediaError(f"sample {conversation.id!r}: {e}") from e
                self.skipped_bad_media += 1
                continue
            length = len(self._tokenize(conversation, frames)[0])
            if length > seq_len:
                media_tokens = sum(frames) * tokens_per_frame
                detail = (
                    f"{sum(frames)} frames x {tokens_per_frame} tokens per frame = {media_tokens} media "
                    f"tokens, plus {length - media_tokens} text tokens"
                )
                if on_too_long == "error":
                    raise ValueError(too_long_message(conversation.id, length, seq_len, detail))
                self.skipped_too_long += 1
                continue
            kept.append((conversation, frames))
            lengths.append(length)
        if not kept:
            raise ValueError(
                f"{self.path}: no usable samples ({self.skipped_bad_media} dropped for bad media, "
                f"{self.skipped_too_long} longer than seq_len={seq_len})"
            )
        order = np.random.default_rng(seed).permutation(len(kept)) if shuffle else np.arange(len(kept))
        self.samples = [kept[i] for i in order]
        self.lengths = [lengths[i] for i in order]
        self.rows = first_fit(self.lengths, seq_len)  # sample indices per row
        self._probed = {}  # not needed after the build; keeps the pickle sent to workers small
        log.info("%s: %s", self.path.name, self.stats)

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "samples": len(self.samples),
            "rows": len(self.rows),
            "fill": round(sum(self.lengths) / (len(self.rows) * self.seq_len), 4),
            "skipped_bad_media": self.skipped_bad_media,
            "skipped_too_long": self.skipped_too_long,
            "bad_files": len(self.bad_files),
        }

    def _sampled_frames(self, total: int, video_fps: float) -> int:
        kw = {"num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames}
        return len(sample_indices(total, video_fps, **kw))

    def _probe(self, media: Media) -> int:
        """The frame count ``media`` gives (1 for an image); a bad file is remembered and warned about once."""
        found = self._probed.get(media.path)
        if found is None:
            try:
                if media.type == "image":
                    image_info(media.path)
                    found = 1
                else:
                    info = video_info(media.path)
                    found = self._sampled_frames(info.frames, info.fps)
            except MediaError as e:
                found = e
                self.bad_files[str(media.path)] = str(e)
                if self.on_bad_media == "skip":
                    log.warning("skipping the samples that use a bad media file: %s", e)
            self._probed[media.path] = found
        if isinstance(found, MediaError):
            raise found
        return found

    def _tokenize(self, conversation: Conversation, frames: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        return tokenize_conversation(
            conversation,
            self.tokenizer,
            media_frames=frames,
            tokens_per_frame=self.tokens_per_frame,
            media_token_id=self.media_token_id,
        )

    def _pixels(self, media: Media) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if media.type == "image":
            frames = read_image(media.path, size=size)[None]
        else:
            kw = {"num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames}
            frames = read_frames(media.path, size=size, **kw)
        return to_pixels(frames, self.image_size)

    def sample(self, j: int, decode: bool = True) -> dict[str, Any]:
        """Sample ``j`` (in packing order) alone: ``id``, ``tokens``/``labels``/``positions``
        (``int64 [L]``) and ``media`` (``float32 [F, 3, S, S]``, its frames in marker order).
        ``decode=False``: no pixels; ``media_refs`` lists ``(sample id, media, frames)`` to decode
        later (:class:`MediaShareCollate`)."""
        conversation, frames = self.samples[j]
        tokens, labels = self._tokenize(conversation, frames)
        if not decode:
            return {
                "id": conversation.id,
                "tokens": torch.from_numpy(tokens),
                "labels": torch.from_numpy(labels),
                "positions": torch.arange(len(tokens), dtype=torch.int64),
                "media": None,
                "media_refs": [(conversation.id, m, f) for m, f in zip(conversation.media, frames)],
            }
        try:
            pixels = [self._pixels(m) for m in conversation.media]
            for m, f, p in zip(conversation.media, frames, pixels):
                if p.shape[0] != f:
                    raise MediaError(
                        f"{m.type} {m.path} now gives {p.shape[0]} frames; it gave {f} when the dataset was "
                        "built (the file changed: rebuild the dataset)"
                    )
        except MediaError as e:
            if self.on_bad_media == "error":
                raise MediaError(f"sample {conversation.id!r}: {e}") from e
            log.warning("sample %r: its media cannot be read, trained as padding: %s", conversation.id, e)
            tokens = np.full_like(tokens, self.pad_id)
            labels = np.full_like(labels, IGNORE_INDEX)
            pixels = []
        empty = torch.zeros(0, 3, self.image_size, self.image_size)
        return {
            "id": conversation.id,
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "positions": torch.arange(len(tokens), dtype=torch.int64),
            "media": torch.cat(pixels) if pixels else empty,
        }

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.decode_media:
            return pack_row([self.sample(j) for j in self.rows[int(i)]], self.seq_len, self.pad_id)
        samples = [self.sample(j, decode=False) for j in self.rows[int(i)]]
        row = pack_row(samples, self.seq_len, self.pad_id)
        row["media_refs"] = [ref for s in samples for ref in s["media_refs"]]
        return row

    def frames_part(self, sample_id: str, media: Media, frames: int, part: slice) -> torch.Tensor:
        """Frames ``part`` of ``media`` (which gives ``frames``), decoded alone: ``float32 [n, 3, S, S]``.

        A file found bad now (changed since the build) raises :class:`MediaError` naming it; with
        ``on_bad_media="skip"`` it gives blank frames instead, with a warning — the other
        sequence-parallel ranks hold (and train on) the sample's tokens, so this rank cannot drop
        them alone."""
        size = (self.image_size, self.image_size)
        want = len(range(frames)[part])
        try:
            if media.type == "image":
                pixels = to_pixels(read_image(media.path, size=size)[None], self.image_size)[part]
            else:
                kw = {"num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames}
                pixels = to_pixels(read_frames(media.path, size=size, part=part, **kw), self.image_size)
            if pixels.shape[0] != want:
                raise MediaError(
                    f"{media.type} {media.path} now gives other frames than when the dataset was built "
                    f"({pixels.shape[0]} where {want} were expected; the file changed: rebuild the dataset)"
                )
        except MediaError as e:
            if self.on_bad_media == "error":
                raise MediaError(f"sample {sample_id!r}: {e}") from e
            log.warning(
                "sample %r: frames %s of its media cannot be read, blank frames used: %s", sample_id, part, e
            )
            pixels = torch.zeros(want, 3, self.image_size, self.image_size)
        return pixels

    def __repr__(self) -> str:
        return f"PackedConversationDataset({str(self.path)!r}, seq_len={self.seq_len}: {self.stats})"


class MediaShareCollate:
    """Collate for sequence-parallel training (MM-SP's first stage, at the data): the batch's frames
    are split into ``sp_size`` equal shares (:func:`~cupola.toolkit.parallel.sequence.multimodal.media_share`,
    in batch order) and only rank ``sp_rank``'s share is decoded. The batch is
    :func:`~cupola.collections.vlm.data.conversations.collate_rows`'s, with ``media`` this rank's
    frames and ``media_share`` = ``int64 [3]`` (first, end, total) of the batch's frames."""

    def __init__(self, dataset: PackedConversationDataset, sp_rank: int, sp_size: int) -> None:
        self.dataset, self.sp_rank, self.sp_size = dataset, sp_rank, sp_size

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        refs = [ref for r in rows for ref in r.pop("media_refs")]
        total = sum(frames for _, _, frames in refs)
        share = media_share(total, self.sp_size, self.sp_rank)
        pixels, at = [], 0
        for sample_id, media, frames in refs:
            lo, hi = max(share.start, at), min(share.stop, at + frames)
            if lo < hi:
                pixels.append(self.dataset.frames_part(sample_id, media, frames, slice(lo - at, hi - at)))
            at += frames
        batch = collate_rows(rows)
        size = self.dataset.image_size
        batch["media"] = torch.cat(pixels) if pixels else torch.zeros(0, 3, size, size)
        batch["media_share"] = torch.tensor([share.start, share.stop, total])
        return batch


class VLMDataModule(pl.LightningDataModule):
    """Packed video/image conversation batches (see the module docstring for the batch contract).

    ``train_file`` / ``val_file``: JSONL conversations
    (:mod:`~cupola.collections.vlm.data.conversations`); no ``val_file``, no validation;
    ``"synthetic"`` / ``"synthetic:val"``: the generated dataset (built once into the cache).
    ``tokens_per_frame`` and ``image_size`` must match the model (its projector's output per frame
    and its vision tower's input). Frames: ``num_frames`` spread uniformly over each video (default
    8), or ``fps`` frames per second capped at ``max_frames``. ``tokenizer``: ``None``/``"byte"``
    or a local ``tokenizer.json`` (:func:`~cupola.toolkit.data.tokenizer.load_tokenizer`).
    ``media_token_id``: the placeholder id (default ``tokenizer.vocab_size``). ``on_bad_media``,
    ``on_too_long``: ``"error"`` or ``"skip"`` (:class:`PackedConversationDataset`).

    ``dp_rank``/``dp_size`` pick this process's share; the trainer glue sets them before ``setup``
    (default: the torch.distributed rank and world size, or 0 and 1). Under sequence parallelism it
    also sets ``sp_rank``/``sp_size``: the ranks of an SP group get the same rows, and each decodes
    only its share of their frames (:class:`MediaShareCollate`).
    """

    def __init__(
        self,
        *,
        train_file: str,
        tokens_per_frame: int,
        image_size: int,
        val_file: str | None = None,
        seq_len: int = 2048,
        micro_batch_size: int = 1,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        tokenizer: str | None = None,
        media_token_id: int | None = None,
        on_bad_media: str = "error",
        on_too_long: str = "error",
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        for name in ("seq_len", "micro_batch_size", "tokens_per_frame", "image_size"):
            _check_int(self, name, locals()[name])
        _check_int(self, "num_workers", num_workers, minimum=0)
        if num_frames is None and fps is None:
            num_frames = DEFAULT_NUM_FRAMES
        _check_frame_sampling(self, num_frames, fps, max_frames)
        check_choice(self, "on_bad_media", on_bad_media, ON_BAD_MEDIA)
        check_choice(self, "on_too_long", on_too_long, ON_TOO_LONG)
        if str(train_file).startswith(SYNTHETIC):
            train_file = str(synthetic_dataset_file(train_file))
        if val_file is not None and str(val_file).startswith(SYNTHETIC):
            val_file = str(synthetic_dataset_file(val_file))
        for name, file in (("train_file", train_file), ("val_file", val_file)):
            if file is not None and not Path(file).expanduser().is_file():
                raise FileNotFoundError(f"VLMDataModule.{name}: {str(file)!r} is not a file")
        self.save_hyperparameters()
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        specials = {self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id} - {None}
        if media_token_id is None:
            media_token_id = self.tokenizer.vocab_size
        elif not isinstance(media_token_id, int) or media_token_id < 0 or media_token_id in specials:
            raise config_error(
                self,
                "media_token_id",
                media_token_id,
                f"must be an integer >= 0 that is not a special token of the tokenizer ({sorted(specials)}); "
                f"None picks {self.tokenizer.vocab_size}, one past the text vocabulary",
            )
        self.train_file = str(Path(train_file).expanduser().resolve())
        self.val_file = None if val_file is None else str(Path(val_file).expanduser().resolve())
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.tokens_per_frame, self.image_size = tokens_per_frame, image_size
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames
        self.media_token_id = media_token_id
        self.on_bad_media, self.on_too_long = on_bad_media, on_too_long
        self.num_workers, self.seed = num_workers, seed
        self.dp_rank: int | None = None
        self.dp_size: int | None = None
        self.sp_rank, self.sp_size = 0, 1
        self.train_dataset: PackedConversationDataset | None = None
        self.val_dataset: PackedConversationDataset | None = None

    @property
    def vocab_size(self) -> int:
        """The text vocabulary; the model's embedding needs ``max(vocab_size, media_token_id + 1)`` rows."""
        return self.tokenizer.vocab_size

    def _dataset(self, path: str, shuffle: bool) -> PackedConversationDataset:
        return PackedConversationDataset(
            path,
            self.tokenizer,
            seq_len=self.seq_len,
            tokens_per_frame=self.tokens_per_frame,
            image_size=self.image_size,
            num_frames=self.num_frames,
            fps=self.fps,
            max_frames=self.max_frames,
            media_token_id=self.media_token_id,
            on_bad_media=self.on_bad_media,
            on_too_long=self.on_too_long,
            seed=self.seed,
            shuffle=shuffle,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_file, shuffle=True)
        if self.val_file is not None and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_file, shuffle=False)
        if self.dp_size is None or self.dp_rank is None:
            distributed = dist.is_available() and dist.is_initialized()
            self.dp_rank = dist.get_rank() if distributed else 0
            self.dp_size = dist.get_world_size() if distributed else 1
        if not 0 <= self.dp_rank < self.dp_size:
            raise ConfigError(f"VLMDataModule: dp_rank={self.dp_rank} is not in [0, dp_size={self.dp_size})")
        if not 0 <= self.sp_rank < self.sp_size:
            raise ConfigError(f"VLMDataModule: sp_rank={self.sp_rank} is not in [0, sp_size={self.sp_size})")
        for dataset in (self.train_dataset, self.val_dataset):
            if dataset is not None:
                dataset.decode_media = self.sp_size == 1
        rows = len(self.train_dataset)
        if rows // self.dp_size < self.micro_batch_size:
            raise ConfigError(
                f"VLMDataModule: {self.train_file} packs into {rows} rows of seq_len={self.seq_len} "
                f"({self.train_dataset.stats['samples']} samples); over dp_size={self.dp_size} ranks that is "
                f"{rows // self.dp_size} per rank, less than one batch of micro_batch_size="
                f"{self.micro_batch_size}. Add data, or lower seq_len or micro_batch_size."
            )

    def _loader(self, dataset: Dataset, sampler: DistributedSampler, drop_last: bool) -> StatefulDataLoader:
        return StatefulDataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_rows
            if self.sp_size == 1
            else MediaShareCollate(dataset, self.sp_rank, self.sp_size),
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        """Rows shuffled per epoch (Lightning calls ``sampler.set_epoch``); each rank gets the same
        number of full batches of its own rows (the remainder of the epoch is dropped)."""
        sampler = ResumableDistributedSampler(
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
        """Rows in order, sharded over dp ranks (a few rows repeat to give every rank the same count);
        ``[]`` without a ``val_file``: Lightning then skips validation."""
        if self.val_dataset is None:
            return []
        sampler = DistributedSampler(
            self.val_dataset, num_replicas=self.dp_size, rank=self.dp_rank, shuffle=False, drop_last=False
        )
        return self._loader(self.val_dataset, sampler, drop_last=False)
