"""Single-process mixed precision: same numerics as FSDP2's policy, fp32 master weights, bf16 working
copies updated by MixedPrecisionAdamW exactly as torch's AdamW would."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cupola.collections.llm.models.gpt import GPT, GPTConfig, parallelize_gpt
from cupola.collections.llm.models.gpt.parallelize import apply_fsdp
from cupola.toolkit.modules.moe import GroupedLinear, MoEConfig
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.mixed_precision import apply_mixed_precision
from cupola.toolkit.testing import spawn
from cupola.toolkit.training.configs import OptimConfig
from cupola.toolkit.training.module import clip_grad_norm_
from cupola.toolkit.training.optim import MixedPrecisionAdamW, build_optimizer

BF16 = torch.bfloat16
DENSE = GPTConfig(
    vocab_size=128,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden_size=64,
    max_seq_len=16,
    tie_embeddings=True,
)
MOE = dataclasses.replace(
    DENSE, tie_embeddings=False, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=32)
)


def _model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    return model


def _loss(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())


def _grads(model: GPT) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g
    return out


def _fsdp_vs_single_process(rank: int, world_size: int) -> None:
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for cfg in (DENSE, MOE):
        dims = ParallelDims(world_size=1)
        dims.build_mesh("cpu")
        reference = _model(cfg)
        apply_fsdp(reference, dims.submesh("dp_shard_sp"), param_dtype=BF16)
        ours = parallelize_gpt(_model(cfg), dims, param_dtype=BF16)
        assert hasattr(ours, "_cupola_mp"), "one process without AC must skip FSDP"
        loss_ref, loss = _loss(reference, tokens), _loss(ours, tokens)
        loss_ref.backward()
        loss.backward()
        assert torch.equal(loss, loss_ref)
        ref_grads, grads = _grads(reference), _grads(ours)
        assert ref_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert g.dtype == torch.float32, name
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=0, msg=name)


def test_single_process_mixed_precision_equals_fsdp_policy():
    """bf16 compute on fp32 weights without FSDP2 gives FSDP2's loss and fp32 gradients, bit for bit."""
    spawn(_fsdp_vs_single_process, 1)


def test_parameters_stay_fp32_parameters_with_unchanged_names():
    model = _model(DENSE)
    names = [n for n, _ in model.named_parameters()]
    apply_mixed_precision(model, BF16)
    logits = model(torch.randint(0, 128, (1, 8)))
    assert logits.dtype == BF16
    assert [n for n, _ in model.named_parameters()] == names
    assert all(isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 for p in model.parameters())
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    logits.float().sum().backward()
    assert model.tok_embeddings.weight.grad.dtype == torch.float32  # both uses of the tied weight


def test_no_grad_casts_are_cached_until_a_parameter_changes():
    model = apply_mixed_precision(_model(DENSE), BF16)
    tokens = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        first = model(tokens)
        cast = dict(model._cupola_mp._cache)
        again = model(tokens)
        assert all(model._cupola_mp._cache[k][1] is v[1] for k, v in cast.items())  # reused, not re-cast
        assert torch.equal(first, again)
        model.norm.weight.mul_(2.0)  # an in-place change moves the version counter
        changed = model(tokens)
    assert not torch.equal(first, changed)


