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
    chat.set_defaults(handler=_chat)


def _chat(args: argparse.Namespace) -> int:
    import torch

    from cupola.collections.vlm.generate import chat, load_vlm, media_pixels
    from cupola.toolkit.data.tokenizer import load_tokenizer

    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, run_config = load_vlm(args.checkpoint, device)
        tokenizer = load_tokenizer(args.tokenizer or run_config.get("data", {}).get("tokenizer"))
        pixels, marker = None, "<video>"
        if args.video or args.image:
            pixels, marker = media_pixels(
                model.cfg, video=args.video, image=args.image, num_frames=args.frames
            )
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
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2
    print(answer)
    return 0
