"""Needle-in-a-haystack run sequence-parallel (each rank encodes its share of the haystack once,
visual tokens routed per cell, the LLM on each rank's part of the sequence) gives the one-process
sweep's predictions, on 2 (Ulysses, zigzag ring) and 4 (2x2 hybrid) gloo processes; float64."""

from __future__ import annotations

import torch

from cupola.collections.llm.models.gpt.parallelize import apply_sp
from cupola.collections.vlm.models import VILA, vila_config
from cupola.collections.vlm.niah import NIAHConfig, run_niah, synthetic_haystack
from cupola.toolkit.data.tokenizer import load_tokenizer
from cupola.toolkit.parallel.dims import ParallelDims
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
