"""Sequence-parallel attention, forward + backward, on 2 (or 4) GPUs over NCCL.

    torchrun --nproc-per-node 2 benchmarks/sequence_parallel.py [--lengths 32768 ... 524288]

Shape: LongVILA-8B's attention (Llama-3-8B): bf16, 32 query heads, 8 KV heads, head dim 128, batch
1, causal. For each total length T, in the same run:

- ``single``: the whole sequence on one GPU (rank 0; SDPA, FlashAttention) — the scaling baseline;
- ``ulysses``, ``ring`` (contiguous chunks), ``zigzag_ring``, and on 4 GPUs ``hybrid_2x2`` (Ulysses
  inside pairs × zigzag ring across them): cupola's :class:`SequenceParallel`;
- ``torch_cp``: PyTorch's ``torch.distributed.tensor.experimental.context_parallel`` ring (its
  default head-tail load balancing and KV rotation), SDPA patched inside the context.

Each is timed (CUDA events, median of ``--iters`` after ``--warmup``) as one forward and one
backward of the attention alone on this rank's shard, with peak memory. Scaling efficiency =
single-GPU time / (GPUs × time). TFLOP/s per GPU counts causal attention as
3.5 × 2 × 2 · T² · H · D / 2 (forward 1, backward 2.5) over the GPUs. Prints a table; writes
``benchmarks/results/sequence_parallel_<device>_<n>gpu.json`` and a PNG of tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _results import gpu_meta, results_path

from cupola.toolkit.parallel.dims import ParallelDims


def _time(fn, warmup: int, iters: int, sync: bool = True) -> tuple[float, float]:
    """Median seconds of ``fn()`` and the peak memory (GiB) it reached (``sync``: all ranks start
    each iteration together; False for the one-GPU baseline, which rank 0 runs alone)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sync:
            dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def _inputs(T: int, args, shard=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [
        (1, args.heads, T, args.head_dim),
        (1, args.kv_heads, T, args.head_dim),
        (1, args.kv_heads, T, args.head_dim),
    ]
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16)
        out.append(shard(t) if shard else t)
    return out


def check_cupola(T: int, world: int, ulysses: int, zigzag: bool, args) -> float:
    """Largest relative difference (max |a - b| / max |b|) of this layout's output and input
    gradients from one GPU's SDPA (bf16)."""
    sp = _sp(world, ulysses, zigzag)
    full = [t.requires_grad_() for t in _inputs(T, args)]
    g = torch.Generator(device="cuda").manual_seed(1)  # the same output gradient on every rank
    dout = torch.randn(1, args.heads, T, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    local = [sp.shard(t.detach(), dim=2).requires_grad_() for t in full]
    out = sp.attention(*local, causal=True)
    out.backward(sp.shard(dout, dim=2))
    pairs = [(out, ref.detach())] + [(part.grad, t.grad) for part, t in zip(local, full, strict=True)]
    return max(
        float((a.float() - sp.shard(b, dim=2).float()).abs().max() / b.float().abs().max()) for a, b in pairs
    )


def _sp(world: int, ulysses: int, zigzag: bool):
    key = ("cupola", ulysses, zigzag)
    if key not in _MESHES:  # one set of process groups per layout, reused across lengths
        dims = ParallelDims(sp=world, sp_ulysses=ulysses, sp_zigzag=zigzag, world_size=world)
        dims.build_mesh("cuda")
        _MESHES[key] = dims.sequence_parallel()
    return _MESHES[key]


def bench_cupola(T: int, world: int, ulysses: int, zigzag: bool, args) -> tuple[float, float]:
    sp = _sp(world, ulysses, zigzag)
    q, k, v = (t.requires_grad_() for t in _inputs(T, args, lambda t: sp.shard(t, dim=2).contiguous()))
    dout = torch.randn_like(q)

    def step():
        out = sp.attention(q, k, v, causal=True)
        out.backward(dout)

    return _time(step, args.warmup, args.iters)


def bench_torch_cp(T: int, world: int, args) -> tuple[float, float, str]:
    from torch.distributed.tensor.experimental import context_parallel

    mesh = _mesh("cp", world)
    rep = args.heads // args.kv_heads
    for gqa in (True, False):
        q, k, v = _inputs(T, args)
        if not gqa:  # an older context_parallel without GQA: give it the repeated KV heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        # the context shards the buffers in place (head-tail load balancing) and patches SDPA
        with context_parallel(
            mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}
        ):
            ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
            dout = torch.randn_like(ql)

            def step(ql=ql, kl=kl, vl=vl, dout=dout, gqa=gqa):
                out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True, enable_gqa=gqa)
                out.backward(dout)

            try:
                seconds, mem = _time(step, args.warmup, args.iters)
            except Exception as e:
                if not gqa:
                    raise
                note = f"KV heads repeated to {args.heads} (with GQA: {type(e).__name__}: {str(e)[:120]})"
                continue
            return seconds, mem, "GQA passed through (enable_gqa)" if gqa else note
    raise AssertionError("unreachable")


