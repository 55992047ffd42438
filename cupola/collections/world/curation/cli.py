"""``cupola curate``: curate a folder (or list) of videos into webdataset shards and a manifest.

    cupola curate --input DIR|LIST --output DIR [--config curate.yaml] [--ray-address ADDR]
                  [--num-cpus N] [--retry-failed] [key=value ...]

Re-running with the same ``--output`` resumes: finished videos are skipped. Exit status 0 when at
least one video was curated (failed inputs are in the manifest and the summary), 1 when none
could be, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, metavar="DIR|LIST", help="a folder of videos, or a .txt list of video paths"
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="shards, manifest.parquet, summary.json (and work/)"
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="the pipeline's settings (default: the defaults; cupola/collections/world/curation/curate.yaml "
        "spells them out)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join a running Ray cluster ('auto', 'HOST:6379', 'ray://HOST:10001'); default: a local Ray "
        "instance. Inputs and --output must be paths every node sees",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        metavar="N",
        help="CPUs of the local Ray instance (default: config num_cpus, else all)",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="curate again the videos an earlier run into --output recorded as failed (default: keep them)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. split.threshold=30 filter.min_motion=null transcode.short_side=360",
    )
    parser.set_defaults(handler=_curate, accepts_overrides=True)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _curate(args: argparse.Namespace) -> int:
    from cupola.collections.world.curation.config import load_config
    from cupola.collections.world.curation.pipeline import curate

    overrides = list(args.overrides)
    if args.num_cpus is not None:
        overrides.append(f"num_cpus={args.num_cpus}")
    cfg = load_config(args.config, overrides)
    result = curate(
        args.input, args.output, cfg, ray_address=args.ray_address, retry_failed=args.retry_failed
    )
    s = result.summary
    print(
        f"cupola curate: {s['videos']} videos ({s['videos_ok']} ok, {s['videos_failed']} failed), "
        f"{s['source_minutes']:.2f} source minutes -> {s['clips_kept']} of {s['clips']} clips kept "
        f"({s['kept_minutes']:.2f} minutes) in {s['shards']} shards\n"
        f"  failed:  {_counts(s['failures'])}\n"
        f"  dropped: {_counts(s['clips_dropped'])}\n"
        f"  groups:  {_counts(s['groups'])}\n"
        f"  this run: {result.curated} videos curated, {result.resumed} already done, {result.seconds:.1f} s\n"
        f"  manifest: {result.manifest}\n"
        f"  shards:   {result.output / 'shards'}"
    )
    if s["videos_ok"] == 0:
        print("cupola curate: no video could be curated; the manifest says why for each", file=sys.stderr)
        return 1
    return 0
