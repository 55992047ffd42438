"""World-model throughput on one GPU, cupola vs its peer in the same run: the diffusion DiT at the
Cosmos-1.0-7B block shape against diffusers' ``CosmosTransformer3DModel``, and the autoregressive WFM's
KV-cached decoding against Hugging Face ``LlamaForCausalLM`` of the same shape.

    python benchmarks/world_models.py                       # GPU: the recorded numbers (est. 2-4 min, H200)
    python benchmarks/world_models.py --quick               # CPU smoke run: tiny shapes, every code path
    python benchmarks/world_models.py --parts dit --dit-layers 8 --frames 57

Both parts use bf16 *weights* (``model.to(torch.bfloat16)``, no autocast, no fp32 master copy) for
cupola and the peer alike, random weights, eager mode (``--compile`` wraps both DiTs in
``torch.compile``). Timing: ``--warmup`` untimed runs, then the median of ``--iters`` runs, CUDA
events on the GPU (``time.perf_counter`` on the CPU); peak memory is ``max_memory_allocated`` over the
timed runs (weights included). Ratio = peer time / cupola time (> 1: cupola is faster).

1. DiT. cupola's ``DiT(dit_config("cosmos_dit_7b", n_layers=L))`` and diffusers'
   ``CosmosTransformer3DModel`` configured as Cosmos-1.0-Diffusion-7B-Text2World (32 heads x 128,
   4096 wide, MLP ratio 4, AdaLN-LoRA rank 256, patch 1x2x2, 16 latent channels, learnable absolute
   positions) cut to the same ``L`` blocks, the same text-embedding width (``--text-dim``, default 1024:
   Cosmos-1.0's T5-11B encoder, diffusers' ``text_embed_dim``) and the same positional grid. Input: the
   latent of a ``--frames x --height x --width`` clip through an 8x8x8 tokenizer (default 121x704x1280
   -> 16x88x160 latents -> 56,320 tokens), ``--text-len`` 512 text tokens of which 128 are real (the
   rest zeroed and masked in cross-attention, for both; diffusers' Cosmos pipeline zeroes them without a
   mask), ``fps`` 24. Measured:

   - training step, batch 1: forward + MSE loss + backward (``--optimizer`` adds a fused AdamW step to
     both); ms, latent tokens/s, model TFLOP/s (the same FLOP count for both models: matmuls + self-
     and cross-attention, backward = 2x forward), peak memory;
   - sampling step, batch 2 (classifier-free guidance: conditional + unconditional prompt in one
     batch), forward under ``torch.no_grad``: ms, peak memory.

2. AR decoding. cupola's ``ARWorldModel(ar_config("cosmos_ar_4b"))`` (no text cross-attention — the
   4B base model has none — so it is a Llama-shaped decoder with 3D RoPE) and ``LlamaForCausalLM``
   (SDPA, its default ``DynamicCache``) of the same shape: 4096 wide, 16 layers, 32 heads / 8 KV heads,
   SwiGLU 14336, vocab 64,000, untied output. A random prompt of ``--ar-prompt`` tokens (default 2560:
   one 40x64 latent frame of the DV 8x16x16 tokenizer at 640x1024) continued by ``--ar-new`` (512) tokens
   with the KV cache: cupola's ``sample.generate``, HF ``generate(min_new_tokens=N, max_new_tokens=N)``,
   greedy (``--ar-sample``: temperature 1 over the full vocabulary for both), batches ``--ar-batches``.
   Reported: new tokens/s end to end (prefill included), the prefill alone, decode ms per step
   ``(generate - prefill) / (N - 1)``, peak memory.

Checked on the way: output shapes of cupola and the peer agree (DiT output, generated token count); the
DiTs' forward FLOPs at the measured shape, counted by ``FlopCounterMode`` on the meta device, agree (and
agree with the formula behind "model TFLOP/s"); parameter counts at the measured depth and at the full
depth (28 DiT blocks, 16 AR layers; meta device). ``--quick`` exits non-zero if any measurement failed
(a missing peer package is recorded as "not installed", not a failure). Writes ``benchmarks/results/world_models_<device>.json`` after each part
(``_quick`` appended for ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, cuda_median_seconds, gpu_meta

from cupola.collections.world.autoregressive.model import ARConfig, ARWorldModel, ar_config
from cupola.collections.world.autoregressive.sample import generate
from cupola.collections.world.diffusion.dit import DiT, DiTConfig, dit_config
from cupola.collections.world.text import TextEncoderConfig

# Cosmos-1.0-Diffusion-7B's largest latent grid (frames, height, width) in diffusers' config; both models
# get learnable absolute position tables of this size divided by the patch (cupola's flavor default,
# (64, 64, 64) patches, is too small for 720p: 88x160 latents are 44x80 patches).
PEER_MAX_SIZE = (128, 240, 240)
# real text tokens of --text-len (at most a quarter of it); the rest is padding, masked in cross-attention
TEXT_REAL_TOKENS = 128


def text_real_tokens(text_len: int) -> int:
    return max(1, min(TEXT_REAL_TOKENS, text_len // 4))


def log(msg: str) -> None:
    print(f"[world_models {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def timed(fn: Callable[[], object], dev: torch.device, warmup: int, iters: int) -> dict:
    """``{"seconds": median, "peak_gib": ...}`` of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_median_seconds(fn, iters)
        return {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "peak_gib": None}


