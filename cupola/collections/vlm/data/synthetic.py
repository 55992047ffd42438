"""A small, real video-conversation dataset that a tiny VLM can learn: rendered mp4 clips of one
coloured shape moving across a plain background, and questions about it.

Each clip shows a square, circle or triangle in red, green, blue or yellow moving left, right, up
or down (every combination before any repeats, in a seeded order). The questions — "What colour is
the shape?", "What shape is it?", "Which way does it move?" — have one-word answers that need the
frames: colour and shape from any frame, direction only from their order. About a third of the
video samples have two turns; every other clip also gives an image sample (a PNG of its middle
frame) asking about colour or shape. Clips are split into train and val by clip, so no val frame
is seen in training.

Every file is a function of the arguments alone (numpy ``default_rng(seed)``; clips encoded as
MPEG-4 Part 2, whose encoder is bit-exact from run to run). The JSONL format is that of
:mod:`cupola.collections.vlm.data.conversations`.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cupola.toolkit.data.video import write_video

__all__ = ["COLOURS", "DIRECTIONS", "QUESTIONS", "SHAPES", "render_clip", "write_synthetic_video_dataset"]

COLOURS: dict[str, tuple[int, int, int]] = {
    # far apart in hue and luma, so they survive 4:2:0 chroma subsampling and a 32 px resize
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (48, 48, 48)
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "direction": "Which way does it move?",
}


def render_clip(
    shape: str, colour: str, direction: str, *, frames: int, size: int, offset: float = 0.5
) -> np.ndarray:
    """``uint8 [frames, size, size, 3]``: the shape (a quarter of the frame wide) crossing from one
    edge to the other in ``direction``; ``offset`` in [0, 1] places it along the other axis."""
    side = max(4, size // 4)
    margin = max(1, size // 16)
    travel = size - 2 * margin - side  # the top-left corner moves over [margin, margin + travel]
    across = margin + round(offset * travel)
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        progress = t / max(1, frames - 1)
        along = margin + round(progress * travel)
        x, y = {
            "right": (along, across),
            "left": (size - side - along, across),
            "down": (across, along),
            "up": (across, size - side - along),
        }[direction]
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        box = (x, y, x + side - 1, y + side - 1)
        fill = COLOURS[colour]
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)
        clip[t] = np.asarray(image)
    return clip


def _turns(marker: str, kinds: list[str], answers: dict[str, str]) -> list[dict[str, str]]:
    turns = []
    for k, kind in enumerate(kinds):
        question = f"{marker}\n{QUESTIONS[kind]}" if k == 0 else QUESTIONS[kind]
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answers[kind]}]
    return turns


def write_synthetic_video_dataset(
    out_dir: str | Path,
    *,
    num_videos: int = 32,
    frames: int = 16,
    size: int = 64,
    fps: float = 8,
    seed: int = 0,
    val_fraction: float = 0.25,
    corrupt: int = 0,
) -> dict[str, Any]:
    """Write the dataset into ``out_dir`` (files of the same names are overwritten) and return its
    paths: ``root``, ``train`` and ``val`` (the JSONL files) and ``corrupt`` (a list, see below).

    ``corrupt=k`` adds ``k`` training samples whose video is random bytes with an ``.mp4`` name, for
    bad-media tests; ``val_fraction`` of the clips (at least one when > 0) go to ``val.jsonl``.
    """
    if num_videos < 1 or frames < 1 or corrupt < 0:
        raise ValueError(
            f"num_videos={num_videos}, frames={frames}, corrupt={corrupt}: need >= 1, >= 1, >= 0"
        )
    if size < 16 or size % 2:
        raise ValueError(f"size={size}: frames must be an even number of pixels, at least 16")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not valid: must be in [0, 1)")
    root = Path(out_dir).expanduser().resolve()
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    combos = list(product(SHAPES, COLOURS, DIRECTIONS))
    order = rng.permutation(len(combos))
    n_val = 0 if val_fraction == 0 else min(num_videos - 1, max(1, round(num_videos * val_fraction)))
    val_clips = set(rng.choice(num_videos, size=n_val, replace=False).tolist()) if n_val else set()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for v in range(num_videos):
        shape, colour, direction = combos[order[v % len(combos)]]
        answers = {"colour": colour, "shape": shape, "direction": direction}
        clip = render_clip(shape, colour, direction, frames=frames, size=size, offset=float(rng.uniform()))
        name = f"vid{v:03d}"
        write_video(root / "videos" / f"{name}.mp4", clip, fps, codec="mpeg4")  # bit-exact reruns
        split = splits["val" if v in val_clips else "train"]
        kinds = [str(k) for k in rng.permutation(list(QUESTIONS))][: 2 if rng.uniform() < 1 / 3 else 1]
        split.append(
            {
                "id": name,
                "media": [{"type": "video", "path": f"videos/{name}.mp4"}],
                "conversations": _turns("<video>", kinds, answers),
            }
        )
        if v % 2 == 0:
            image_name = f"img{v:03d}"
            Image.fromarray(clip[frames // 2]).save(root / "images" / f"{image_name}.png")
            kind = str(rng.choice(["colour", "shape"]))
            split.append(
                {
                    "id": image_name,
                    "media": [{"type": "image", "path": f"images/{image_name}.png"}],
                    "conversations": _turns("<image>", [kind], answers),
                }
            )

    corrupt_paths = []
    for k in range(corrupt):
        name = f"corrupt{k:03d}"
        path = root / "videos" / f"{name}.mp4"
        path.write_bytes(rng.bytes(4096))
        corrupt_paths.append(path)
        record = {
            "id": name,
            "media": [{"type": "video", "path": f"videos/{name}.mp4"}],
            "conversations": _turns("<video>", ["colour"], {"colour": "red"}),
        }
        splits["train"].insert(int(rng.integers(len(splits["train"]) + 1)), record)

    paths: dict[str, Any] = {"root": root, "corrupt": corrupt_paths}
    for split, records in splits.items():
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


SYNTHETIC = "synthetic"  # train_file="synthetic" / val_file="synthetic:val": the generated dataset


def synthetic_dataset_file(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The JSONL file that ``spec`` names: ``"synthetic"`` (= ``"synthetic:train"``) or
    ``"synthetic:val"`` — the default generated dataset (32 clips of 16 frames, 64 px, seed 0), written
    once into ``$CUPOLA_CACHE/vlm_synthetic`` (or ``~/.cache/cupola/vlm_synthetic``) and reused.
    Processes racing to build it each write a private copy and the first rename wins."""
    import os
    import shutil
    import tempfile

    split = spec.split(":", 1)[1] if ":" in spec else "train"
    if spec.split(":", 1)[0] != SYNTHETIC or split not in ("train", "val"):
        raise ValueError(f"{spec!r}: the generated dataset is 'synthetic' (training) or 'synthetic:val'")
    if cache_dir is None:
        base = os.environ.get("CUPOLA_CACHE")
        cache_dir = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "cupola"
    root = Path(cache_dir).expanduser() / "vlm_synthetic" / "v1_n32_f16_s64_seed0"
    if not (root / "val.jsonl").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building_", dir=root.parent))
        write_synthetic_video_dataset(tmp)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return root / f"{split}.jsonl"
