"""MoE training-step throughput: cupola's MoE GPT vs Hugging Face ``MixtralForCausalLM`` vs cupola dense.

Config (the upcycling issue's): hidden 2048, FFN 5632, 12 layers, 16 heads, 8 KV heads, vocab 32000,
sequence 4096, batch 2, bf16, 8 experts top-2, dropless. One GPU, one process, forward + backward
(gradients of every parameter), timed after warm-up with CUDA events; the same step with the
optimizer step is timed too and reported beside it (MFU counts forward + backward only).

- cupola MoE / dense: the production path on one process — ``parallelize_gpt`` (bf16 compute on
  fp32 master weights through ``apply_mixed_precision``; FSDP2 takes over from two ranks), per-block
  ``torch.compile``, experts on ``torch._grouped_mm``, and ``build_optimizer``'s optimizer:
  ``MixedPrecisionAdamW`` with bf16 working copies (a fourth row: fresh casts each step and torch's
  fused AdamW on fp32 gradients, the path taken with gradient accumulation).
- transformers: ``MixtralForCausalLM`` in bf16 (bf16 parameters, no master weights), SDPA attention,
  its default experts path; torch's fused AdamW on those bf16 parameters.

MFU = model FLOPs / 989.4 TFLOP/s (dense bf16 peak of H100/H200 SXM), model FLOPs per token =
6 · active matmul parameters (router + top-2 experts, embeddings excluded, output head included)
+ 6 · layers · heads · head_dim · seq (causal attention: half of the full 12·L·H·d·s).
Prints a table; writes ``benchmarks/results/moe_train_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cupola.collections.llm.models.gpt import GPT, GPTConfig, num_matmul_params, parallelize_gpt
from cupola.toolkit.modules.moe import MoEConfig
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.training.configs import OptimConfig
from cupola.toolkit.training.optim import build_optimizer

PEAK = 989.4e12
RESULTS = Path(__file__).parent / "results"


def configs(seq: int) -> tuple[GPTConfig, GPTConfig]:
    dense = GPTConfig(
        vocab_size=32000,
        dim=2048,
        n_layers=12,
        n_heads=16,
        n_kv_heads=8,
        ffn_hidden_size=5632,
        max_seq_len=seq,
    )
    moe = dataclasses.replace(
        dense, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_size=5632, aux_loss_coeff=1e-2)
    )
    return dense, moe


def flops_per_token(cfg: GPTConfig, seq: int) -> float:
    return 6.0 * num_matmul_params(cfg) + 6.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq


def time_steps(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def profile_step(step, name: str, out_dir: Path, rows: int = 25) -> None:
    """Profile two steps: print the kernels that take most GPU time, write a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    prof.export_chrome_trace(str(out_dir / f"{slug}.json"))
    print(f"\n== profile: {name} (2 steps) ==")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90))


def cupola_step(cfg: GPTConfig, tokens: torch.Tensor, compile: bool, working_copies: bool = True):
    """(forward + backward, forward + backward + optimizer step) closures for cupola's training path."""
    dims = ParallelDims(world_size=1)
    dims.build_mesh("cuda")
    with torch.device("meta"):
        model = GPT(cfg)
    parallelize_gpt(model, dims, param_dtype=torch.bfloat16, compile=compile)
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.init_weights()
    # one process: MixedPrecisionAdamW on bf16 working copies, or AdamW on fp32 gradients
    opt = build_optimizer(model, OptimConfig(lr=1e-5), working_copies=working_copies)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()

    def full_step() -> None:
        step()
        opt.step()

    return step, full_step


def mixtral_step(cfg: GPTConfig, tokens: torch.Tensor):
    from transformers import MixtralConfig, MixtralForCausalLM

    hf = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.moe.expert_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        max_position_embeddings=cfg.max_seq_len,
        attn_implementation="sdpa",
        output_router_logits=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(hf).to(device="cuda", dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # on its bf16 parameters

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()

    def full_step() -> None:
        step()
        opt.step()

    return step, full_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--profile-dir", type=Path, default=None, help="also profile each model; traces go here"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)

    dense, moe = configs(args.seq)
    tokens = torch.randint(0, dense.vocab_size, (args.batch, args.seq), device="cuda")
    rows = []
    compiled = ", compile" if args.compile else ""
    for name, cfg, make in (
        (f"cupola MoE E8T2 (grouped GEMM{compiled})", moe, lambda: cupola_step(moe, tokens, args.compile)),
        ("transformers MixtralForCausalLM (SDPA)", moe, lambda: mixtral_step(moe, tokens)),
        ("cupola dense", dense, lambda: cupola_step(dense, tokens, args.compile)),
        (
            "cupola MoE, casts + AdamW on fp32 grads",
            moe,
            lambda: cupola_step(moe, tokens, args.compile, working_copies=False),
        ),
    ):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step, full_step = make()
        seconds = time_steps(step, args.warmup, args.iters)
        full_seconds = time_steps(full_step, 2, args.iters)
        if args.profile_dir is not None:
            profile_step(full_step, name, args.profile_dir)
        del step, full_step
        tps = args.batch * args.seq / seconds
        rows.append(
            {
                "name": name,
                "step_ms": 1000 * seconds,
                "tokens_per_sec": tps,
                "mfu": flops_per_token(cfg, args.seq) * tps / PEAK,
                "step_with_optimizer_ms": 1000 * full_seconds,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
        print(f"{name}: {tps:,.0f} tokens/s", flush=True)

    device = torch.cuda.get_device_name(0)
    print(f"\nseq {args.seq} x batch {args.batch}, bf16, on {device}, torch {torch.__version__}")
    print("fwd+bwd: the compared step; +AdamW: the same with the optimizer step (not part of MFU)")
    print(
        f"{'implementation':<44} {'fwd+bwd ms':>10} {'tokens/s':>10} {'MFU':>7} {'+AdamW ms':>10} {'peak GiB':>9}"
    )
    for r in rows:
        print(
            f"{r['name']:<44} {r['step_ms']:>10.1f} {r['tokens_per_sec']:>10,.0f} {100 * r['mfu']:>6.1f}% "
            f"{r['step_with_optimizer_ms']:>10.1f} {r['peak_memory_gib']:>9.1f}"
        )
    ratio = rows[0]["tokens_per_sec"] / rows[1]["tokens_per_sec"]
    print(f"cupola MoE / transformers Mixtral: {ratio:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    import transformers

    out = RESULTS / f"moe_train_step_{tag}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "moe_train_step",
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "device": device,
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                "rows": rows,
                "ratio_cupola_moe_to_hf_mixtral": ratio,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