def attempt(fn: Callable[[], dict]) -> dict:
    """``fn()``, or ``{"error": ...}`` (out of memory, or any failure in one line) without stopping the run."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        result = {"error": "out of memory"}
    except Exception as e:  # a peer's API change must not cost the other numbers
        result = {"error": _short(e)}
    log(f"  failed: {result['error']}")
    _free()
    return result


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- DiT


def dit_cfg(args, layers: int) -> DiTConfig:
    pt, ph, pw = (1, 2, 2)
    grid = (PEER_MAX_SIZE[0] // pt, PEER_MAX_SIZE[1] // ph, PEER_MAX_SIZE[2] // pw)
    if args.quick:  # tiny: 128 wide, 4 heads of 32, AdaLN-LoRA rank 32
        return dit_config(
            "tiny",
            latent_channels=16,
            n_layers=layers,
            text=TextEncoderConfig(dim=args.text_dim),
            abs_pos_grid=grid,
        )
    base = dit_config("cosmos_dit_7b")
    return dit_config(
        "cosmos_dit_7b",
        n_layers=layers,
        # the flavor says T5-v1.1-XXL (4096 wide); Cosmos-1.0 conditions on T5-11B (1024): --text-dim
        text=TextEncoderConfig(
            kind="t5", dim=args.text_dim, max_length=base.text.max_length, path=base.text.path
        ),
        abs_pos_grid=grid,
        rope_extrapolation=(2.0, 1.0, 1.0),  # Cosmos-1.0's rope_scale (NTK stretch of time): same tables
    )


def peer_dit_kwargs(cfg: DiTConfig) -> dict:
    """diffusers' CosmosTransformer3DModel arguments for the shape of ``cfg``.

    Parameter differences that remain (a few %, none in the blocks' matmuls):
    - cupola keeps a separate final-layer shared AdaLN term (``final_shared``, dim x 2 dim: 33.6M at 4096);
      diffusers reuses the first 2 dim of the blocks' shared term;
    - the noise embedding: cupola 256 sinusoidal features -> dim -> dim (with biases); diffusers dim
      features -> dim (no bias) plus an RMSNorm;
    - diffusers' padding-mask input channel (Cosmos-1.0 concatenates one; 4 x dim weights) is left off:
      it needs torchvision to resize the mask, and costs nothing measurable.
    The learnable absolute position tables are the same size in both (PEER_MAX_SIZE / patch).
    """
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.latent_channels,
        "num_attention_heads": cfg.n_heads,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.n_layers,
        "mlp_ratio": cfg.mlp_ratio,
        "text_embed_dim": cfg.text.dim,
        "adaln_lora_dim": cfg.adaln_lora_dim,
        "max_size": PEER_MAX_SIZE,
        "patch_size": tuple(cfg.patch),
        "rope_scale": tuple(cfg.rope_extrapolation),
        "concat_padding_mask": False,
        "extra_pos_embed_type": "learnable",
    }


def _peer_dit_class():
    from diffusers.models.transformers.transformer_cosmos import CosmosTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting the position tables to bf16: meant
    return CosmosTransformer3DModel


def dit_full_size_params(args) -> dict:
    """Parameter counts at the full 28 blocks (meta device: nothing allocated)."""
    cfg = dit_cfg(args, 4 if args.quick else 28)
    out = {"layers": cfg.n_layers}
    with torch.device("meta"):
        out["cupola"] = n_params(DiT(cfg))
        try:
            peer = _peer_dit_class()
        except ImportError as e:
            out["diffusers"] = f"not installed ({_short(e)})"
        else:
            out["diffusers"] = n_params(peer(**peer_dit_kwargs(cfg)))
            # as published: with the padding-mask channel
            out["diffusers_with_padding_mask_channel"] = n_params(
                peer(**{**peer_dit_kwargs(cfg), "concat_padding_mask": True})
            )
    return out


def dit_flops_forward(cfg: DiTConfig, batch: int, tokens: int, text_len: int) -> float:
    """Matmul and attention FLOPs of one forward (AdaLN and the per-frame embeddings left out)."""
    D, Dt, hidden = cfg.dim, cfg.text.dim, int(cfg.dim * cfg.mlp_ratio)
    patch = math.prod(cfg.patch)
    per_block = (
        2 * tokens * (4 * D * D + 2 * D * D + 2 * D * hidden)  # self q k v o, cross q o, MLP
        + 2 * text_len * 2 * Dt * D  # cross-attention k, v of the text
        + 4 * tokens * tokens * D  # self-attention scores and values
        + 4 * tokens * text_len * D  # cross-attention
    )
    io = 2 * tokens * D * patch * (cfg.in_channels + cfg.latent_channels)
    return batch * (cfg.n_layers * per_block + io)


def dit_inputs(cfg: DiTConfig, batch: int, latent: tuple[int, int, int], text_len: int, dev, dtype) -> dict:
    T, H, W = latent
    g = torch.Generator(device="cpu").manual_seed(batch)
    x = torch.randn(batch, cfg.in_channels, T, H, W, generator=g).to(dev, dtype)
    sigma = torch.full((batch,), 2.0)
    c_noise = 0.25 * sigma.log()  # EDM's noise conditioning, as both models' callers pass it
    ctx = torch.randn(batch, text_len, cfg.text.dim, generator=g)
    mask = torch.zeros(batch, text_len, dtype=torch.bool)
    mask[0, : text_real_tokens(text_len)] = True
    if batch > 1:  # classifier-free guidance: the second sample is the empty prompt (one real token)
        mask[1:, :1] = True
    ctx = ctx * mask[..., None]  # padding embeddings zeroed, as the Cosmos pipeline does
    return {
        "x": x,
        "c_noise_B_T": c_noise[:, None].expand(batch, T).to(dev, dtype),
        "c_noise_B": c_noise.to(dev),
        "context": ctx.to(dev, dtype),
        "mask": mask.to(dev),
        "target": torch.randn(batch, cfg.latent_channels, T, H, W, generator=g).to(dev, dtype),
    }


def dit_forward(kind: str, model, inp: dict, fps: float):
    if kind == "cupola":
        return model(inp["x"], inp["c_noise_B_T"], inp["context"], inp["mask"], fps=fps)
    return model(
        hidden_states=inp["x"],
        timestep=inp["c_noise_B"],
        encoder_hidden_states=inp["context"],
        attention_mask=inp["mask"],
        fps=int(fps),
        return_dict=False,
    )[0]


def dit_counted_flops(cfg: DiTConfig, latent, text_len: int) -> dict:
    """Forward FLOPs of both models at the measured shape, batch 1, counted by torch's FlopCounterMode on
    the meta device (nothing computed): equal counts say the two are the same network size."""
    from torch.utils.flop_counter import FlopCounterMode

    inp = {k: v.to("meta") for k, v in dit_inputs(cfg, 1, latent, text_len, "cpu", torch.bfloat16).items()}
    out = {"formula": dit_flops_forward(cfg, 1, math.prod(latent) // math.prod(cfg.patch), text_len)}
    for kind in ("cupola", "diffusers"):
        try:
            with torch.device("meta"):
                model = DiT(cfg) if kind == "cupola" else _peer_dit_class()(**peer_dit_kwargs(cfg))
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                dit_forward(kind, model.to(torch.bfloat16), inp, 24.0)
            out[kind] = counter.get_total_flops()
        except ImportError as e:
            out[kind] = f"not installed ({_short(e)})"
        except Exception as e:
            out[kind] = _short(e)
    if isinstance(out["cupola"], int) and isinstance(out["diffusers"], int):
        # per-frame (cupola) vs per-sample (diffusers) AdaLN matmuls differ: visible at toy sizes only
        out["cupola_over_diffusers"] = out["cupola"] / out["diffusers"]
    return out


def build_dit(kind: str, cfg: DiTConfig, dev: torch.device, compile: bool):
    torch.manual_seed(0)
    with torch.device(dev):
        if kind == "cupola":
            model = DiT(cfg)
            model.init_weights()
        else:
            model = _peer_dit_class()(**peer_dit_kwargs(cfg))
    model = model.to(torch.bfloat16)
    return torch.compile(model) if compile else model


def bench_dit_model(kind: str, cfg: DiTConfig, args, dev: torch.device, latent, shapes: dict) -> dict:
    log(f"DiT {kind}: building {cfg.n_layers} blocks")
    model = build_dit(kind, cfg, dev, args.compile)
    out: dict = {"params": n_params(model)}
    tokens = math.prod(latent) // math.prod(cfg.patch)
    flops = dit_flops_forward(cfg, 1, tokens, args.text_len)

    def train() -> dict:
        inp = dit_inputs(cfg, 1, latent, args.text_len, dev, torch.bfloat16)
        opt = None
        if args.optimizer:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev.type == "cuda")
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            y = dit_forward(kind, model, inp, args.fps)
            F.mse_loss(y.float(), inp["target"].float()).backward()
            if opt is not None:
                opt.step()

        y = dit_forward(kind, model, inp, args.fps)
        shapes[f"{kind}_train_out"] = list(y.shape)
        del y
        log(f"DiT {kind}: training step (batch 1, {tokens:,} tokens)")
        r = timed(step, dev, args.warmup, args.iters)
        model.zero_grad(set_to_none=True)
        r["tokens_per_s"] = tokens / r["seconds"]
        r["model_tflops"] = 3 * flops / r["seconds"] / 1e12
        return r

    @torch.no_grad()
    def sample() -> dict:
        inp = dit_inputs(cfg, 2, latent, args.text_len, dev, torch.bfloat16)
        model.eval()
        y = dit_forward(kind, model, inp, args.fps)
        shapes[f"{kind}_sample_out"] = list(y.shape)
        if not torch.isfinite(y.float()).all():
            raise RuntimeError("non-finite output")
        del y
        log(f"DiT {kind}: sampling step (batch 2 = cond + uncond)")
        r = timed(lambda: dit_forward(kind, model, inp, args.fps), dev, args.warmup, args.iters)
        r["model_tflops"] = 2 * flops / r["seconds"] / 1e12
        return r

    out["train"] = attempt(train)
    _free()
    out["sample"] = attempt(sample)
    return out  # the model goes with this frame: the caller frees memory


def bench_dit(args, dev: torch.device) -> dict:
    cfg = dit_cfg(args, args.dit_layers)
    latent = (1 + (args.frames - 1) // 8, args.height // 8, args.width // 8)
    tokens = math.prod(latent) // math.prod(cfg.patch)
    res: dict = {
        "config": {
            "dim": cfg.dim,
            "heads": cfg.n_heads,
            "head_dim": cfg.head_dim,
            "layers": cfg.n_layers,
            "mlp_ratio": cfg.mlp_ratio,
            "adaln_lora_dim": cfg.adaln_lora_dim,
            "text_dim": cfg.text.dim,
            "text_len": args.text_len,
            "text_real_tokens": text_real_tokens(args.text_len),
            "clip": [args.frames, args.height, args.width],
            "latent_T_H_W": list(latent),
            "tokens": tokens,
            "fps": args.fps,
            "optimizer_step": args.optimizer,
            "compile": args.compile,
            "dtype": "bf16 weights (no autocast)",
        },
        "params_full_depth": dit_full_size_params(args),
        "forward_flops_counted": dit_counted_flops(cfg, latent, args.text_len),
        "results": {},
    }
    shapes: dict = {}
    res["results"]["cupola"] = bench_dit_model("cupola", cfg, args, dev, latent, shapes)
    _free()
    try:
        _peer_dit_class()
    except ImportError as e:
        res["results"]["diffusers"] = {"error": f"not installed ({_short(e)})"}
    else:
        res["results"]["diffusers"] = bench_dit_model("diffusers", cfg, args, dev, latent, shapes)
        _free()
    res["output_shapes"] = shapes
    for what in ("train", "sample"):
        a, b = shapes.get(f"cupola_{what}_out"), shapes.get(f"diffusers_{what}_out")
        if a is not None and b is not None and a != b:
            raise AssertionError(f"DiT {what} output shapes differ: cupola {a}, diffusers {b}")
    ours, peer = res["results"]["cupola"], res["results"]["diffusers"]
    res["ratio_peer_over_cupola"] = {
        what: peer[what]["seconds"] / ours[what]["seconds"]
        for what in ("train", "sample")
        if "seconds" in ours.get(what, {}) and "seconds" in peer.get(what, {})
    }
    return res


# ------------------------------------------------------------------------------------------------ AR


def ar_cfg(args) -> ARConfig:
    if args.quick:
        return ar_config(
            "tiny",
            vocab_size=512,
            dim=128,
            n_heads=4,
            n_kv_heads=2,
            ffn_hidden_dim=256,
            n_layers=args.ar_layers,
        )
    return ar_config("cosmos_ar_4b", n_layers=args.ar_layers)


def ar_grid(cfg: ARConfig, args) -> tuple[int, int, int]:
    H, W = (4, 8) if args.quick else (cfg.max_latent_height, cfg.max_latent_width)  # 40 x 64: 640x1024 / 16
    frames = -(-(args.ar_prompt + args.ar_new) // (H * W))
    if frames > cfg.max_latent_frames:
        raise SystemExit(
            f"--ar-prompt + --ar-new = {args.ar_prompt + args.ar_new} tokens exceed the model's "
            f"{cfg.max_latent_frames} x {H} x {W} grid"
        )
    return frames, H, W


def llama_config(cfg: ARConfig, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=max(max_len, 4096),
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def build_llama(cfg: ARConfig, max_len: int, dev: torch.device | str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(
            llama_config(cfg, max_len), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.to(torch.bfloat16).eval()


def build_ar(cfg: ARConfig, dev: torch.device | str) -> ARWorldModel:
    torch.manual_seed(0)
    with torch.device(dev):
        model = ARWorldModel(cfg)
        if torch.device(dev).type != "meta":
            model.init_weights()
    return model.to(torch.bfloat16).eval()


def ar_full_size_params(args) -> dict:
    cfg = ar_cfg(args) if args.quick else ar_config("cosmos_ar_4b")
    out = {"layers": cfg.n_layers, "cupola": n_params(build_ar(cfg, "meta"))}
    try:
        out["transformers"] = n_params(build_llama(cfg, 8192, "meta"))
    except ImportError as e:
        out["transformers"] = f"not installed ({_short(e)})"
    return out


@torch.no_grad()
def bench_ar_model(
    kind: str, model, cfg: ARConfig, grid, args, dev: torch.device, tokens_out: dict, decode: str = "auto"
) -> dict:
    """``decode``: cupola's decoding mode (``sample.DECODE_MODES``; auto = a CUDA graph on CUDA)."""
    P, N = args.ar_prompt, args.ar_new
    rows = {}
    for B in args.ar_batches:
        prefix = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B)).to(dev)

        def run(n: int, prefix=prefix, B=B):
            if kind.startswith("cupola"):
                temperature = 1.0 if args.ar_sample else 0.0
                out = generate(model, prefix, grid, n, temperature=temperature, decode=decode)
            else:
                sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
                out = model.generate(
                    prefix,
                    attention_mask=torch.ones_like(prefix),
                    min_new_tokens=n,
                    max_new_tokens=n,
                    pad_token_id=0,
                    disable_compile=True,  # eager, as cupola's (its DynamicCache would not compile anyway)
                    **(sampling if args.ar_sample else {"do_sample": False}),
                )
            tokens_out[f"{kind}_b{B}"] = list(out.shape)

        def prefill(prefix=prefix):
            if kind.startswith("cupola"):
                return model(prefix, grid, kv_cache=model.new_kv_cache(P + N))[:, -1]
            # generate's own prefill computes the last position's logits only (cupola's: all of them)
            return model(prefix, use_cache=True, logits_to_keep=1).logits[:, -1]

        def one(B=B) -> dict:
            log(f"AR {kind}: batch {B}, prompt {P}, {N} new tokens")
            run(min(N, 8))  # warm-up: the prefill and a few steps
            gen = timed(lambda: run(N), dev, 0, args.ar_iters)
            pre = timed(prefill, dev, 1, args.ar_iters)
            decode_s = max(gen["seconds"] - pre["seconds"], 0.0) / max(N - 1, 1)
            return {
                "generate_s": gen["seconds"],
                "new_tokens_per_s": B * N / gen["seconds"],
                "prefill_ms": 1e3 * pre["seconds"],
                "decode_ms_per_step": 1e3 * decode_s,
                "decode_tokens_per_s": B / decode_s if decode_s else None,
                "peak_gib": gen["peak_gib"],
            }

        rows[f"batch_{B}"] = attempt(one)
        _free()
    return rows


