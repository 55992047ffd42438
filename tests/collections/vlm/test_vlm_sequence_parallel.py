"""MM-SP: the VLM with two-stage sharding (each rank encodes its share of the frames, visual tokens
routed to the ranks holding their placeholders) and sequence-parallel attention gives the
single-process loss and gradients — Ulysses and zigzag ring on 2 processes, the 2x2 hybrid on 4
(where one rank has no frame at all), with packed rows; float64."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from cupola.collections.llm.lightning import next_token_loss
from cupola.collections.vlm.models import VILA, vila_config
from cupola.collections.vlm.parallelize import parallelize_vila
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence.multimodal import media_share
from cupola.toolkit.testing import spawn

TOL = {"rtol": 1e-6, "atol": 2e-8}  # norms and RoPE round through fp32 by design
FRAMES = 5


def _batch(cfg) -> dict[str, torch.Tensor]:
    """Two packed rows of 64 tokens: row 0 holds a 3-frame video sample then a text sample, row 1
    a 2-frame video sample; labels only on some text."""
    g = torch.Generator().manual_seed(2)
    T, per = 64, cfg.tokens_per_frame
    tokens = torch.randint(0, 256, (2, T), generator=g)
    tokens[0, 2 : 2 + 3 * per] = cfg.media_token_id
    tokens[1, 5 : 5 + 2 * per] = cfg.media_token_id
    docs = torch.zeros(2, T, dtype=torch.long)
    docs[0, 40:] = 1
    positions = torch.arange(T).repeat(2, 1)
    positions[0, 40:] -= 40
    labels = torch.randint(0, 256, (2, T), generator=g)
    labels[tokens == cfg.media_token_id] = -100
    labels[:, :2] = -100
    media = torch.randn(
        FRAMES, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g, dtype=torch.float64
    )
    return {"tokens": tokens, "labels": labels, "document_ids": docs, "positions": positions, "media": media}


def _compare(sp: int, ulysses: int) -> None:
    cfg = vila_config("tiny")
    torch.manual_seed(0)
    reference = VILA(cfg).double()
    b = _batch(cfg)
    loss = next_token_loss(reference(b["tokens"], b["media"], b["positions"], b["document_ids"]), b["labels"])
    loss.backward()

    dims = ParallelDims(sp=sp, sp_ulysses=ulysses)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = VILA(cfg)
    parallelize_vila(model, dims, param_dtype=torch.float64, reduce_dtype=torch.float64)
    model.to_empty(device="cpu")
    model.double()
    model.init_weights()
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    ctx = dims.sequence_parallel()
    mine = b["media"][media_share(FRAMES, sp, ctx.rank)]
    logits = model(b["tokens"], mine, b["positions"], b["document_ids"])
    sp_loss = next_token_loss(logits, ctx.shard(b["labels"]), ctx)
    sp_loss.backward()

    what = f"sp={sp} ulysses={ulysses}"
    mean = sp_loss.detach().clone()
    torch.distributed.all_reduce(mean)
    torch.testing.assert_close(mean / sp, loss.detach(), **TOL, msg=lambda m: f"{what} loss: {m}")
    ref = dict(reference.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        name = name.replace("_orig_mod.", "")
        if ref[name].grad is None:  # vision layers past select_layer
            assert p.grad is None or not _full(p.grad).any(), name
            continue
        torch.testing.assert_close(
            _full(p.grad), ref[name].grad, **TOL, msg=lambda m, n=name: f"{what} {n}: {m}"
        )
        checked += name.startswith("vision.")
    assert checked > 0  # the tower's gradients came back through the all-to-all


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _two(rank: int, world: int) -> None:
    _compare(2, 2)
    _compare(2, 1)


def _four(rank: int, world: int) -> None:
    _compare(4, 2)


def test_mm_sp_on_2_processes_matches_one():
    spawn(_two, 2)


def test_mm_sp_2x2_hybrid_with_a_frameless_rank_matches_one():
    assert media_share(FRAMES, 4, 3) == slice(5, 5)
    spawn(_four, 4)
