"""LongLoRA context extension of the VLM's LLM under FSDP2: two gloo processes (with and without
activation checkpointing) give the single-process model's loss, adapter/embedding/norm gradients and
AdamW step; frozen weights get no gradient and do not move."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from cupola.collections.vlm.models import VILA, vila_config
from cupola.collections.vlm.parallelize import parallelize_vila
from cupola.toolkit.modules.lora import LoRAConfig, LoRALinear, apply_lora, init_lora, set_lora_trainable
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.testing import spawn

ROWS_PER_RANK, SEQ = 2, 32
LORA = LoRAConfig(rank=4, alpha=8.0)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _lora_vila(cfg) -> VILA:
    model = VILA(cfg)
    apply_lora(model.llm, LORA)
    return model


def _train_only_lora(model: VILA) -> None:
    model.requires_grad_(False)  # the context-extension stage trains the LLM only
    set_lora_trainable(model.llm, LORA)


def _compare(ac: bool) -> None:
    cfg = vila_config("tiny")
    torch.manual_seed(0)
    reference = _lora_vila(cfg)
    with torch.no_grad():  # adapters as if trained, so A gets gradients too
        for m in reference.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.02)
    _train_only_lora(reference)

    dims = ParallelDims(dp_shard=2)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = _lora_vila(cfg)
    parallelize_vila(model, dims, activation_checkpointing=ac)
    model.to_empty(device="cpu")
    model.init_weights()
    init_lora(model)
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    _train_only_lora(model)

    rank = dims.submesh("dp").get_local_rank()
    tokens = torch.randint(0, 256, (2 * ROWS_PER_RANK, SEQ + 1), generator=torch.Generator().manual_seed(1))
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)

    def loss(m: VILA, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())

    loss(reference, tokens).backward()
    loss(model, tokens[rows]).backward()
    ref = dict(reference.named_parameters())
    adam = {"lr": 1e-3, "eps": 1e-4}
    ref_opt = torch.optim.AdamW([p for p in ref.values() if p.requires_grad], **adam)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adam)
    trained = 0
    for name, p in model.named_parameters():
        name = _clean(name)
        assert p.requires_grad == ref[name].requires_grad, name
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        trained += 1
        torch.testing.assert_close(_full(p.grad), ref[name].grad, rtol=1e-4, atol=2e-6, msg=name)
    assert trained == 2 * 4 * cfg.llm.n_layers + 1 + 2 * cfg.llm.n_layers + 1  # adapters, embedding, norms
    before = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    ref_opt.step()
    opt.step()
    for name, p in model.named_parameters():
        after = _full(p.detach())
        torch.testing.assert_close(after, ref[_clean(name)].detach(), rtol=1e-4, atol=2e-6, msg=name)
        if not p.requires_grad:
            assert torch.equal(after, before[name]), name


def _two_processes(rank: int, world_size: int) -> None:
    _compare(ac=False)
    _compare(ac=True)


def test_lora_under_fsdp2_on_2_processes_matches_single_process():
    spawn(_two_processes, 2)