def bench_ar(args, dev: torch.device) -> dict:
    cfg = ar_cfg(args)
    grid = ar_grid(cfg, args)
    res: dict = {
        "config": {
            "dim": cfg.dim,
            "layers": cfg.n_layers,
            "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads,
            "ffn": cfg.ffn_hidden_dim,
            "vocab": cfg.vocab_size,
            "cross_attention": cfg.cross_attention,
            "prompt_tokens": args.ar_prompt,
            "new_tokens": args.ar_new,
            "grid_T_H_W": list(grid),
            "batches": args.ar_batches,
            "decoding": "sampling, temperature 1, full vocabulary" if args.ar_sample else "greedy",
            "dtype": "bf16 weights",
            "hf_cache": "DynamicCache (generate's default)",
        },
        "params_full_depth": ar_full_size_params(args),
        "results": {},
    }
    tokens_out: dict = {}
    log(f"AR cupola: building {cfg.n_layers} layers")
    model = build_ar(cfg, dev)
    res["params"] = {"cupola": n_params(model)}
    res["config"]["cupola_decode"] = "CUDA graph of a static-shape step" if dev.type == "cuda" else "eager"
    res["results"]["cupola"] = bench_ar_model("cupola", model, cfg, grid, args, dev, tokens_out)
    if dev.type == "cuda":  # the eager path too: what the graph buys
        res["results"]["cupola_eager"] = bench_ar_model(
            "cupola_eager", model, cfg, grid, args, dev, tokens_out, decode="eager"
        )
    del model
    _free()
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        res["results"]["transformers"] = {"error": f"not installed ({_short(e)})"}
    else:
        log(f"AR transformers: building LlamaForCausalLM, {cfg.n_layers} layers")
        try:
            model = build_llama(cfg, args.ar_prompt + args.ar_new, dev)
        except Exception as e:
            res["results"]["transformers"] = {"error": _short(e)}
        else:
            res["params"]["transformers"] = n_params(model)
            res["results"]["transformers"] = bench_ar_model(
                "transformers", model, cfg, grid, args, dev, tokens_out
            )
            del model
            _free()
    res["output_shapes"] = tokens_out
    for B in args.ar_batches:
        a, b = tokens_out.get(f"cupola_b{B}"), tokens_out.get(f"transformers_b{B}")
        if a is not None and b is not None and a != b:
            raise AssertionError(f"AR batch {B}: cupola generated {a}, transformers {b}")
    ours, peer = res["results"]["cupola"], res["results"]["transformers"]
    res["ratio_peer_over_cupola"] = {
        k: peer[k]["generate_s"] / ours[k]["generate_s"]
        for k in ours
        if "generate_s" in ours[k] and "generate_s" in peer.get(k, {})
    }
    return res


