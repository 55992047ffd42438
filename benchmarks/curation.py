"""Curation throughput (issue 8): the pipeline's stages against the decode-only floor, in one run.

On a generated corpus (``write_curation_corpus``: hard shot cuts, degraded shots, a duplicate scene;
no broken files here, they cost nothing to reject), each measurement runs over the same source videos
as Ray Data tasks (one task per video, one CPU each) on a local Ray instance of ``--cpus`` CPUs:

- ``decode floor``: decord reads every frame of every video (one decoder thread), nothing else;
- ``PySceneDetect``: ``scenedetect.detect`` with its ContentDetector at its defaults, nothing else;
- ``split+transcode+filter``: cupola's per-video stage (decode once, shot detection, h264 transcode
  of every clip, motion/blur/exposure scores, the dedup embedding) with the default ``curate.yaml``;
- ``full pipeline``: ``curate()`` into a fresh output folder: the above, captions, k-means dedup,
  sharding and the manifest.

Reported per CPU core (the rate divided by ``--cpus``): source minutes/s, frames/s and clips/s, and
each row's share of the decode floor (the target for split+transcode+filter is >= 50%).

    python benchmarks/curation.py            # the recorded numbers (2 CPUs, 360x640 @ 24 fps)
    python benchmarks/curation.py --quick    # a smoke run: a few small videos

Writes ``benchmarks/results/curation_<size>_<cpus>cpu[_quick].json`` and a bar chart PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cupola.collections.world.curation import curate, load_config, write_curation_corpus
from cupola.collections.world.curation.process import curate_video
from cupola.collections.world.curation.sources import find_sources

RESULTS = Path(__file__).parent / "results"


def _decode_floor(row: dict) -> dict:
    import decord

    reader = decord.VideoReader(row["path"], num_threads=1)
    frames = 0
    for _ in range(len(reader)):
        reader.next()
        frames += 1
    return {"frames": frames, "clips": 0}


def _scenedetect(row: dict) -> dict:
    import scenedetect

    scenes = scenedetect.detect(row["path"], scenedetect.ContentDetector())
    return {"frames": 0, "clips": len(scenes)}


def _split_transcode_filter(row: dict, cfg, work: str) -> dict:
    from cupola.collections.world.curation.sources import Source

    source = Source(row["key"], row["name"], row["path"])
    result = curate_video(source, Path(work) / source.key, cfg)
    if result["video"]["status"] != "ok":
        raise RuntimeError(f"{row['name']}: {result['video']['error']}")
    return {"frames": result["video"]["frames"], "clips": result["video"]["clips"]}


def _ray_map(fn, rows: list[dict], **fn_kwargs) -> tuple[float, list[dict]]:
    """Wall seconds of ``fn`` over ``rows`` as Ray Data tasks (one per row, one CPU each)."""
    import ray.data

    start = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    out = list(ds.map(fn, fn_kwargs=fn_kwargs, num_cpus=1).iter_rows())
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 6 small videos")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--shots", type=int, default=4, help="shots per video")
    p.add_argument("--size", default="360x640", help="HEIGHTxWIDTH of the source videos")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1), help="local Ray CPUs")
    p.add_argument("--repeats", type=int, default=2, help="runs per row; the fastest is reported")
    p.add_argument("--corpus", help="a folder to write (or reuse) the corpus in; default: a temporary one")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    if args.quick:
        args.videos, args.shots, args.size, args.fps, args.repeats = 6, 3, "64x96", 8.0, 1
    height, width = (int(v) for v in args.size.lower().split("x"))

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="cupola_curation_bench_"))
    corpus_dir = Path(args.corpus) if args.corpus else tmp / "corpus"
    try:
        if not (corpus_dir / "shots").is_dir():
            t0 = time.perf_counter()
            print(
                f"[bench] writing {args.videos} videos of {args.shots} shots at {args.size} ...", flush=True
            )
            write_curation_corpus(
                corpus_dir,
                num_videos=args.videos,
                shots_per_video=args.shots,
                shot_seconds=(3.0, 8.0),
                sizes=((height, width),),
                fps=args.fps,
                broken=False,
            )
            print(f"[bench] corpus written in {time.perf_counter() - t0:.0f} s", flush=True)
        sources, _ = find_sources(corpus_dir)
        rows = [{"key": s.key, "name": s.name, "path": s.path} for s in sources]
        cfg = load_config()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the table, not Ray Data's plans

        measured: dict[str, dict] = {}

        def record(name: str, seconds: float, frames: int, clips: int) -> None:
            best = measured.get(name)
            if best is None or seconds < best["seconds"]:
                measured[name] = {"seconds": seconds, "frames": frames, "clips": clips}
            print(f"[bench] {name}: {seconds:.2f} s", flush=True)

        warm = rows[: args.cpus]  # every worker imports what each row needs before anything is timed
        _ray_map(_decode_floor, warm)
        _ray_map(_scenedetect, warm)
        _ray_map(_split_transcode_filter, warm, cfg=cfg, work=str(tmp / "warm"))
        for _ in range(args.repeats):
            seconds, out = _ray_map(_decode_floor, rows)
            record("decode floor (decord)", seconds, sum(r["frames"] for r in out), 0)
            seconds, out = _ray_map(_scenedetect, rows)
            record("PySceneDetect (content)", seconds, 0, sum(r["clips"] for r in out))
            work = tmp / "stf"
            shutil.rmtree(work, ignore_errors=True)
            seconds, out = _ray_map(_split_transcode_filter, rows, cfg=cfg, work=str(work))
            record(
                "split+transcode+filter", seconds, sum(r["frames"] for r in out), sum(r["clips"] for r in out)
            )
            full = tmp / "full"
            shutil.rmtree(full, ignore_errors=True)
            start = time.perf_counter()
            result = curate(corpus_dir, full, cfg, say=lambda _: None)
            record("full pipeline", time.perf_counter() - start, 0, result.summary["clips"])
        summary = result.summary
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    source_min = summary["source_minutes"]
    frames = measured["decode floor (decord)"]["frames"]
    floor = measured["decode floor (decord)"]["seconds"]
    rows_out = {}
    for name, m in measured.items():
        rows_out[name] = {
            "seconds": round(m["seconds"], 3),
            "source_min_per_s_per_core": source_min / m["seconds"] / args.cpus,
            "frames_per_s_per_core": frames / m["seconds"] / args.cpus,
            "clips_per_s_per_core": (summary["clips"] / m["seconds"] / args.cpus),
            "share_of_decode_floor": floor / m["seconds"],
        }
    print(
        f"\n{len(sources)} videos, {source_min:.2f} source minutes, {frames} frames at {args.size} "
        f"{args.fps:g} fps -> {summary['clips']} clips ({summary['clips_kept']} kept); "
        f"{args.cpus} CPU cores, best of {args.repeats}"
    )
    print("| stage | s | source min/s per core | frames/s per core | clips/s per core | of decode floor |")
    print("|---|---|---|---|---|---|")
    for name, r in rows_out.items():
        print(
            f"| {name} | {r['seconds']:.2f} | {r['source_min_per_s_per_core']:.3f} | "
            f"{r['frames_per_s_per_core']:.0f} | {r['clips_per_s_per_core']:.2f} | "
            f"{100 * r['share_of_decode_floor']:.0f}% |"
        )

    import av
    import decord
    import scenedetect

    out = Path(args.results) / f"curation_{args.size}_{args.cpus}cpu{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record_json = {
        "device": platform.processor() or platform.machine(),
        "cpus": args.cpus,
        "python": platform.python_version(),
        "versions": {
            "ray": ray.__version__,
            "scenedetect": scenedetect.__version__,
            "av": av.__version__,
            "ffmpeg": ".".join(map(str, av.library_versions["libavcodec"])),
            "decord": decord.__version__,
        },
        "corpus": {
            "videos": len(sources),
            "shots_per_video": args.shots,
            "size": args.size,
            "fps": args.fps,
            "source_minutes": source_min,
            "frames": frames,
            "clips": summary["clips"],
            "clips_kept": summary["clips_kept"],
            "dropped": summary["clips_dropped"],
        },
        "config": "curate.yaml defaults",
        "repeats": args.repeats,
        "stages": rows_out,
    }
    out.write_text(json.dumps(record_json, indent=2) + "\n")
    _plot(rows_out, out.with_suffix(".png"), args.cpus)
    print(f"wrote {out} (+ .png)")


def _plot(rows: dict[str, dict], path: Path, cpus: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    values = [rows[n]["source_min_per_s_per_core"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(
        names[::-1], values[::-1], color=["#888", "#4c72b0", "#55a868", "#c44e52"][: len(names)][::-1]
    )
    for bar, name in zip(bars, names[::-1], strict=True):
        share = rows[name]["share_of_decode_floor"]
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {100 * share:.0f}%", va="center")
    ax.set_xlabel(f"source minutes / s per CPU core ({cpus} cores); label: share of the decode floor")
    ax.set_title("cupola curate throughput")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
