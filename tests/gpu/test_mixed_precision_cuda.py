"""On CUDA: MixedPrecisionAdamW's compiled update and the MoE experts' grouped GEMMs on fp32 master
weights agree with torch's AdamW and with casting in autograd. Skipped without a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cupola.collections.llm.models.gpt import GPT, GPTConfig, parallelize_gpt
from cupola.toolkit.modules.moe import MoEConfig
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.training.configs import OptimConfig
from cupola.toolkit.training.optim import MixedPrecisionAdamW, build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CFG = GPTConfig(
    vocab_size=256,
    dim=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden_size=256,
    max_seq_len=64,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=128),
)


def _model(compile: bool) -> GPT:
    torch.manual_seed(0)
    dims = ParallelDims(world_size=1)
    with torch.device("meta"):
        model = GPT(dataclasses.replace(CFG))
    parallelize_gpt(model, dims, param_dtype=torch.bfloat16, compile=compile)
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_working_copies_and_compiled_adamw_follow_torch_adamw(compile):
    ours, reference = _model(compile), _model(compile)
    optim = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=0)
    opt = build_optimizer(ours, optim)
    opt_ref = build_optimizer(reference, optim, working_copies=False)  # fused torch AdamW, fp32 grads
    assert isinstance(opt, MixedPrecisionAdamW) and type(opt_ref) is torch.optim.AdamW
    mp = ours._cupola_mp
    gen = torch.Generator(device="cuda").manual_seed(1)
    for step in range(3):
        tokens = torch.randint(0, 256, (2, 64), device="cuda", generator=gen)
        for model, o in ((ours, opt), (reference, opt_ref)):
            o.zero_grad()
            F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten()).backward()
        for (name, p), p_ref in zip(ours.named_parameters(), reference.parameters()):
            g = mp.grad(p)
            assert g is not None and g.dtype == torch.bfloat16, name
            if step == 0:  # same weights: same bf16 gradients (experts' GEMMs included)
                torch.testing.assert_close(g.float(), p_ref.grad, rtol=0, atol=0, msg=name)
            p_ref.grad = g.float()
        opt.step()
        opt_ref.step()
        for (name, p), p_ref in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-7, msg=name)
            assert torch.equal(mp.working_copy(p), p.detach().to(torch.bfloat16)), name
