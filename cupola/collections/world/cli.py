"""``cupola world``: tokenize a video to a latent / token file, decode it back, evaluate a tokenizer.

cupola world tokenize --checkpoint RUN_OR_DIFFUSERS_DIR in.mp4 out.npz [--chunk-frames 33 --tile 512]
cupola world detokenize --checkpoint RUN_OR_DIFFUSERS_DIR out.npz back.mp4
cupola world tokenizer-eval --checkpoint RUN --videos DIR [--frames 17 --size 256] [--out DIR]
cupola world generate --checkpoint RUN --prompt "..." [--video first.mp4] [--actions a.npy] --out out.mp4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint",
            required=True,
            metavar="PATH",
            help="a cupola tokenizer run / checkpoint, or a diffusers AutoencoderKLCosmos folder",
        )
        p.add_argument("--flavor", help="check the checkpoint is this flavor (e.g. cv4x8x8)")
        p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
        p.add_argument("--chunk-frames", type=int, metavar="N", help="encode N frames at a time (exact)")
        p.add_argument(
            "--chunk-latents", type=int, metavar="N", help="decode N latent frames at a time (exact)"
        )
        p.add_argument("--tile", type=int, metavar="PX", help="spatial tiles of PX pixels (blended)")
        p.add_argument("--tile-overlap", type=int, default=0, metavar="PX")

    tok = sub.add_parser("tokenize", help="encode a video (or image) to a .npz latent / token file")
    common(tok)
    tok.add_argument("input", help="an mp4 (or any video decord reads) or an image")
    tok.add_argument("output", help="the .npz to write")
    tok.add_argument("--max-frames", type=int, help="only the first N frames")
    tok.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize frames to H x W first")
    tok.set_defaults(handler=_tokenize)

    detok = sub.add_parser("detokenize", help="decode a .npz written by tokenize back to an mp4")
    common(detok)
    detok.add_argument("input", help="the .npz")
    detok.add_argument("output", help="the .mp4 to write")
    detok.set_defaults(handler=_detokenize)

    ev = sub.add_parser(
        "tokenizer-eval", help="PSNR / SSIM (and rFVD) of reconstructions of a folder of videos"
    )
    common(ev)
    ev.add_argument("--videos", required=True, help="a folder of videos, a video, a .txt list or .tar shards")
    ev.add_argument("--frames", type=int, default=17, help="clip length (1 + t*k; default 17)")
    ev.add_argument(
        "--size", type=int, default=256, help="clips resized and centre-cropped to this (default 256)"
    )
    ev.add_argument("--max-videos", type=int, help="only the first N videos")
    ev.add_argument("--i3d", metavar="FILE", help="a local TorchScript I3D: adds rFVD (see the world README)")
    ev.add_argument(
        "--out", metavar="DIR", help="results.json, side_by_side.png/.mp4 (default: CHECKPOINT/eval)"
    )
    ev.set_defaults(handler=_evaluate)

    gen = sub.add_parser("generate", help="generate a video with a diffusion world model (MP4 + GIF preview)")
    gen.add_argument("--checkpoint", required=True, metavar="RUN", help="a cupola diffusion world-model run")
    gen.add_argument("--prompt", default="", help="what to generate (checked by the prompt guardrail)")
    gen.add_argument("--video", metavar="FILE", help="first frames to continue (Video2World models)")
    gen.add_argument(
        "--actions", metavar="NPY", help="actions [frames - 1, action_dim] (action-conditioned models)"
    )
    gen.add_argument("--frames", type=int, default=9, help="frames to generate, 1 + t*k (default 9)")
    gen.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="frame size (default: the --video's, else 32 32)",
    )
    gen.add_argument(
        "--fps",
        type=float,
        help="frame rate of the clip for the model and of the output (default: the rate the model was "
        "trained at, else 8)",
    )
    gen.add_argument("--steps", type=int, default=35, help="sampling steps (default 35)")
    gen.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    gen.add_argument("--sampler", choices=("multistep", "heun"), default="multistep")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chunk-latents", type=int, metavar="N", help="decode N latent frames at a time")
    gen.add_argument("--tokenizer", metavar="PATH", help="override the tokenizer the run was trained with")
    gen.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    gen.add_argument("--no-guardrails", action="store_true", help="skip the prompt check and face blurring")
    gen.add_argument("--out", required=True, help="the .mp4 to write (a .gif preview goes beside it)")
    gen.set_defaults(handler=_generate)


def _model(args: argparse.Namespace):
    from cupola.collections.world.tokenizers.checkpoint import load_tokenizer
    from cupola.collections.world.tokenizers.model import tokenizer_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_tokenizer(args.checkpoint, device)
    if args.flavor:
        want = tokenizer_config(args.flavor)
        got = model.cfg
        if (want.temporal_compression, want.spatial_compression, want.discrete) != (
            got.temporal_compression,
            got.spatial_compression,
            got.discrete,
        ):
            raise ValueError(
                f"--flavor {args.flavor}: the checkpoint is a {'DV' if got.discrete else 'CV'}"
                f"{got.temporal_compression}x{got.spatial_compression}x{got.spatial_compression} tokenizer"
            )
    return model.to(getattr(torch, args.dtype))


def _to_model_input(frames_uint8_F_H_W_3: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(frames_uint8_F_H_W_3)).permute(3, 0, 1, 2)[None]
    return x.to(dtype) / 127.5 - 1.0


def _to_uint8(x_B_3_T_H_W: torch.Tensor) -> np.ndarray:
    frames = ((x_B_3_T_H_W[0].float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def _read(path: str, max_frames: int | None, size: tuple[int, int] | None) -> tuple[np.ndarray, float]:
    from cupola.toolkit.data.video import probe_video, read_frames_at, read_image

    if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        return read_image(path, size=size)[None], 0.0
    info = probe_video(path)
    n = info.frames if max_frames is None else min(max_frames, info.frames)
    return read_frames_at(path, range(n), size=size), info.fps


def _fit(frames: np.ndarray, t: int, s: int, image_only: bool) -> tuple[np.ndarray, dict[str, int]]:
    """Frames padded to ``1 + t k`` (the last frame repeated) and to multiples of ``s`` (edge pixels
    repeated); what was added is recorded so decoding can cut it off."""
    F, H, W = frames.shape[:3]
    pad_t = 0 if image_only else -(F - 1) % t
    pad_h, pad_w = -H % s, -W % s
    if pad_t or pad_h or pad_w:
        frames = np.pad(frames, ((0, pad_t), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames, {"frames": F, "height": H, "width": W}


def _tokenize(args: argparse.Namespace) -> int:
    from cupola.collections.world.tokenizers.chunked import encode_video

    try:
        model = _model(args)
        cfg = model.cfg
        frames, fps = _read(args.input, args.max_frames, tuple(args.size) if args.size else None)
        padded, original = _fit(frames, cfg.temporal_compression, cfg.spatial_compression, cfg.image_only)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        clips = [padded[i : i + 1] for i in range(len(padded))] if cfg.image_only else [padded]
        outs = []
        for clip in clips:
            x = _to_model_input(clip, dtype).to(device)
            outs.append(
                encode_video(
                    model,
                    x,
                    chunk_frames=args.chunk_frames,
                    tile=args.tile,
                    tile_overlap=args.tile_overlap,
                    progress=_progress("encode"),
                )
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2
    meta = {"config": _config_json(cfg), "fps": fps, "source": str(args.input), **original}
    arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta))}
    if cfg.discrete:
        arrays["indices"] = torch.cat([o[1] for o in outs], 0).to(torch.int32).cpu().numpy()
    else:
        arrays["latent"] = torch.cat(outs, 0).float().cpu().numpy()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    what = arrays.get("indices", arrays.get("latent"))
    print(
        f"cupola: {original['frames']} frames {original['height']}x{original['width']} -> {list(what.shape)} -> {out}"
    )
    return 0


def _config_json(cfg) -> dict[str, Any]:
    from cupola.toolkit.config import to_dict

    return {k: v for k, v in to_dict(cfg).items() if k != "extra"}


def _progress(what: str):
    def show(done: int, total: int) -> None:
        if total > 1:
            print(f"[cupola] {what} {done}/{total}", file=sys.stderr, flush=True)

    return show


def _detokenize(args: argparse.Namespace) -> int:
    from cupola.collections.world.tokenizers.chunked import decode_video
    from cupola.toolkit.data.video import write_video

    try:
        model = _model(args)
        data = np.load(args.input)
        meta = json.loads(str(data["meta"]))
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        if "indices" in data:
            if model.fsq is None:
                raise ValueError(
                    f"{args.input} holds discrete tokens; --checkpoint is a continuous tokenizer"
                )
            z = model.fsq.indices_to_codes(torch.from_numpy(data["indices"]).long().to(device), dtype)
        else:
            if model.fsq is not None:
                raise ValueError(
                    f"{args.input} holds a continuous latent; --checkpoint is a discrete tokenizer"
                )
            z = torch.from_numpy(data["latent"]).to(device, dtype)
        if model.cfg.image_only:
            videos = [
                decode_video(model, z[i : i + 1], tile=args.tile, tile_overlap=args.tile_overlap)
                for i in range(len(z))
            ]
            x = torch.cat(videos, dim=2)
        else:
            x = decode_video(
                model,
                z,
                chunk_latents=args.chunk_latents,
                tile=args.tile,
                tile_overlap=args.tile_overlap,
                progress=_progress("decode"),
            )
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2
    frames = _to_uint8(x)[: meta["frames"], : meta["height"], : meta["width"]]
    out = Path(args.output)
    if frames.shape[0] == 1 and out.suffix.lower() in (".png", ".jpg"):
        from PIL import Image

        Image.fromarray(frames[0]).save(out)
    else:
        write_video(out, _even(frames), fps=meta.get("fps") or 8.0)
    print(f"cupola: wrote {out} ({frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]})")
    return 0


def _even(frames: np.ndarray) -> np.ndarray:
    """mp4 (4:2:0) needs even sizes: repeat the last row/column if needed."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else frames


