"""Sequence-parallel inference gives one process's results, on 2 (Ulysses, zigzag ring) and 4 (2x2
hybrid) gloo processes, float64:

- needle-in-a-haystack (each rank encodes its share of the haystack once, visual tokens routed per
  cell, the LLM on each rank's part of the sequence): the same predictions;
- chat (each rank decodes and encodes only its share of the video's frames, the prompt prefilled
  across the ranks, the KV cache left sharded): the same answer, greedy and sampled.
"""

from __future__ import annotations

import torch

from cupola.collections.llm.models.gpt.parallelize import apply_sp
from cupola.collections.vlm.generate import chat, media_frames, media_pixels
from cupola.collections.vlm.models import VILA, vila_config
from cupola.collections.vlm.niah import NIAHConfig, run_niah, synthetic_haystack
from cupola.toolkit.data.tokenizer import load_tokenizer
from cupola.toolkit.data.video import write_video
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence.multimodal import media_share
from cupola.toolkit.testing import spawn

CFG = NIAHConfig(frame_counts=[3, 6], depths=[0.0, 0.5, 1.0], needle="7", seed=1)


def _model() -> VILA:
    torch.manual_seed(0)
    return VILA(vila_config("tiny")).double().eval()


def _sweep(sp=None) -> list[dict]:
    model = _model()
    if sp is not None:
        apply_sp(model.llm, sp)
    haystack = synthetic_haystack(6, model.cfg.vision.image_size, seed=3)
    with torch.no_grad():
        return run_niah(model, load_tokenizer("byte"), CFG, haystack, progress=False, sp=sp)["cells"]


def _check(rank: int, world: int, ulysses_list: tuple[int, ...]) -> None:
    expected = _sweep()
    assert len(expected) == 6  # 2 frame counts x 3 depths
    for ulysses in ulysses_list:
        dims = ParallelDims(sp=world, sp_ulysses=ulysses)
        dims.build_mesh("cpu")
        got = _sweep(dims.sequence_parallel())
        assert got == expected, (ulysses, got, expected)


def test_niah_sequence_parallel_on_2_processes_matches_one():
    spawn(_check, 2, (2, 1))


def test_niah_sequence_parallel_2x2_hybrid_matches_one():
    spawn(_check, 4, (2,))


QUESTION = "What colour is the shape?"


def _answers(video: str, sp=None) -> list[str]:
    model = _model()
    frames = media_frames(video=video, num_frames=5)
    part = None if sp is None else media_share(frames, sp.layout.size, sp.rank)
    pixels, marker = media_pixels(model.cfg, video=video, num_frames=5, part=part)
    if sp is not None:
        apply_sp(model.llm, sp)
        assert pixels.shape[0] == part.stop - part.start < frames  # only this rank's frames decoded
    tok = load_tokenizer("byte")
    kw = {"max_new_tokens": 12, "sp": sp, "frames": frames}
    with torch.no_grad():
        return [
            chat(model.double(), tok, QUESTION, pixels.double(), marker, **kw),
            chat(model.double(), tok, QUESTION, pixels.double(), marker, temperature=1.0, seed=3, **kw),
        ]


def _check_chat(rank: int, world: int, video: str, ulysses_list: tuple[int, ...]) -> None:
    expected = _answers(video)
    assert expected[0] != expected[1]  # the sampled answer is a real draw, not the greedy one
    for ulysses in ulysses_list:
        dims = ParallelDims(sp=world, sp_ulysses=ulysses)
        dims.build_mesh("cpu")
        assert _answers(video, dims.sequence_parallel()) == expected, ulysses


def _video(tmp_path) -> str:
    frames = synthetic_haystack(9, 32, seed=4)
    return str(write_video(tmp_path / "clip.mp4", frames, fps=4))


def test_media_pixels_decodes_a_share_equal_to_the_whole_decode_sliced(tmp_path):
    cfg = vila_config("tiny")
    video = _video(tmp_path)
    whole, _ = media_pixels(cfg, video=video, num_frames=5)
    assert media_frames(video=video, num_frames=5) == whole.shape[0] == 5
    for rank in range(3):
        share = media_share(5, 3, rank)
        part, _ = media_pixels(cfg, video=video, num_frames=5, part=share)
        assert torch.equal(part, whole[share])


def test_chat_sequence_parallel_on_2_processes_matches_one(tmp_path):
    spawn(_check_chat, 2, _video(tmp_path), (2, 1))


def test_chat_sequence_parallel_2x2_hybrid_matches_one(tmp_path):
    spawn(_check_chat, 4, _video(tmp_path), (2,))
