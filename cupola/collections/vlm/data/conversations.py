"""Video/image conversations: the JSONL record format, the chat template, tokenization with media
placeholders, and packing of several conversations into one training row.

Record format (LLaVA/VILA-like), one JSON object per line::

    {"id": "vid007",
     "media": [{"type": "video", "path": "videos/vid007.mp4"}],
     "conversations": [{"from": "human", "value": "<video>\\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "red"},
                       {"from": "human", "value": "Which way does it move?"},
                       {"from": "gpt", "value": "left"}]}

- ``id``: names the sample in every error and warning (default: ``file:line``).
- ``media``: images and videos in order of appearance; ``path`` is relative to the JSONL file's
  folder, or absolute. ``"media": []`` (or no key) for a text-only conversation.
- ``conversations``: turns alternating ``human`` / ``gpt`` (``user`` / ``assistant`` accepted),
  starting with ``human`` and ending with ``gpt``. The k-th ``<image>`` / ``<video>`` marker in the
  human turns stands for ``media[k]`` and must match its type; gpt turns hold no markers.

Chat template (tokenizer-agnostic: pieces encoded one by one with ``tokenizer.encode``, so the
same text always gives the same ids, and a generation prompt is an exact prefix of a training
sample)::

    [bos]                                            (when the tokenizer has one)
    per human turn:  "USER: " · content · "\\n"       content: text with each marker replaced by
                                                     frames * tokens_per_frame media_token_id's
    per gpt turn:    "ASSISTANT: " · answer · [eos]

so a two-turn sample reads ``<bos>USER: <m><m>…\\nWhat colour is the shape?\\nASSISTANT: red<eos>USER:
Which way does it move?\\nASSISTANT: left<eos>``. There is no system prompt. Only the answers and
their ``eos`` are trained: ``labels[t]`` is the target for position ``t`` (the next token, the
convention of :class:`~cupola.toolkit.data.tokens.PackedTokenDataset`), and is ``IGNORE_INDEX``
unless token ``t + 1`` is an answer token or an answer's ``eos``.

Media expansion: an image is one frame; a video of ``F`` sampled frames is ``F`` frames in order;
each frame becomes ``tokens_per_frame`` copies of ``media_token_id`` (default
``tokenizer.vocab_size``, one id past the text vocabulary: the model's embedding table then has
``vocab_size + 1`` rows). The VILA model replaces those positions, in order, by the frames'
visual tokens.

Packing (:func:`pack`, :func:`first_fit`): whole samples are placed into rows of ``seq_len``
tokens; a sample never spans two rows. Each row carries ``document_ids`` (0, 1, 2, … per sample,
``-1`` on padding): the model must attend only within equal ``document_ids`` (block-diagonal
causal mask, :func:`cupola.toolkit.modules.attention.document_causal_mask`), and ``positions``
restart at 0 for each sample, so a packed sample computes exactly what it would alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cupola.toolkit.data.tokenizer import Tokenizer

__all__ = [
    "ASSISTANT_PREFIX",
    "IGNORE_INDEX",
    "USER_PREFIX",
    "Conversation",
    "Media",
    "collate_rows",
    "first_fit",
    "media_markers",
    "pack",
    "pack_row",
    "parse_conversation",
    "prompt_ids",
    "read_conversations",
    "tokenize_conversation",
    "too_long_message",
]

IGNORE_INDEX = -100  # the label of positions without a target (cross_entropy's ignore_index)
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "ASSISTANT: "
HUMAN_END = "\n"
MARKERS = {"<image>": "image", "<video>": "video"}
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass(frozen=True, slots=True)
class Media:
    type: str  # "image" | "video"
    path: Path  # absolute


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    media: tuple[Media, ...]
    turns: tuple[tuple[str, str], ...]  # (role, text): "human"/"gpt", alternating, human first, gpt last


def media_markers(text: str) -> list[str]:
    """The media types of the markers in ``text``, in order (``["video", "image"]``)."""
    return [MARKERS[m.group(0)] for m in _MARKER_RE.finditer(text)]


def parse_conversation(record: Any, base_dir: str | Path, default_id: str = "?") -> Conversation:
    """A validated :class:`Conversation` from one JSON record (see the module docstring); relative
    media paths are resolved against ``base_dir``. Errors are ``ValueError`` naming the sample."""
    if not isinstance(record, dict):
        raise ValueError(f"sample {default_id}: a record must be a JSON object, got {type(record).__name__}")
    sample_id = str(record.get("id", default_id))
    where = f"sample {sample_id!r}"
    turns_raw = record.get("conversations")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(turns_raw):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {k} must be {{'from': ..., 'value': <string>}}, got {turn!r}")
        role = _ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise ValueError(f"{where}: turn {k} is from {turn.get('from')!r}; use 'human' or 'gpt'")
        expected = "human" if k % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(
                f"{where}: turn {k} is from {role!r}, expected {expected!r} (turns alternate, human first)"
            )
        if role == "gpt" and media_markers(turn["value"]):
            raise ValueError(f"{where}: turn {k} (gpt) holds a media marker; markers belong in human turns")
        turns.append((role, turn["value"]))
    if turns[-1][0] != "gpt":
        raise ValueError(
            f"{where}: the last turn is from 'human'; a training sample ends with a 'gpt' answer"
        )

    media_raw = record.get("media") or []
    if not isinstance(media_raw, list):
        raise ValueError(
            f"{where}: 'media' must be a list of {{'type', 'path'}}, got {type(media_raw).__name__}"
        )
    media: list[Media] = []
    for k, item in enumerate(media_raw):
        if not isinstance(item, dict) or item.get("type") not in ("image", "video") or not item.get("path"):
            raise ValueError(
                f"{where}: media[{k}] must be {{'type': 'image' | 'video', 'path': <string>}}, got {item!r}"
            )
        path = Path(item["path"]).expanduser()
        media.append(Media(item["type"], path if path.is_absolute() else Path(base_dir) / path))
    markers = [t for role, text in turns if role == "human" for t in media_markers(text)]
    if len(markers) != len(media):
        found = ", ".join(f"<{m}>" for m in markers) or "none"
        raise ValueError(
            f"{where}: its human turns hold {len(markers)} media markers ({found}) but 'media' lists "
            f"{len(media)} files; the k-th <image>/<video> marker stands for media[k]"
        )
    for k, (marker, item) in enumerate(zip(markers, media)):
        if marker != item.type:
            raise ValueError(
                f"{where}: media marker {k} is <{marker}> but media[{k}] is a {item.type} ({item.path})"
            )
    return Conversation(sample_id, tuple(media), tuple(turns))


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every record of a JSONL file (blank lines skipped); errors name ``file:line`` and the sample."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"conversation file {path} does not exist")
    conversations = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            try:
                conversations.append(parse_conversation(record, path.parent, default_id=where))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
    if not conversations:
        raise ValueError(f"conversation file {path} holds no records")
    return conversations


def _human_ids(
    text: str, tokenizer: Tokenizer, frames: Iterator[int], tokens_per_frame: int, media_token_id: int
) -> list[int]:
    ids = tokenizer.encode(USER_PREFIX)
    start = 0
    for m in _MARKER_RE.finditer(text):
        if m.start() > start:
            ids += tokenizer.encode(text[start : m.start()])
        ids += [media_token_id] * (next(frames) * tokens_per_frame)
        start = m.end()
    return ids + tokenizer.encode(text[start:] + HUMAN_END)


def _check_media(
    n_markers: int, media_frames: Sequence[int], tokens_per_frame: int, media_token_id: int | None, tokenizer
) -> int:
    if n_markers != len(media_frames):
        raise ValueError(
            f"the text holds {n_markers} media markers but media_frames gives {len(media_frames)} entries"
        )
    if any(f < 0 for f in media_frames):  # 0 is allowed: the text's own length, as a prompt budget
        raise ValueError(f"media_frames={list(media_frames)}: frame counts must be >= 0")
    if tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame={tokens_per_frame} is not valid: must be >= 1")
    return tokenizer.vocab_size if media_token_id is None else media_token_id


def tokenize_conversation(
    conversation: Conversation,
    tokenizer: Tokenizer,
    *,
    media_frames: Sequence[int],
    tokens_per_frame: int,
    media_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, labels)``, ``int64 [L]`` each, by the chat template (module docstring);
    ``media_frames[k]`` is the number of frames of ``conversation.media[k]`` (1 for an image)."""
    media_token_id = _check_media(
        len(conversation.media), media_frames, tokens_per_frame, media_token_id, tokenizer
    )
    frames = iter(media_frames)
    tokens: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    trained: list[bool] = [False] * len(tokens)
    for role, text in conversation.turns:
        if role == "human":
            ids = _human_ids(text, tokenizer, frames, tokens_per_frame, media_token_id)
            tokens += ids
            trained += [False] * len(ids)
        else:
            prefix = tokenizer.encode(ASSISTANT_PREFIX)
            answer = [*tokenizer.encode(text), tokenizer.eos_id]
            tokens += prefix + answer
            trained += [False] * len(prefix) + [True] * len(answer)
    tokens_L = np.asarray(tokens, dtype=np.int64)
    placeholders = sum(media_frames) * tokens_per_frame
    if int((tokens_L == media_token_id).sum()) != placeholders:
        raise ValueError(
            f"sample {conversation.id!r}: its text encodes to the media token id {media_token_id} "
            f"(the text spells the token the tokenizer reserves for it); choose another media_token_id"
        )
    trained_L = np.asarray(trained, dtype=bool)
    labels_L = np.full_like(tokens_L, IGNORE_INDEX)
    labels_L[:-1] = np.where(trained_L[1:], tokens_L[1:], IGNORE_INDEX)
    return tokens_L, labels_L


