"""Video tokenizer encode + decode speed and memory on one GPU, cupola vs diffusers' AutoencoderKLCosmos
(the Cosmos-1.0 tokenizer architecture, built at the same size from the same weights), in one run.

    python benchmarks/tokenizer.py [--flavors cv4x8x8 dv8x16x16] [--iters 3]

For each flavor and clip (17x512x512 one shot; 121x720x1280, chunked for cupola): bf16 weights,
random weights converted from a diffusers model of the flavor's size (so both compute the same
function; the maximum difference of the reconstructions is reported), ``torch.no_grad``, batch 1.
Timed with CUDA events (median of ``--iters`` after a warm-up): encode + decode, reported as ms per
input frame, and peak memory. diffusers has no discrete (FSQ) variant: for ``dv*`` flavors its row
is the continuous model of the same encoder/decoder size (the FSQ bottleneck costs nothing
measurable). A third table gives cupola's GPU peak memory of chunked encode + decode as the video grows
(33 / 65 / 121 / 241 frames at 720p, the video and its latent in host memory): flat is the goal. Writes ``benchmarks/results/tokenizer_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from cupola.collections.world.tokenizers import VideoTokenizer, tokenizer_config
from cupola.collections.world.tokenizers.chunked import decode_video, encode_video
from cupola.collections.world.tokenizers.convert import diffusers_config, from_diffusers_state_dict

RESULTS = Path(__file__).parent / "results"


def _time(fn, iters: int) -> tuple[float, float, object]:
    out = fn()  # warm-up (and the result)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, out


def _models(flavor: str):
    from diffusers import AutoencoderKLCosmos

    cfg = tokenizer_config(flavor)
    ref = AutoencoderKLCosmos(
        latent_channels=cfg.latent_channels,
        encoder_block_out_channels=cfg.encoder_channels,
        decode_block_out_channels=cfg.decoder_channels,
        attention_resolutions=cfg.attention_resolutions,
        resolution=cfg.resolution,
        num_layers=cfg.num_res_blocks,
        patch_size=cfg.patch_size,
        patch_type=cfg.patch_method,
        spatial_compression_ratio=cfg.spatial_compression,
        temporal_compression_ratio=cfg.temporal_compression,
    )
    continuous = from_diffusers_state_dict(diffusers_config(dict(ref.config)), ref.state_dict())
    if cfg.discrete:  # the same trunk with its FSQ bottleneck: the shared weights, fresh quant convs
        ours = VideoTokenizer(cfg)
        own = ours.state_dict()
        own.update({k: v for k, v in continuous.state_dict().items() if k in own and own[k].shape == v.shape})
        ours.load_state_dict(own)
    else:
        ours = continuous
    dev = dict(device="cuda", dtype=torch.bfloat16)
    return ours.to(**dev).eval(), ref.to(**dev).eval()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flavors", nargs="+", default=["cv4x8x8", "dv8x16x16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--chunk-frames", type=int, default=32)
    parser.add_argument(
        "--skip-diffusers-large", action="store_true", help="no diffusers row at 121x720x1280"
    )
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    rows, growth = [], []
    for flavor in args.flavors:
        bench_flavor(flavor, args, rows, growth)
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_flavor(flavor: str, args, rows: list, growth: list) -> None:
    ours, ref = _models(flavor)
    discrete = ours.cfg.discrete
    per_chunk = max(1, args.chunk_frames // ours.cfg.temporal_compression)

    def latent(z):
        return z[0] if discrete else z

    for T, H, W, chunked in ((17, 512, 512, False), (121, 720, 1280, True)):
        x = torch.rand(1, 3, T, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
        kw = {"chunk_frames": args.chunk_frames} if chunked else {}
        dk = {"chunk_latents": per_chunk} if chunked else {}
        row = {"flavor": flavor, "clip": [T, H, W], "chunked": chunked, "results": {}}
        s, m, y = _time(lambda: decode_video(ours, latent(encode_video(ours, x, **kw)), **dk), args.iters)  # noqa: B023
        row["results"]["cupola_chunked" if chunked else "cupola"] = {
            "ms_per_frame": 1e3 * s / T,
            "peak_gib": m,
        }
        torch.cuda.empty_cache()
        if chunked:  # and in one shot, as diffusers runs it
            s, m, y = _time(lambda: ours.decode(latent(ours.encode(x))), args.iters)  # noqa: B023
            row["results"]["cupola"] = {"ms_per_frame": 1e3 * s / T, "peak_gib": m}
            torch.cuda.empty_cache()
        if not (chunked and args.skip_diffusers_large):
            try:
                s, m, y_ref = _time(lambda: ref.decode(ref.encode(x).latent_dist.mode()).sample, args.iters)  # noqa: B023
                row["results"]["diffusers"] = {"ms_per_frame": 1e3 * s / T, "peak_gib": m}
                row["speedup_vs_diffusers"] = (
                    row["results"]["diffusers"]["ms_per_frame"] / row["results"]["cupola"]["ms_per_frame"]
                )
                if not discrete:
                    row["max_abs_diff_vs_diffusers"] = float((y.float() - y_ref.float()).abs().max())
            except torch.OutOfMemoryError:
                row["results"]["diffusers"] = {"error": "out of memory"}
            torch.cuda.empty_cache()
        rows.append(row)
        print(_format(row), flush=True)
        _write(rows, growth, args)
    for T in (33, 65, 121, 241):  # cupola's chunked memory as the video grows (video and latent on the host)
        x = torch.randint(0, 256, (1, 3, T, 720, 1280), dtype=torch.uint8).pin_memory()
        s, m, _ = _time(
            lambda x=x: decode_video(
                ours, latent(encode_video(ours, x, chunk_frames=args.chunk_frames)), chunk_latents=per_chunk
            ),
            1,
        )
        growth.append(
            {"flavor": flavor, "frames": T, "peak_gib": m, "seconds": s, "video_on": "host (uint8)"}
        )
        print(
            f"  {flavor} chunked {T}x720x1280 from/to host: GPU peak {m:.2f} GiB, {1e3 * s / T:.1f} ms/frame"
        )
        torch.cuda.empty_cache()
    _write(rows, growth, args)


def _format(row: dict) -> str:
    parts = [f"{row['flavor']} {'x'.join(map(str, row['clip']))}{' (chunked)' if row['chunked'] else ''}:"]
    for name, r in row["results"].items():
        if "error" in r:
            parts.append(f"{name} {r['error']}")
        else:
            parts.append(f"{name} {r['ms_per_frame']:.2f} ms/frame, peak {r['peak_gib']:.1f} GiB")
    if "speedup_vs_diffusers" in row:
        parts.append(f"speed-up {row['speedup_vs_diffusers']:.2f}x")
    return "  ".join(parts)


def _write(rows: list, growth: list, args) -> None:
    device = torch.cuda.get_device_name(0)
    slug = device.replace("NVIDIA ", "").replace(" ", "_").lower()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"tokenizer_{slug}.json"
    import diffusers

    meta = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "dtype": "bf16",
        "chunk_frames": args.chunk_frames,
        "timing": {"iters": args.iters, "statistic": "median", "what": "encode + decode, no_grad, batch 1"},
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows, "chunked_memory_growth": growth}, indent=2))


if __name__ == "__main__":
    main()