def test_grouped_linear_fp32_weights_give_fp32_gradients_of_the_bf16_gemm():
    """Experts keep fp32 master weights and cast inside their GEMMs: the weight gradient is the
    bf16 GEMM's, delivered in fp32."""
    torch.manual_seed(0)
    x = torch.randn(12, 16, dtype=BF16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    offsets = torch.tensor([5, 5, 12], dtype=torch.int32)  # expert 1 gets no tokens
    dy = torch.randn(12, 8, dtype=BF16)
    GroupedLinear.apply(x, w, offsets).backward(dy)
    wb = w.detach().to(BF16).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = torch.cat([xr[0:5] @ wb[0].T, xr[5:5] @ wb[1].T, xr[5:12] @ wb[2].T])
    ref.backward(dy)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, wb.grad.float(), rtol=1.6e-2, atol=1e-2)
    assert torch.count_nonzero(w.grad[1]) == 0
    torch.testing.assert_close(x.grad, xr.grad, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_mixed_precision_adamw_steps_like_adamw_on_fp32_gradients(cfg):
    """Working copies + MixedPrecisionAdamW follow plain AdamW on cast-back fp32 gradients; its state
    is AdamW's, and the working copies hold the updated weights in bf16."""
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0)
    ours = apply_mixed_precision(_model(cfg), BF16)
    reference = apply_mixed_precision(_model(cfg), BF16)
    opt = build_optimizer(ours, optim)
    opt_ref = build_optimizer(reference, optim, working_copies=False)
    assert isinstance(opt, MixedPrecisionAdamW) and type(opt_ref) is torch.optim.AdamW
    gen = torch.Generator().manual_seed(3)
    mp = ours._cupola_mp
    for step in range(3):
        tokens = torch.randint(0, 128, (2, 16), generator=gen)
        for model, o in ((ours, opt), (reference, opt_ref)):
            o.zero_grad()
            _loss(model, tokens).backward()
        assert all(p.grad is None for p in ours.parameters())  # gradients sit on the bf16 copies
        for p, p_ref in zip(ours.parameters(), reference.parameters()):
            assert mp.grad(p).dtype == BF16
            if step == 0:  # same weights: the bf16 gradient is exactly the one cast back to fp32
                torch.testing.assert_close(mp.grad(p).float(), p_ref.grad, rtol=0, atol=0)
            p_ref.grad = mp.grad(
                p
            ).float()  # later weights differ by AdamW's rounding: compare the steps alone
        opt.step()
        opt_ref.step()
        for (name, p), p_ref in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7, msg=name)
            assert torch.equal(mp.working_copy(p), p.detach().to(BF16)), name
    state, state_ref = opt.state_dict(), opt_ref.state_dict()
    impl = ("foreach", "fused")  # how torch's AdamW runs, not what it computes
    assert [{k: v for k, v in g.items() if k not in impl} for g in state["param_groups"]] == [
        {k: v for k, v in g.items() if k not in impl} for g in state_ref["param_groups"]
    ]
    assert state["state"].keys() == state_ref["state"].keys()
    for k, s in state["state"].items():
        assert s.keys() == state_ref["state"][k].keys()
        torch.testing.assert_close(
            s["exp_avg_sq"], state_ref["state"][k]["exp_avg_sq"], rtol=1e-6, atol=1e-12
        )
    opt.load_state_dict(state_ref)  # a checkpoint written with torch's AdamW resumes here
    torch.testing.assert_close(opt.state_dict()["state"][0]["exp_avg"], state_ref["state"][0]["exp_avg"])


def test_working_copies_follow_parameters_changed_behind_the_optimizer():
    model = apply_mixed_precision(_model(DENSE), BF16)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    tokens = torch.randint(0, 128, (1, 8))
    _loss(model, tokens).backward()
    opt.step()
    opt.zero_grad()
    fresh = _model(DENSE, seed=5)
    model.load_state_dict(fresh.state_dict())  # e.g. loading a checkpoint
    with torch.no_grad():
        expected = apply_mixed_precision(fresh, BF16)(tokens)
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)


def test_clipping_reads_and_scales_working_copy_gradients():
    model = apply_mixed_precision(_model(DENSE), BF16)
    build_optimizer(model, OptimConfig(lr=1e-3))
    _loss(model, torch.randint(0, 128, (2, 16))).backward()
    grads = [model._cupola_mp.grad(p) for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    norm = clip_grad_norm_(grads, max_norm=1e-3)
    assert norm == pytest.approx(float(expected), rel=1e-3)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    assert float(after) == pytest.approx(1e-3, rel=2e-2)
