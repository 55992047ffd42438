"""Video needle-in-a-haystack (LongVILA's long-video retrieval check).

A haystack video (the user's, or a generated one) is sampled to ``max(frame_counts)`` frames and
encoded by the vision tower + projector once. For each total frame count F and depth d, F haystack
frames (uniform over the encoded ones) get a needle frame — an image of rendered text, e.g. a
number — inserted at index ``round(d * F)``; the model is asked the question with the answer
appended (teacher forcing) and scores an exact match when every answer token (and the end of the
answer) is its argmax prediction. Results: a depth x frames table as JSON and a heatmap PNG.

Encoding the haystack once and reusing the visual tokens across every (F, d) cell is what makes
long sweeps affordable; only the LLM runs per cell.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cupola.collections.vlm.models.vila import VILA
from cupola.toolkit.config import config_error
from cupola.toolkit.parallel.sequence.multimodal import media_share

__all__ = ["NIAHConfig", "render_needle", "run_niah", "save_results", "synthetic_haystack", "write_heatmap"]


@dataclass(kw_only=True, slots=True)
class NIAHConfig:
    frame_counts: list[int] = field(default_factory=lambda: [4, 8, 16])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needle: str = "42"  # the text drawn on the needle frame
    question: str = "What number is written in the video?"
    answer: str | None = None  # default: the needle text
    seed: int = 0

    def validate(self) -> None:
        if not self.frame_counts or any(not isinstance(f, int) or f < 1 for f in self.frame_counts):
            raise config_error(
                self, "frame_counts", self.frame_counts, "must be a non-empty list of integers >= 1"
            )
        if not self.depths or any(not 0.0 <= float(d) <= 1.0 for d in self.depths):
            raise config_error(self, "depths", self.depths, "must be a non-empty list of fractions in [0, 1]")
        if not self.needle.strip():
            raise config_error(self, "needle", self.needle, "must be non-empty text to draw")


def render_needle(text: str, size: int) -> np.ndarray:
    """A ``[size, size, 3]`` uint8 frame: black ``text`` as large as fits, on white (Pillow)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font_size = size
    while font_size > 4:
        font = ImageFont.load_default(size=font_size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= 0.9 * size and bottom - top <= 0.9 * size:
            break
        font_size = int(font_size * 0.85)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(
        ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, fill="black", font=font
    )
    return np.asarray(image, dtype=np.uint8)


def synthetic_haystack(num_frames: int, size: int, seed: int = 0) -> np.ndarray:
    """``[num_frames, size, size, 3]`` uint8 frames of slowly drifting colour blobs: a haystack that
    holds no text, for when no video is given."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    centres = rng.random((4, 2))
    velocity = (rng.random((4, 2)) - 0.5) * 0.05
    colours = rng.integers(40, 255, (4, 3))
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        c = (centres + t * velocity) % 1.0
        img = np.zeros((size, size, 3))
        for (cy, cx), colour in zip(c, colours):
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None] * colour
        frames[t] = np.clip(img + 20, 0, 255).astype(np.uint8)
    return frames


def _uniform(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)`` (segment centres)."""
    return [min(n_total - 1, int((i + 0.5) * n_total / n)) for i in range(n)]


@torch.no_grad()
def run_niah(
    model: VILA,
    tokenizer: Any,
    cfg: NIAHConfig,
    haystack_uint8: np.ndarray | None = None,
    *,
    progress: bool = True,
    sp: Any = None,
) -> dict[str, Any]:
    """Run the sweep (see the module docstring); returns ``{"cells": [...], "accuracy": ...}``.

    ``sp``: a :class:`~cupola.toolkit.parallel.sequence.SequenceParallel` (``model.llm`` set up with
    it by ``apply_sp``) to run sequence-parallel across its ranks: each rank encodes its share of the
    haystack once, every cell's visual tokens are routed to the ranks holding their positions, and
    each rank runs the LLM on its part of the sequence; every rank returns the same results.
    """
    from cupola.collections.vlm.data.conversations import prompt_ids
    from cupola.toolkit.data.video import to_pixels

    cfg.validate()
    vcfg, P = model.cfg.vision, model.cfg.tokens_per_frame
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    answer = cfg.answer if cfg.answer is not None else cfg.needle
    answer_ids = [*tokenizer.encode(answer), tokenizer.eos_id]
    question = f"<video>\n{cfg.question}"
    longest = max(cfg.frame_counts)
    text_len = len(
        prompt_ids(
            tokenizer, question, media_frames=[0], tokens_per_frame=P, media_token_id=model.cfg.media_token_id
        )
    )
    limit = model.cfg.llm.max_seq_len
    multiple = 1 if sp is None else sp.layout.multiple  # SP rows are padded to split evenly
    if -(-(text_len + (longest + 1) * P + len(answer_ids)) // multiple) * multiple > limit:
        fits = (limit - text_len - len(answer_ids)) // P - 1
        raise config_error(
            cfg,
            "frame_counts",
            cfg.frame_counts,
            f"{longest} frames (+ the needle) at {P} tokens each do not fit the model's max_seq_len={limit}; "
            f"use at most {max(fits, 0)} frames, or a context-extended model",
        )
    if haystack_uint8 is None:
        haystack_uint8 = synthetic_haystack(longest, vcfg.image_size, cfg.seed)
    picked = (
        haystack_uint8[_uniform(len(haystack_uint8), longest)]
        if len(haystack_uint8) >= longest
        else haystack_uint8
    )
    if len(picked) < longest:
        raise ValueError(f"the haystack has {len(haystack_uint8)} frames; the sweep needs {longest}")

    def encode(frames_uint8: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(frames_uint8), 16):  # bounded memory for long haystacks
            pixels = to_pixels(frames_uint8[i : i + 16], vcfg.image_size).to(device, dtype)
            out.append(model.encode_media(pixels))
        return torch.cat(out) if out else torch.zeros(0, P, model.cfg.llm.dim, device=device, dtype=dtype)

    # encoded once, reused by every cell (under SP: this rank's share of the haystack only)
    share = slice(0, longest) if sp is None else media_share(longest, sp.layout.size, sp.rank)
    hay_N_P_D = encode(picked[share])
    needle_1_P_D = encode(render_needle(cfg.needle, vcfg.image_size)[None])
    cells = []
    total = len(cfg.frame_counts) * len(cfg.depths)
    for F in cfg.frame_counts:
        base = hay_N_P_D[_uniform(longest, F)] if sp is None else None
        prompt = prompt_ids(
            tokenizer,
            question,
            media_frames=[F + 1],
            tokens_per_frame=P,
            media_token_id=model.cfg.media_token_id,
        )
        ids = prompt + answer_ids
        if sp is not None:  # pad the row to split evenly; causal attention keeps the padding out
            ids = ids + [tokenizer.eos_id] * (-len(ids) % multiple)
        tokens = torch.tensor([ids], device=device)
        for depth in cfg.depths:
            k = round(float(depth) * F)
            if sp is None:
                video = torch.cat([base[:k], needle_1_P_D, base[k:]])
                logits = model.llm.forward_embeddings(model.embed(tokens, media_embeds_N_P_D=video))
                # argmax over the tokenizer's ids only (the embedding table may be larger, e.g. padded)
                predicted_all = logits[0, :, : tokenizer.vocab_size].argmax(-1)
            else:
                frames = _uniform(longest, F)
                predicted_all = _sp_predictions(
                    model, tokens, hay_N_P_D, needle_1_P_D, frames, k, longest, sp, tokenizer.vocab_size
                )
            predicted = predicted_all[len(prompt) - 1 : len(prompt) - 1 + len(answer_ids)].tolist()
            hits = [p == a for p, a in zip(predicted, answer_ids)]
            cells.append(
                {
                    "frames": F,
                    "depth": float(depth),
                    "needle_index": k,
                    "correct": all(hits),
                    "token_accuracy": sum(hits) / len(hits),
                    "predicted": tokenizer.decode([t for t in predicted if t != tokenizer.eos_id]),
                }
            )
            if progress:
                print(
                    f"[niah] {len(cells)}/{total}  frames {F:>5}  depth {depth:.2f}  correct={all(hits)}",
                    flush=True,
                )
    accuracy = sum(c["correct"] for c in cells) / len(cells)
    return {
        "config": {**{f: getattr(cfg, f) for f in cfg.__slots__}, "answer": answer},
        "cells": cells,
        "accuracy": accuracy,
    }


def _sp_predictions(
    model: VILA,
    tokens_1_T: torch.Tensor,
    hay_mine_N_P_D: torch.Tensor,
    needle_1_P_D: torch.Tensor,
    frames: list[int],
    k: int,
    longest: int,
    sp: Any,
    vocab_size: int,
) -> torch.Tensor:
    """Greedy predictions for the whole row, computed sequence-parallel: the cell's video is
    ``frames`` of the haystack with the needle at ``k``; haystack frame ``h`` lives on rank
    ``h // per_rank`` (its share), the needle on every rank (after its haystack tokens)."""
    from cupola.toolkit.parallel.sequence.multimodal import media_share, route_embeddings

    P, D = model.cfg.tokens_per_frame, model.cfg.llm.dim
    slots = tokens_1_T == model.cfg.media_token_id
    T, size = tokens_1_T.shape[1], sp.layout.size
    per_rank = media_share(longest, size, 0).stop
    video = [*frames[:k], -1, *frames[k:]]  # -1: the needle
    frame_of = torch.tensor(video, device=slots.device).repeat_interleave(P)  # per visual token
    token_of = torch.arange(P, device=slots.device).repeat(len(video))
    holder = torch.empty(T, dtype=torch.long, device=slots.device)  # which rank holds each position
    for r in range(size):
        holder[sp.layout.indices(T, r).to(slots.device)] = r
    held = torch.tensor([len(range(*media_share(longest, size, r).indices(longest))) for r in range(size)])
    owner = torch.where(frame_of >= 0, frame_of // max(per_rank, 1), holder[slots[0]])
    index = torch.where(
        frame_of >= 0,
        (frame_of - owner * per_rank) * P + token_of,
        held.to(slots.device)[owner] * P + token_of,
    )
    owner_1_T = torch.zeros_like(tokens_1_T)
    index_1_T = torch.zeros_like(tokens_1_T)
    owner_1_T[slots], index_1_T[slots] = owner, index
    mine = torch.cat([hay_mine_N_P_D.reshape(-1, D), needle_1_P_D.reshape(-1, D)])
    h = model.llm.embed(sp.shard(tokens_1_T))
    h[sp.shard(slots)] = route_embeddings(mine, slots, owner_1_T, index_1_T, sp).to(h.dtype)
    logits = model.llm.forward_embeddings(h)
    return sp.gather(logits[..., :vocab_size].argmax(-1))[0]


def write_heatmap(results: dict[str, Any], path: str | Path) -> Path:
    """Depth (rows) x frame count (columns) heatmap of exact matches, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = sorted({c["frames"] for c in results["cells"]})
    depths = sorted({c["depth"] for c in results["cells"]})
    grid = np.full((len(depths), len(frames)), math.nan)
    for c in results["cells"]:
        grid[depths.index(c["depth"]), frames.index(c["frames"])] = float(c["correct"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(frames), 1.2 + 0.5 * len(depths)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(frames)), [str(f) for f in frames])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("frames in the haystack")
    ax.set_ylabel("needle depth")
    ax.set_title(f"video needle-in-a-haystack: {100 * results['accuracy']:.0f}% exact match")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``niah.json`` and ``niah_heatmap.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "niah.json").write_text(json.dumps(results, indent=2))
    return {"json": out / "niah.json", "heatmap": write_heatmap(results, out / "niah_heatmap.png")}
