"""The GPT trained with sequence parallelism (Ulysses, zigzag ring, 2x2 hybrid; plain and packed rows)
on gloo gives the single-process model's loss and gradients, in float64. (The attention itself is
checked to 1e-12 in tests/toolkit/test_sequence_parallel.py; here norms and RoPE round through fp32
by design, so agreement is to ~1e-9.)"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from cupola.collections.llm.lightning import next_token_loss
from cupola.collections.llm.models.gpt import GPT, gpt_config, parallelize_gpt
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.testing import spawn

B, T = 2, 32
TOL = {"rtol": 1e-6, "atol": 2e-8}


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _batch(cfg, packed: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:].clone()}
    batch["labels"][:, :3] = -100  # some ignored labels: the mean is over the whole rows' real ones
    if packed:
        starts = torch.zeros(B, T, dtype=torch.bool)
        starts[0, [0, 5, 19]] = starts[1, [0, 11]] = True
        docs = starts.cumsum(1)
        first = torch.zeros_like(docs)
        for b in range(B):
            for d in docs[b].unique():
                where = (docs[b] == d).nonzero().flatten()
                first[b, where] = where[0]
        batch |= {"document_ids": docs, "positions": torch.arange(T)[None] - first}
    return batch


def _compare(sp: int, ulysses: int, packed: bool, ac: bool) -> None:
    cfg = gpt_config("tiny", n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    reference = GPT(cfg).double()
    batch = _batch(cfg, packed)
    loss = next_token_loss(
        reference(batch["tokens"], batch.get("positions"), batch.get("document_ids")), batch["labels"]
    )
    loss.backward()

    dims = ParallelDims(sp=sp, sp_ulysses=ulysses)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = GPT(cfg)
    parallelize_gpt(
        model, dims, param_dtype=torch.float64, reduce_dtype=torch.float64, activation_checkpointing=ac
    )
    model.to_empty(device="cpu")
    model.double()
    model.init_weights()
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    sp_ctx = dims.sequence_parallel()
    local = {k: sp_ctx.shard(v) for k, v in batch.items()}
    sp_loss = next_token_loss(
        model(local["tokens"], local.get("positions"), local.get("document_ids")), local["labels"], sp_ctx
    )
    sp_loss.backward()
    what = f"sp={sp} ulysses={ulysses} packed={packed} ac={ac}"
    # the mean of the ranks' losses is the whole-sequence loss (what the logs report)
    mean = sp_loss.detach().clone()
    torch.distributed.all_reduce(mean)
    torch.testing.assert_close(mean / sp, loss.detach(), **TOL, msg=lambda m: f"{what} loss: {m}")
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(
            grad, ref[_clean(name)].grad, **TOL, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def _two(rank: int, world: int) -> None:
    for ulysses in (2, 1):  # Ulysses, zigzag ring
        for packed in (False, True):
            _compare(2, ulysses, packed, ac=ulysses == 1)


def _four(rank: int, world: int) -> None:
    for packed in (False, True):
        _compare(4, 2, packed, ac=False)  # 2 x 2 hybrid


def test_gpt_with_sequence_parallel_on_2_processes_matches_one():
    spawn(_two, 2)


def test_gpt_with_2x2_hybrid_sequence_parallel_on_4_processes_matches_one():
    spawn(_four, 4)