_MESHES: dict = {}


def _mesh(name: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    if name not in _MESHES:
        _MESHES[name] = init_device_mesh("cuda", (world,), mesh_dim_names=(name,))
    return _MESHES[name]


def bench_single(T: int, args) -> tuple[float, float]:
    q, k, v = (t.requires_grad_() for t in _inputs(T, args))
    dout = torch.randn_like(q)

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(dout)

    return _time(step, args.warmup, args.iters, sync=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072, 262144, 524288])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--backends", nargs="+", help="a subset of the rows (default: all)")
    args = parser.parse_args()

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timedelta(minutes=4))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.backends.cuda.matmul.allow_tf32 = True
    backends = {"ulysses": (world, True), "ring": (1, False), "zigzag_ring": (1, True)}
    if world == 4:
        backends["hybrid_2x2"] = (2, True)
    wanted = set(args.backends or [*backends, "torch_cp", "single"])
    checks = {}
    for name, (ulysses, zigzag) in backends.items():  # correctness first, at 8K tokens
        if rank == 0:
            print(f"checking {name} ...", flush=True)
        checks[name] = check_cupola(8192, world, ulysses, zigzag, args)
    if rank == 0:
        print(
            "max relative error vs one-GPU SDPA at 8192 tokens (bf16):",
            {k: round(v, 5) for k, v in checks.items()},
        )
    rows = []
    for T in args.lengths:
        flops = 3.5 * 2 * 2 * T * T * args.heads * args.head_dim / 2
        row: dict = {"tokens": T, "results": {}}
        if "single" in wanted:
            if rank == 0:
                s, m = bench_single(T, args)
                row["results"]["single"] = {"seconds": s, "peak_gib": m}
            dist.barrier()
        for name, (ulysses, zigzag) in backends.items():
            if name in wanted:
                s, m = bench_cupola(T, world, ulysses, zigzag, args)
                row["results"][name] = {"seconds": s, "peak_gib": m}
        if "torch_cp" in wanted:
            s, m, note = bench_torch_cp(T, world, args)
            row["results"]["torch_cp"] = {"seconds": s, "peak_gib": m, "note": note}
        peaks = [None] * world
        dist.all_gather_object(peaks, {k: v["peak_gib"] for k, v in row["results"].items()})
        single = row["results"].get("single", {}).get("seconds")
        if rank == 0:
            for name, r in row["results"].items():
                gpus = 1 if name == "single" else world
                r["peak_gib"] = max(p.get(name, 0.0) for p in peaks)
                r["tokens_per_s"] = T / r["seconds"]
                r["tflops_per_gpu"] = flops / r["seconds"] / gpus / 1e12
                if single and name != "single":
                    r["scaling_efficiency"] = single / (world * r["seconds"])
            cp = row["results"].get("torch_cp", {}).get("seconds")
            for name in backends:
                if cp and name in row["results"]:
                    row["results"][name]["speedup_vs_torch_cp"] = cp / row["results"][name]["seconds"]
            rows.append(row)
            print(_format_row(row), flush=True)
            _write(rows, args, world, checks)  # after every length: a cut-off run keeps what it measured
        torch.cuda.empty_cache()
    dist.destroy_process_group()


def _format_row(row: dict) -> str:
    lines = [f"T = {row['tokens']:,}"]
    for name, r in row["results"].items():
        extra = "".join(
            f"  {key}={r[key]:.2f}" for key in ("scaling_efficiency", "speedup_vs_torch_cp") if key in r
        )
        lines.append(
            f"  {name:<12} {r['seconds'] * 1e3:9.1f} ms  {r['tokens_per_s']:>12,.0f} tok/s  "
            f"{r['tflops_per_gpu']:6.1f} TFLOP/s/GPU  peak {r['peak_gib']:6.1f} GiB{extra}"
        )
    return "\n".join(lines)


def _write(rows: list[dict], args, world: int, checks: dict) -> None:
    out = results_path("sequence_parallel", world)
    meta = {
        **gpu_meta(world),
        "shape": {
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": "bf16",
            "causal": True,
        },
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median"},
        "max_relative_error_vs_single_gpu_8192": checks,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        names = sorted({n for r in rows for n in r["results"]})
        for name in names:
            pts = [(r["tokens"], r["results"][name]["tokens_per_s"]) for r in rows if name in r["results"]]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("attention fwd+bwd tokens/s")
        ax.set_title(f"sequence-parallel attention, {world}x {meta['device']}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