def prompt_ids(
    tokenizer: Tokenizer,
    question: str,
    *,
    media_frames: Sequence[int] = (),
    tokens_per_frame: int,
    media_token_id: int | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """The generation prompt: ``history`` (earlier ``(question, answer)`` pairs) and ``question``
    rendered by the chat template, ending with ``"ASSISTANT: "`` — exactly the ids a training sample
    of the same conversation has before its last answer. ``media_frames[k]``: the frame count of
    the k-th marker over the history and the question."""
    texts = [q for q, _ in history] + [question]
    media_token_id = _check_media(
        sum(len(media_markers(t)) for t in texts), media_frames, tokens_per_frame, media_token_id, tokenizer
    )
    frames = iter(media_frames)
    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for q, a in history:
        ids += _human_ids(q, tokenizer, frames, tokens_per_frame, media_token_id)
        ids += [*tokenizer.encode(ASSISTANT_PREFIX), *tokenizer.encode(a), tokenizer.eos_id]
    ids += _human_ids(question, tokenizer, frames, tokens_per_frame, media_token_id)
    return ids + tokenizer.encode(ASSISTANT_PREFIX)


def too_long_message(sample_id: str, length: int, seq_len: int, detail: str = "") -> str:
    """The error for a sample longer than a row; ``detail`` says where its tokens come from."""
    detail = f" ({detail})" if detail else ""
    return (
        f"sample {sample_id!r} is {length} tokens long{detail}, more than seq_len={seq_len}; a sample is "
        "never split across rows. Raise seq_len, or use fewer frames (num_frames, or max_frames with "
        "fps), or drop such samples with on_too_long='skip'"
    )


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit bin packing, in order: item ``i`` goes into the lowest-numbered row whose free
    space holds it, else into a new row. Returns each row's item indices (ascending). Rows are
    found through a max-tree over their free space: ``O(n log n)`` for ``n`` items."""
    n = len(lengths)
    leaves = 1
    while leaves < max(n, 1):
        leaves *= 2
    free = [-1] * (2 * leaves)  # node: the largest free space below it; -1 = no row opened there yet
    rows: list[list[int]] = []
    for i, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"item {i} has length {length}; each must be in [1, capacity={capacity}]")
        if free[1] >= length:
            node = 1
            while node < leaves:  # descend to the leftmost leaf with room
                node = 2 * node if free[2 * node] >= length else 2 * node + 1
        else:
            node = leaves + len(rows)
            rows.append([])
            free[node] = capacity
        rows[node - leaves].append(i)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack_row(samples: Sequence[dict[str, Any]], seq_len: int, pad_id: int) -> dict[str, Any]:
    """One row from samples that fit (see :func:`pack` for the fields); padded to ``seq_len``."""
    length = sum(len(s["tokens"]) for s in samples)
    if length > seq_len:
        raise ValueError(
            f"samples {[s['id'] for s in samples]} hold {length} tokens, more than seq_len={seq_len}"
        )
    pad = seq_len - length
    document_ids = [torch.full((len(s["tokens"]),), d, dtype=torch.int64) for d, s in enumerate(samples)]
    media = [s["media"] for s in samples if s.get("media") is not None]  # None: a text-only sample

    def cat(parts: list[torch.Tensor], fill: int) -> torch.Tensor:
        return torch.cat([*parts, torch.full((pad,), fill, dtype=torch.int64)])

    return {
        "tokens": cat([torch.as_tensor(s["tokens"]) for s in samples], pad_id),
        "labels": cat([torch.as_tensor(s["labels"]) for s in samples], IGNORE_INDEX),
        "positions": cat([torch.as_tensor(s["positions"]) for s in samples], 0),
        "document_ids": cat(document_ids, -1),
        "media": torch.cat(media) if media else torch.zeros(0, 3, 1, 1),
        "ids": [s["id"] for s in samples],
    }


def pack(samples: Sequence[dict[str, Any]], seq_len: int, pad_id: int) -> list[dict[str, Any]]:
    """Pack samples (``id``, ``tokens``, ``labels``, ``positions``, ``media``) into rows of ``seq_len``
    by :func:`first_fit` in the given order. Each row: ``tokens``, ``labels``, ``positions``,
    ``document_ids`` (``int64 [seq_len]``; padding: ``pad_id``, ``IGNORE_INDEX``, 0, -1),
    ``media`` (the samples' frames concatenated in row order, ``[N, 3, S, S]``) and ``ids``.
    A sample longer than ``seq_len`` is an error naming it."""
    lengths = []
    for s in samples:
        if len(s["tokens"]) > seq_len:
            frames = 0 if s.get("media") is None else len(s["media"])
            raise ValueError(too_long_message(s["id"], len(s["tokens"]), seq_len, f"{frames} media frames"))
        lengths.append(len(s["tokens"]))
    return [pack_row([samples[i] for i in row], seq_len, pad_id) for row in first_fit(lengths, seq_len)]


def collate_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Packed rows → a batch: ``tokens``, ``labels``, ``positions``, ``document_ids`` stacked to
    ``int64 [B, T]``; ``media`` concatenated in row order, ``float32 [N, 3, S, S]``; ``ids`` the
    sample ids per row (a list of lists)."""
    batch: dict[str, Any] = {
        k: torch.stack([r[k] for r in rows]) for k in ("tokens", "labels", "positions", "document_ids")
    }
    media = [r["media"] for r in rows if r["media"].shape[0] > 0]
    batch["media"] = torch.cat(media) if media else rows[0]["media"][:0]
    batch["ids"] = [r["ids"] for r in rows]
    return batch