def _evaluate(args: argparse.Namespace) -> int:
    from cupola.collections.world.tokenizers.evaluate import evaluate_tokenizer, save_evaluation

    try:
        model = _model(args)
        results = evaluate_tokenizer(
            model,
            args.videos,
            num_frames=args.frames,
            size=args.size,
            max_videos=args.max_videos,
            chunk_frames=args.chunk_frames,
            tile=args.tile,
            tile_overlap=args.tile_overlap,
            i3d=args.i3d,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    paths = save_evaluation(results, out)
    rfvd = "" if results["rfvd"] is None else f", rFVD {results['rfvd']:.2f}"
    print(
        f"cupola: {results['videos']} videos: PSNR {results['psnr']:.2f} dB, SSIM {results['ssim']:.4f}{rfvd} "
        f"-> {paths['json']}"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cupola.collections.world.diffusion.generate import load_wfm, write_preview
    from cupola.collections.world.guardrails import Guardrails, PromptRefused
    from cupola.toolkit.data.video import write_video

    guard = Guardrails.disabled() if args.no_guardrails else Guardrails()
    try:
        guard.check_prompt(args.prompt)
    except PromptRefused as e:
        print(f"cupola: prompt refused: {e}", file=sys.stderr)
        return 3
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        world = load_wfm(args.checkpoint, device, tokenizer=args.tokenizer)
        first = None
        size = tuple(args.size) if args.size else None
        if args.video:
            first, _ = _read(args.video, None, size)
            size = size or first.shape[1:3]
        actions = np.load(args.actions).astype(np.float32) if args.actions else None
        from tqdm import tqdm

        with tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr) as bar:
            video = world.generate(
                args.prompt,
                frames=args.frames,
                size=tuple(size or (32, 32)),
                first_frames=first,
                actions=actions,
                fps=args.fps,
                steps=args.steps,
                guidance=args.guidance,
                sampler=args.sampler,
                seed=args.seed,
                chunk_latents=args.chunk_latents,
                progress=lambda done, total: bar.update(done - bar.n),
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2
    video, report = guard.postprocess(video)
    fps = args.fps or world.fps or 8.0
    out = write_video(args.out, video, fps)
    gif = write_preview(Path(args.out).with_suffix(".gif"), video, fps)
    faces = report.get("boxes_blurred", 0)
    print(
        f"cupola: {len(video)} frames {video.shape[1]}x{video.shape[2]} -> {out} (+ {gif.name}); faces blurred: {faces}"
    )
    return 0
