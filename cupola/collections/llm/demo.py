"""``cupola demo``: online upcycling in miniature, on the embedded corpus, on a CPU.

1. pretrain the tiny dense GPT (``gpt_tiny_pretrain``);
2. from its final checkpoint, train the same number of tokens twice:
   (a) dense, continued (``gpt_tiny_finetune``), and
   (b) upcycled online into 8 experts, top-2 (``gpt_tiny_moe8x_online_upcycle``);
3. print both validation losses and draw both curves into one PNG.

Each stage is a NeMo-Run experiment launched like ``cupola run`` (torchrun, ``--devices``
processes), so its logs, checkpoints and curves are where that command puts them. Stages that
already finished are not run again (each run resumes from its own checkpoints).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cupola.toolkit.training.logs import loss_curves

STAGES = (
    ("dense", "gpt_tiny_pretrain"),
    ("dense_continued", "gpt_tiny_finetune"),
    ("moe_upcycled", "gpt_tiny_moe8x_online_upcycle"),
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where the three runs and the plot go")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the dense pretraining")
    parser.add_argument("--continue-steps", type=int, default=200, help="steps of each continuation")
    parser.add_argument("--devices", type=int, default=1, help="processes per run (gloo on CPU)")
    parser.set_defaults(handler=_demo)


def plot(runs: dict[str, Path], offset: int, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = {"dense": "tab:gray", "dense_continued": "tab:blue", "moe_upcycled": "tab:red"}
    for name, run_dir in runs.items():
        c = loss_curves(run_dir)
        shift = 0 if name == "dense" else offset
        if c["train"]:
            steps, losses = zip(*c["train"], strict=True)
            ax.plot([s + shift for s in steps], losses, color=colors[name], alpha=0.35, lw=0.8)
        if c["val"]:
            steps, losses = zip(*c["val"], strict=True)
            ax.plot(
                [s + shift for s in steps], losses, "o-", color=colors[name], label=f"{name} (validation)"
            )
    ax.axvline(offset, color="k", ls=":", lw=0.8)
    ax.set_xlabel("optimizer step (continuations start at the dense checkpoint)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tiny GPT: dense continued vs online-upcycled to 8 experts, top-2")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _demo(args: argparse.Namespace) -> int:
    from cupola.recipes.registry import get_recipe
    from cupola.toolkit.cli import apply_overrides
    from cupola.toolkit.executors import launch, local_executor

    root = Path(args.output_dir).expanduser().resolve()
    runs = {name: root / name for name, _ in STAGES}
    dense_ckpt = runs["dense"]
    for name, recipe_name in STAGES:
        steps = args.steps if name == "dense" else args.continue_steps
        overrides = [f"trainer.max_steps={steps}", f"trainer.devices={args.devices}"]
        if name != "dense":
            overrides.append(f"init_from={dense_ckpt}")
        recipe = apply_overrides(get_recipe(recipe_name)(output_dir=str(runs[name])), overrides)
        print(f"\n[cupola demo] stage {name}: {recipe_name} {' '.join(overrides)}", flush=True)
        code = launch(recipe, local_executor(args.devices), f"demo_{name}")
        if code:
            return code

    summaries = {name: json.loads((path / "summary.json").read_text()) for name, path in runs.items()}
    png = plot(runs, args.steps, root / "upcycling_comparison.png")
    print("\n[cupola demo] validation loss after the same tokens from the same dense checkpoint:")
    for name in ("dense_continued", "moe_upcycled"):
        s = summaries[name]
        print(
            f"  {name:<16} val {s['final_val_loss']:.4f}   train {s['final_loss']:.4f}   {s['tokens_per_sec_overall']:,.0f} tok/s"
        )
    print(f"  (dense checkpoint: val {summaries['dense']['final_val_loss']:.4f})")
    print(f"[cupola demo] curves: {png}")
    (root / "comparison.json").write_text(
        json.dumps(
            {
                name: {
                    k: s.get(k) for k in ("final_val_loss", "final_loss", "steps", "tokens_per_sec_overall")
                }
                for name, s in summaries.items()
            },
            indent=2,
        )
    )
    return 0
