"""``cupola vlm chat``: ask a trained VLM about a video or an image."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vlm_command", metavar="VLM_COMMAND", required=True)
    chat = sub.add_parser("chat", help="answer a prompt about a video or an image")
    chat.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a VLM run's output_dir or a checkpoint"
    )
    media = chat.add_mutually_exclusive_group()
    media.add_argument("--video", metavar="MP4")
    media.add_argument("--image", metavar="FILE")
    chat.add_argument("--prompt", required=True, help="the question")
    chat.add_argument("--frames", type=int, default=8, help="video frames sampled uniformly (default 8)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--tokenizer", metavar="SPEC", help="default: the run's data.tokenizer")
    chat.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    chat.add_argument(
        "--sp",
        type=int,
        default=1,
        help="prefill and decode sequence-parallel over N processes, the KV cache sharded "
        "(launch with torchrun --nproc-per-node N -m cupola vlm chat ...)",
    )
    chat.add_argument("--sp-ulysses", type=int, default=-1, help="Ulysses part of --sp (default: all of it)")
    chat.set_defaults(handler=_chat)


def _chat(args: argparse.Namespace) -> int:
    import torch

    from cupola.collections.vlm.generate import chat, load_vlm, media_frames, media_pixels
    from cupola.toolkit.data.tokenizer import load_tokenizer
    from cupola.toolkit.parallel.sequence.multimodal import media_share

    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        sp = None
        if args.sp > 1:
            from cupola.toolkit.parallel.sequence.launch import launched_sequence_parallel

            sp, device = launched_sequence_parallel(args.sp, args.sp_ulysses, device, "vlm chat")
        model, run_config = load_vlm(args.checkpoint, device)
        if sp is not None:
            from cupola.collections.llm.models.gpt.parallelize import apply_sp

            apply_sp(model.llm, sp)
        tokenizer = load_tokenizer(args.tokenizer or run_config.get("data", {}).get("tokenizer"))
        pixels, marker, frames = None, "<video>", 0
        if args.video or args.image:
            kind = {"video": args.video, "image": args.image}
            frames = media_frames(**kind, num_frames=args.frames)
            part = None if sp is None else media_share(frames, sp.layout.size, sp.rank)
            pixels, marker = media_pixels(model.cfg, **kind, num_frames=args.frames, part=part)
        answer = chat(
            model,
            tokenizer,
            args.prompt,
            pixels,
            marker,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            sp=sp,
            frames=frames,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2
    if sp is None or sp.rank == 0:  # every rank has the same answer
        print(answer)
    return 0