# --------------------------------------------------------------------------------------------- output


def _fmt(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    if "error" in r:
        e = r["error"]
        return (
            "OOM" if e == "out of memory" else "not installed" if e.startswith("not installed") else "failed"
        )
    v = r.get(key)
    return "—" if v is None else format(v * scale, fmt)


def _count(n: int | str | None) -> str:
    if not isinstance(n, int):
        return "—" if n is None else str(n)
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def _flops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP" if x >= 1e12 else f"{x / 1e9:,.3f} GFLOP"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def dit_table(res: dict) -> str:
    c = res["config"]
    ours, peer = res["results"]["cupola"], res["results"]["diffusers"]
    ratio = res["ratio_peer_over_cupola"]
    head = (
        f"\nDiT, {c['layers']} blocks of {c['dim']} ({c['heads']}x{c['head_dim']}), text {c['text_dim']} x "
        f"{c['text_len']}; clip {'x'.join(map(str, c['clip']))} -> latent {'x'.join(map(str, c['latent_T_H_W']))} "
        f"= {c['tokens']:,} tokens; bf16\n\n"
        "| | cupola | diffusers | diffusers / cupola |\n|---|---|---|---|\n"
    )
    rows = []
    if "error" in peer and "train" not in peer:
        peer = {"train": peer, "sample": peer, "params": None}
    rows.append(f"| parameters | {_count(ours['params'])} | {_count(peer.get('params'))} | |")
    ot, pt, os_, ps = ours["train"], peer["train"], ours["sample"], peer["sample"]
    rows += [
        f"| train step (B=1) ms | {_fmt(ot, 'seconds', ',.1f', 1e3)} | {_fmt(pt, 'seconds', ',.1f', 1e3)} | {_ratio(ratio.get('train'))} |",
        f"| train tokens/s | {_fmt(ot, 'tokens_per_s', ',.0f')} | {_fmt(pt, 'tokens_per_s', ',.0f')} | |",
        f"| train model TFLOP/s | {_fmt(ot, 'model_tflops', ',.1f')} | {_fmt(pt, 'model_tflops', ',.1f')} | |",
        f"| train peak GiB | {_fmt(ot, 'peak_gib', '.1f')} | {_fmt(pt, 'peak_gib', '.1f')} | |",
        f"| sampling step (B=2) ms | {_fmt(os_, 'seconds', ',.1f', 1e3)} | {_fmt(ps, 'seconds', ',.1f', 1e3)} | {_ratio(ratio.get('sample'))} |",
        f"| sampling model TFLOP/s | {_fmt(os_, 'model_tflops', ',.1f')} | {_fmt(ps, 'model_tflops', ',.1f')} | |",
        f"| sampling peak GiB | {_fmt(os_, 'peak_gib', '.1f')} | {_fmt(ps, 'peak_gib', '.1f')} | |",
    ]
    full = res["params_full_depth"]
    tail = f"\nparameters at {full['layers']} blocks: cupola {_count(full['cupola'])}, diffusers " + (
        f"{_count(full['diffusers'])} ({_count(full['diffusers_with_padding_mask_channel'])} with the "
        "padding-mask channel)"
        if isinstance(full["diffusers"], int)
        else str(full["diffusers"])
    )
    fl = res["forward_flops_counted"]
    tail += "\nforward FLOPs (batch 1, counted on the meta device): " + ", ".join(
        f"{k} {v:.4f}"
        if k == "cupola_over_diffusers"
        else f"{k} {_flops(v) if isinstance(v, int | float) else v}"
        for k, v in fl.items()
    )
    return head + "\n".join(rows) + tail


def ar_table(res: dict) -> str:
    c = res["config"]
    ours, peer = res["results"]["cupola"], res["results"]["transformers"]
    head = (
        f"\nAR decoding, {c['layers']} layers x {c['dim']} ({c['heads']}/{c['kv_heads']} heads), vocab {c['vocab']:,}; "
        f"prompt {c['prompt_tokens']:,} + {c['new_tokens']} new tokens, {c['decoding']}, bf16, KV cache\n\n"
        "| batch | cupola new tok/s | HF Llama new tok/s | HF / cupola time | cupola prefill ms | HF prefill ms "
        "| cupola decode ms/step | HF decode ms/step | cupola peak GiB | HF peak GiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for k in ours:
        o = ours[k]
        p = peer if "error" in peer else peer.get(k, {"error": "missing"})
        rows.append(
            f"| {k.removeprefix('batch_')} | {_fmt(o, 'new_tokens_per_s', ',.1f')} | {_fmt(p, 'new_tokens_per_s', ',.1f')} "
            f"| {_ratio(res['ratio_peer_over_cupola'].get(k))} | {_fmt(o, 'prefill_ms', ',.1f')} | {_fmt(p, 'prefill_ms', ',.1f')} "
            f"| {_fmt(o, 'decode_ms_per_step', '.2f')} | {_fmt(p, 'decode_ms_per_step', '.2f')} "
            f"| {_fmt(o, 'peak_gib', '.1f')} | {_fmt(p, 'peak_gib', '.1f')} |"
        )
    if "cupola_eager" in res["results"]:
        eager = res["results"]["cupola_eager"]
        rows.append(
            "\ncupola without the CUDA graph (eager decode steps): "
            + ", ".join(f"{k}: {_fmt(v, 'new_tokens_per_s', ',.1f')} tok/s" for k, v in eager.items())
        )
    full = res["params_full_depth"]
    tail = (
        f"\nparameters at {full['layers']} layers: cupola {_count(full['cupola'])}, transformers "
        f"{_count(full['transformers'])}; cross-attention to text: {c['cross_attention']} (like for like with Llama)"
    )
    return head + "\n".join(rows) + tail


def meta_info(dev: torch.device) -> dict:
    if dev.type == "cuda":
        meta = gpu_meta(1)
    else:
        meta = {
            "device": platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }
    for name in ("diffusers", "transformers"):
        try:
            meta[name] = __import__(name).__version__
        except ImportError:
            meta[name] = "not installed"
    meta["sdpa_note"] = "both models call torch's scaled_dot_product_attention (same kernels)"
    return meta


def output_path(dev: torch.device, quick: bool) -> Path:
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    slug = name.replace("NVIDIA ", "").replace(" ", "_").lower() + ("_quick" if quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"world_models_{slug}.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes (numbers meaningless)")
    p.add_argument("--parts", nargs="+", choices=["dit", "ar"], default=["dit", "ar"])
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    # DiT
    p.add_argument("--dit-layers", type=int, default=4, help="DiT blocks (Cosmos-1.0-7B has 28)")
    p.add_argument("--frames", type=int, default=121, help="pixel frames (1 + 8k; 8x temporal compression)")
    p.add_argument("--height", type=int, default=704)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument(
        "--text-dim", type=int, default=1024, help="text embedding width (Cosmos-1.0: T5-11B, 1024)"
    )
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--optimizer", action="store_true", help="add a fused AdamW step to both training steps")
    p.add_argument("--compile", action="store_true", help="torch.compile both DiTs")
    # AR
    p.add_argument("--ar-layers", type=int, default=16, help="AR layers (cosmos_ar_4b has 16)")
    p.add_argument("--ar-prompt", type=int, default=2560)
    p.add_argument("--ar-new", type=int, default=512)
    p.add_argument("--ar-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--ar-iters", type=int, default=2)
    p.add_argument("--ar-sample", action="store_true", help="sample at temperature 1 instead of greedy")
    args = p.parse_args()
    if args.quick:
        args.frames, args.height, args.width, args.text_len, args.text_dim = 9, 64, 64, 16, 64
        args.dit_layers, args.ar_layers, args.ar_prompt = 2, 2, 32
        args.iters, args.ar_iters, args.ar_new, args.ar_batches = 1, 1, 8, [1, 2]
    if (args.frames - 1) % 8 or args.height % 16 or args.width % 16:
        raise SystemExit(
            "--frames must be 1 + 8k and --height/--width multiples of 16 (8x tokenizer, 2x2 patches)"
        )
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    t_start = time.perf_counter()
    record = {"meta": meta_info(dev), "args": vars(args)}
    out = output_path(dev, args.quick)
    tables = []
    for part in args.parts:
        res = bench_dit(args, dev) if part == "dit" else bench_ar(args, dev)
        record[part] = res
        record["seconds"] = time.perf_counter() - t_start
        out.write_text(json.dumps(record, indent=2))
        tables.append(dit_table(res) if part == "dit" else ar_table(res))
        print(tables[-1], flush=True)
    log(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")
    failed = [e for e in _errors(record) if not e.startswith("not installed")]
    if failed and args.quick:
        raise SystemExit(f"{len(failed)} measurement(s) failed: {failed}")


def _errors(node) -> list[str]:
    """Every ``"error"`` recorded anywhere in the results."""
    if isinstance(node, dict):
        found = [node["error"]] if isinstance(node.get("error"), str) else []
        return found + [e for k, v in node.items() if k != "error" for e in _errors(v)]
    return []


if __name__ == "__main__":
    main()
