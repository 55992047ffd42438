"""Long-prompt inference sequence-parallel: prefill + KV-cached decoding on 2 (or 4) GPUs over NCCL,
against one GPU holding the whole prompt and cache, in the same run.

    torchrun --nproc-per-node 2 benchmarks/sequence_parallel_decode.py [--lengths 32768 131072 262144]

Model: the GPT with Llama-3-8B's shapes (LongVILA-8B's LLM: dim 4096, 32 heads, 8 KV heads, head
dim 128, SwiGLU 14336, vocab 128256) cut to ``--layers`` layers, bf16, random weights; batch 1.
For each prompt length T (random token ids), greedy ``decode``:

- ``single``: rank 0 alone, the plain KV cache (SDPA);
- ``ulysses``, ``zigzag_ring`` (and ``hybrid_2x2`` on 4 GPUs): cupola's sequence-parallel prefill with
  the cache left sharded (:class:`~cupola.toolkit.parallel.sequence.decode.SequenceParallelKVCache`).

Timed with CUDA events (median of ``--iters``): the prefill (``decode`` of 1 token) and the per-token
decode latency (``(decode of 1 + N tokens - prefill) / N``); peak memory per GPU. Checked: the
greedy tokens against the single GPU's (bf16: a near-tied argmax may flip and the rest follows).
Prints a table; writes ``benchmarks/results/sequence_parallel_decode_<device>_<n>gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from _results import cuda_median_seconds, gpu_meta, results_path

from cupola.collections.llm.generate import decode
from cupola.collections.llm.models.gpt import GPT, gpt_config
from cupola.collections.llm.models.gpt.parallelize import apply_sp
from cupola.toolkit.parallel.dims import ParallelDims


def _median_seconds(fn, iters: int, sync: bool) -> float:
    return cuda_median_seconds(fn, iters, dist.barrier if sync else None)


def _model(args, max_len: int) -> GPT:
    cfg = gpt_config("llama3_8b", n_layers=args.layers, max_seq_len=max_len)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    model.init_weights()
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def measure(model: GPT, ids: torch.Tensor, args, sp=None) -> dict:
    T = ids.shape[1]
    if sp is None:
        prompt = model.embed(ids)
        run = lambda n: decode(model, prompt, n)  # noqa: E731
    else:
        padded = torch.cat([ids, ids.new_zeros(1, -T % sp.layout.multiple)], 1)
        prompt = sp.shard(model.embed(padded))
        run = lambda n: decode(model, prompt, n, sp=sp, prompt_len=T)  # noqa: E731
    sync = sp is not None
    tokens = run(args.new + 1)  # warm-up, and the greedy answer
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    prefill = _median_seconds(lambda: run(1), args.iters, sync)
    whole = _median_seconds(lambda: run(args.new + 1), args.iters, sync)
    return {
        "prefill_s": prefill,
        "prefill_tokens_per_s": T / prefill,
        "decode_ms_per_token": (whole - prefill) / args.new * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--layers", type=int, default=4, help="Llama-3-8B layers kept (default 4)")
    parser.add_argument("--new", type=int, default=32, help="decoded tokens timed (default 32)")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    layouts = {"ulysses": (world, True), "zigzag_ring": (1, True)}
    if world == 4:
        layouts["hybrid_2x2"] = (2, True)
    sps = {}
    for name, (ulysses, zigzag) in layouts.items():
        dims = ParallelDims(sp=world, sp_ulysses=ulysses, sp_zigzag=zigzag, world_size=world)
        dims.build_mesh("cuda")
        sps[name] = dims.sequence_parallel()
    max_len = max(args.lengths) + args.new + 2
    model = _model(args, max_len)
    rows = []
    for T in args.lengths:
        ids = torch.randint(
            0, model.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)
        ).cuda()
        row: dict = {"prompt_tokens": T, "results": {}}
        if rank == 0:
            row["results"]["single"] = measure(model, ids, args)
        dist.barrier()
        torch.cuda.empty_cache()
        for name, sp in sps.items():
            apply_sp(model, sp)
            result = measure(model, ids, args, sp)
            peaks = [None] * world
            dist.all_gather_object(peaks, result["peak_gib"])
            result["peak_gib"] = max(peaks)
            row["results"][name] = result
            apply_sp(model, None)
            torch.cuda.empty_cache()
        if rank == 0:
            single = row["results"]["single"]
            for name in sps:
                r = row["results"][name]
                r["prefill_speedup"] = single["prefill_s"] / r["prefill_s"]
                r["same_tokens_as_single"] = sum(
                    a == b for a, b in zip(r["tokens"], single["tokens"], strict=True)
                ) / len(single["tokens"])
            rows.append(row)
            print(_format(row), flush=True)
            _write(rows, args, world)
    dist.destroy_process_group()


def _format(row: dict) -> str:
    lines = [f"prompt {row['prompt_tokens']:,} tokens"]
    for name, r in row["results"].items():
        extra = "".join(f"  {k}={r[k]:.2f}" for k in ("prefill_speedup", "same_tokens_as_single") if k in r)
        lines.append(
            f"  {name:<12} prefill {r['prefill_s'] * 1e3:9.1f} ms ({r['prefill_tokens_per_s']:>10,.0f} tok/s)  "
            f"decode {r['decode_ms_per_token']:6.2f} ms/token  peak {r['peak_gib']:6.1f} GiB{extra}"
        )
    return "\n".join(lines)


def _write(rows: list[dict], args, world: int) -> None:
    out = results_path("sequence_parallel_decode", world)
    meta = {
        **gpu_meta(world),
        "model": {"shape": "llama3_8b", "layers": args.layers, "dtype": "bf16", "batch": 1},
        "decoded_tokens_timed": args.new,
        "timing": {"iters": args.iters, "statistic": "median"},
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
