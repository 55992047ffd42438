"""``cupola eval``: perplexity on text files and MMLU-format multiple-choice accuracy."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task",
        nargs="?",
        choices=["niah"],
        help="niah: video needle-in-a-haystack on a VLM run (default: the LLM evaluations below)",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a cupola run's output_dir, a checkpoints/step_N folder, or a Hugging Face Llama folder",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="SPEC",
        help="'byte', a tokenizer.json or a folder holding one (default: the run's data.tokenizer, or "
        "the HF folder's tokenizer.json)",
    )
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    ppl = parser.add_argument_group("perplexity")
    ppl.add_argument("--perplexity", nargs="+", metavar="FILE", help=".txt/.jsonl files or folders")
    ppl.add_argument("--seq-len", type=int, help="window length (default: the model's, at most 2048)")
    ppl.add_argument("--stride", type=int, help="window step (default: --seq-len, non-overlapping)")
    ppl.add_argument("--text-key", default="text", help="the .jsonl field holding the text")
    mc = parser.add_argument_group("multiple choice (MMLU format)")
    mc.add_argument("--mmlu", metavar="DIR", help="<subject>_test.csv (+ _dev.csv) files, or test/ and dev/")
    mc.add_argument("--k-shot", type=int, default=0, help="dev examples before each question (MMLU: 5)")
    mc.add_argument("--subjects", nargs="+", metavar="SUBJECT", help="default: every subject in DIR")
    mc.add_argument("--max-questions", type=int, metavar="N", help="each subject's first N test questions")
    mc.add_argument(
        "--scoring",
        choices=("letter", "text"),
        default="letter",
        help="score the answer letter ' A' (default, as the original MMLU harness) or ' <choice text>'",
    )
    niah = parser.add_argument_group("video needle-in-a-haystack (cupola eval niah --model VLM_RUN)")
    niah.add_argument("--video", metavar="MP4", help="the haystack video (default: a generated one)")
    niah.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16], help="haystack frame counts")
    niah.add_argument(
        "--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]"
    )
    niah.add_argument("--needle", default="42", help="text drawn on the needle frame (default 42)")
    niah.add_argument("--question", default="What number is written in the video?")
    niah.add_argument("--answer", help="expected answer (default: the needle text)")
    niah.add_argument("--out-dir", metavar="DIR", help="niah.json + niah_heatmap.png (default: MODEL/niah)")
    niah.add_argument(
        "--sp",
        type=int,
        default=1,
        help="run sequence-parallel over N processes (launch with torchrun --nproc-per-node N -m cupola ...)",
    )
    niah.add_argument("--sp-ulysses", type=int, default=-1, help="Ulysses part of --sp (default: all of it)")
    parser.add_argument("--out", metavar="JSON", help="write the results (and per-question records) here")
    parser.set_defaults(handler=_eval)


def _niah(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from cupola.collections.vlm.generate import load_vlm
    from cupola.collections.vlm.niah import NIAHConfig, run_niah, save_results
    from cupola.toolkit.data.tokenizer import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sp = None
    if args.sp > 1:
        from cupola.toolkit.parallel.sequence.launch import launched_sequence_parallel

        sp, device = launched_sequence_parallel(args.sp, args.sp_ulysses, device, "eval niah --model RUN")
    model, run_config = load_vlm(args.model, device)
    if sp is not None:
        from cupola.collections.llm.models.gpt.parallelize import apply_sp

        apply_sp(model.llm, sp)
    tokenizer = load_tokenizer(args.tokenizer or run_config.get("data", {}).get("tokenizer"))
    cfg = NIAHConfig(
        frame_counts=args.frames,
        depths=args.depths,
        needle=args.needle,
        question=args.question,
        answer=args.answer,
    )
    haystack = None
    if args.video:
        from cupola.toolkit.data.video import read_frames

        haystack = read_frames(
            args.video, num_frames=max(args.frames), size=(model.cfg.vision.image_size,) * 2
        )
    with torch.no_grad():
        results = run_niah(model, tokenizer, cfg, haystack, progress=sp is None or sp.rank == 0, sp=sp)
    if sp is not None and torch.distributed.get_rank() != 0:
        return 0  # every rank has the same results; rank 0 writes them
    paths = save_results(results, args.out_dir or Path(args.model) / "niah")
    print(f"cupola: NIAH exact match {100 * results['accuracy']:.1f}% over {len(results['cells'])} cells")
    print(f"cupola: wrote {paths['json']} and {paths['heatmap']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.task == "niah":
        try:
            return _niah(args)
        except ValueError as e:
            print(f"cupola: error: {e}", file=sys.stderr)
            return 2
    if not args.perplexity and not args.mmlu:
        print(
            "cupola eval: error: nothing to evaluate; give --perplexity FILES and/or --mmlu DIR",
            file=sys.stderr,
        )
        return 2
    try:
        results = evaluate(args)
    except ValueError as e:  # bad input files and settings (ConfigError is a ValueError)
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2
    print_results(results)
    if args.out:
        import json
        from pathlib import Path

        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"cupola: wrote {out}")
    return 0


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata
    import time

    import torch

    from cupola.collections.llm.eval import load_eval_model, multiple_choice, perplexity
    from cupola.toolkit.training.fit import environment

    model, tokenizer, info = load_eval_model(args.model, args.tokenizer)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    results: dict[str, Any] = {
        **info,
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"cupola": importlib.metadata.version("cupola"), **environment()},
    }
    start = time.perf_counter()
    if args.perplexity:
        results["perplexity"] = perplexity(
            model,
            tokenizer,
            args.perplexity,
            seq_len=args.seq_len,
            stride=args.stride,
            batch_size=args.batch_size,
            text_key=args.text_key,
        )
    if args.mmlu:
        results["mmlu"] = {
            "data_dir": str(args.mmlu),
            **multiple_choice(
                model,
                tokenizer,
                args.mmlu,
                k_shot=args.k_shot,
                subjects=args.subjects,
                max_questions=args.max_questions,
                scoring=args.scoring,
                batch_size=args.batch_size,
            ),
        }
    results["seconds"] = round(time.perf_counter() - start, 3)
    return results


def print_results(results: dict[str, Any]) -> None:
    print(
        f"model {results['model']} ({results['kind']}, {results['parameters']:,} parameters), "
        f"tokenizer {results['tokenizer']}"
    )
    if "perplexity" in results:
        p = results["perplexity"]
        print(
            f"\nperplexity  {p['perplexity']:.4f}   nll {p['nll']:.4f} nats/token   "
            f"{p['bits_per_byte']:.4f} bits/byte\n  {p['tokens']:,} tokens in {p['documents']:,} document(s) "
            f"from {len(p['files'])} file(s), windows of {p['seq_len']} with stride {p['stride']}"
        )
    if "mmlu" in results:
        m = results["mmlu"]
        rows = [(name, s["questions"], f"{s['accuracy']:.4f}") for name, s in m["subjects"].items()]
        rows += [
            ("overall (micro)", m["questions"], f"{m['accuracy_micro']:.4f}"),
            ("overall (macro)", "", f"{m['accuracy_macro']:.4f}"),
        ]
        width = max(len("subject"), *(len(r[0]) for r in rows))
        print(f"\nMMLU: {m['k_shot']}-shot, {m['scoring']} scoring, {m['data_dir']}")
        print(f"{'subject':<{width}}  {'n':>5}  accuracy")
        for i, (name, n, acc) in enumerate(rows):
            if i == len(rows) - 2:
                print("-" * (width + 17))
            print(f"{name:<{width}}  {n!s:>5}  {acc:>8}")
        if m["truncated"]:
            print(
                f"{m['truncated']} of {m['questions']} prompts were shortened to fit {m['max_seq_len']} tokens "
                f"(few-shot examples dropped; {m['question_cut']} cut into the question itself)"
            )
    print(f"\n{results['seconds']:.1f} s")
