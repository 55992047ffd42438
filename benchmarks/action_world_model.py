"""The action-conditioned world-model experiment (issue 7): does post-training on actions help?

On the generated push environment (an object on a textured floor pushed by known 2-D actions;
the future is decided by the first frame *and* the actions), train

1. a tiny continuous tokenizer on the environment's clips,
2. a tiny Video2World DiT without actions (the first frame given, the rest generated), and
3. the same DiT with action conditioning (each latent frame's actions embedded into its AdaLN),

for the same steps, then roll each out on held-out episodes from their first frame and score the
generated frames against the true ones (PSNR, dB; frames 1..T-1). Baselines in the same run:
copying the last given frame, the no-action model, and the action model fed another episode's
actions. The tokenizer's own reconstruction PSNR is the ceiling.

    python benchmarks/action_world_model.py                 # GPU: the recorded numbers
    python benchmarks/action_world_model.py --quick          # CPU smoke run (minutes, numbers meaningless)

Stages, to fit a time budget: ``--stage tokenizer`` trains and scores the tokenizer alone (is its
ceiling above copy-last-frame?); ``--stage world_model --model actions|no_actions`` trains one world
model (the two can train side by side on one GPU); ``--stage evaluate`` scores the trained runs.

Writes ``benchmarks/results/action_world_model_<device>.json`` with a PNG of rollouts
(rows: truth, action model, no-action model, copy) and an MP4 of the same, beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cupola.collections.world.data.environments import EnvironmentDataModule, PushEnvConfig, push_episodes
from cupola.collections.world.diffusion import api as wfm_api
from cupola.collections.world.diffusion.dit import dit_config
from cupola.collections.world.diffusion.generate import load_wfm
from cupola.collections.world.diffusion.model import WFMConfig
from cupola.collections.world.tokenizers import api as tok_api
from cupola.collections.world.tokenizers.checkpoint import load_tokenizer
from cupola.collections.world.tokenizers.model import TokenizerConfig, tokenizer_config
from cupola.toolkit.training.configs import OptimConfig, TrainerConfig

RESULTS = Path(__file__).parent / "results"
EXPERIMENT_ENV = ("action_scale=0.03", "max_speed=0.1", "radius=[0.12,0.2]")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(
        peak_signal_noise_ratio(torch.from_numpy(a).float(), torch.from_numpy(b).float(), data_range=255.0)
    )


def _data(args, batch: int) -> EnvironmentDataModule:
    return EnvironmentDataModule(
        kind="push",
        num_frames=args.frames,
        size=args.size,
        micro_batch_size=batch,
        train_episodes=args.episodes,
        val_episodes=8,
        seed=args.seed,
        num_workers=args.workers,
        env=args.env,
    )


def _trainer(out: Path, steps: int) -> TrainerConfig:
    return TrainerConfig(
        max_steps=steps,
        precision="32",
        output_dir=str(out),
        log_every_n_steps=max(1, steps // 20),
        val_check_interval=steps,
        limit_val_batches=2,
        checkpoint_every_n_steps=max(1, steps // 4),  # a run cut off by a time limit keeps its last quarter
    )


def _optim(lr: float, steps: int, decay: bool = True) -> OptimConfig:
    """AdamW after a short warm-up: cosine to lr/10 (``decay``) or held at ``lr``."""
    return OptimConfig(
        lr=lr, min_lr=lr / 10 if decay else lr, warmup_steps=max(1, steps // 50), weight_decay=0.0
    )


def experiment_tokenizer(args) -> TokenizerConfig:
    """The tiny tokenizer's structure at the experiment's compression and width: the world models can
    only be as good as its reconstructions, so it must resolve the floor and the object."""
    w = args.tokenizer_width
    return tokenizer_config(
        "tiny",
        spatial_compression=args.tokenizer_spatial,
        latent_channels=args.tokenizer_latent_channels,
        encoder_channels=(w, 2 * w, 2 * w, 2 * w),
        decoder_channels=(w, 2 * w, 2 * w, 2 * w),
    )


def _train_seconds(run: Path) -> float | None:
    """The run's training wall time; None for a run cut off before it wrote its summary."""
    summary = run / "summary.json"
    return json.loads(summary.read_text())["wall_seconds"] if summary.is_file() else None


def _trained_steps(run: Path) -> int | None:
    """The training step of the run's newest checkpoint (the one the evaluation loads)."""
    from cupola.collections.llm.lightning import run_checkpoint

    ckpt = run_checkpoint(str(run))
    return None if ckpt is None else int(ckpt.name.removeprefix("step_"))


def train_tokenizer(args, root: Path) -> None:
    tok_api.train(
        experiment_tokenizer(args),
        _data(args, args.tokenizer_batch),
        _trainer(root / "tokenizer", args.tokenizer_steps),
        _optim(2e-3, args.tokenizer_steps),
    )


def held_out(args) -> list:
    cfg = PushEnvConfig(size=args.size, frames=args.frames, **args.env)
    return push_episodes(args.eval_episodes, cfg, args.seed + 1, start=2**31 + 10**6)  # never trained on


def reconstruct(tok, video: np.ndarray, device: str) -> np.ndarray:
    """The tokenizer's reconstruction of ``[T, H, W, 3]`` uint8 frames, as uint8 frames."""
    with torch.no_grad():
        x = torch.from_numpy(video).to(device).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        rec = tok.decode(tok.encode_latent(x))
    return ((rec[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def score_tokenizer(args, path: Path, device: str) -> dict[str, float]:
    """Reconstruction PSNR (the world models' ceiling) and copy-last-frame PSNR on held-out episodes."""
    tok = load_tokenizer(path, device)
    scores: dict[str, list[float]] = {"tokenizer_ceiling": [], "copy_last_frame": []}
    for ep in held_out(args):
        truth = ep.video
        scores["tokenizer_ceiling"].append(psnr(reconstruct(tok, truth, device)[1:], truth[1:]))
        scores["copy_last_frame"].append(psnr(np.repeat(truth[:1], args.frames - 1, axis=0), truth[1:]))
    return {k: float(np.mean(v)) for k, v in scores.items()}


WORLD_MODELS = {
    "no_actions": {"video2world": True},
    "actions": {"video2world": True, "action_dim": 2, "actions_per_latent": 4},
}


def train_world_model(args, root: Path, tokenizer: Path, name: str) -> None:
    """The same tiny Video2World DiT, with or without action conditioning, the same steps and data."""
    channels = load_tokenizer(tokenizer).cfg.latent_channels
    wfm_api.train(
        WFMConfig(
            dit=dit_config("tiny", latent_channels=channels, **WORLD_MODELS[name]),
            cond_frames=1,
            cond_dropout=0.0,
        ),
        _data(args, args.batch),
        _trainer(root / name, args.wfm_steps),
        _optim(1e-3, args.wfm_steps, decay=args.wfm_lr == "cosine"),
        tokenizer=str(tokenizer),
    )


def evaluate(
    args, root: Path, device: str
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, list[np.ndarray]], dict[str, list[float]]]:
    """Per predictor on held-out episodes: the mean over episodes of the PSNR of frames 1..T-1, and per
    frame the PSNR of the episodes' mean squared error (finite where copying is exact in some episodes,
    as when an object starts at rest); and the first episodes' videos to show."""
    episodes = held_out(args)
    act = load_wfm(root / "actions", device)
    plain = load_wfm(root / "no_actions", device)
    tok = act.tokenizer
    scores: dict[str, list[float]] = {
        k: [] for k in ("actions", "no_actions", "shuffled_actions", "copy_last_frame", "tokenizer_ceiling")
    }
    per_frame_mse: dict[str, list[np.ndarray]] = {k: [] for k in scores}
    shown: dict[str, list[np.ndarray]] = {}
    for i, ep in enumerate(episodes):
        truth = ep.video
        first = truth[:1]
        common = {
            "prompt": ep.prompt,  # the models were trained on each episode's description
            "frames": args.frames,
            "size": (args.size, args.size),
            "first_frames": first,
            "steps": args.sample_steps,
            "seed": i,
        }
        outs = {
            "actions": act.generate(actions=ep.actions, **common),
            "shuffled_actions": act.generate(actions=episodes[(i + 1) % len(episodes)].actions, **common),
            "no_actions": plain.generate(**common),
            "copy_last_frame": np.repeat(first, args.frames, axis=0),
        }
        outs["tokenizer_ceiling"] = reconstruct(tok, truth, device)
        for k, v in outs.items():
            scores[k].append(psnr(v[1:], truth[1:]))
            err = (v[1:].astype(np.float64) - truth[1:].astype(np.float64)) ** 2
            per_frame_mse[k].append(err.reshape(len(err), -1).mean(1))
        if i < 4:
            for k in ("actions", "no_actions", "copy_last_frame"):
                shown.setdefault(k, []).append(outs[k])
            shown.setdefault("truth", []).append(truth)
        print(f"[eval] {i + 1}/{len(episodes)}", file=sys.stderr, flush=True)
    curves = {k: (10 * np.log10(255**2 / np.mean(v, axis=0))).tolist() for k, v in per_frame_mse.items()}
    return {k: float(np.mean(v)) for k, v in scores.items()}, curves, shown, scores


def gains(per_episode: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """The action model's paired gain (dB) over each baseline on the same episodes: the mean, a 95%
    bootstrap interval over episodes, and the share of episodes it wins."""
    from scipy.stats import bootstrap

    out = {}
    for base in ("copy_last_frame", "no_actions", "shuffled_actions"):
        diff = np.asarray(per_episode["actions"]) - np.asarray(per_episode[base])
        ci = bootstrap((diff,), np.mean, confidence_level=0.95, random_state=0).confidence_interval
        out[base] = {
            "mean_db": float(diff.mean()),
            "ci95_db": [float(ci.low), float(ci.high)],
            "episodes_won": float((diff > 0).mean()),
        }
    return out


def probe(args, device: str) -> dict:
    """Can the DiT learn to use actions at all, with the tokenizer out of the way? Its latents here
    are the frames themselves, every ``t``-th one 4x4-pooled (a stand-in tokenizer that loses
    nothing of the object's place), trained in plain PyTorch for ``--wfm-steps``; scored by the
    held-out denoising loss with true vs. shuffled actions (the gap is what the actions buy) and by
    rollouts against copy-last-frame, both in the pooled space."""
    from cupola.collections.world.diffusion.model import Conditioning, DiffusionWFM

    t, pool = 4, 4
    cfg = PushEnvConfig(size=args.size, frames=args.frames, **args.env)
    tok = None
    if args.probe_latents == "tokenizer":  # the trained tokenizer's latents, rollouts scored in pixels
        tok = load_tokenizer(
            Path(args.tokenizer) if args.tokenizer else Path(args.work) / "tokenizer", device
        )

    def latents(episodes) -> torch.Tensor:
        v = torch.from_numpy(np.stack([e.video for e in episodes])).float().div(127.5).sub(1)
        v = v.permute(0, 4, 1, 2, 3)  # [B, 3, T, H, W]
        if tok is not None:
            with torch.no_grad():
                return torch.cat([tok.encode_latent(c.to(device)) for c in v.split(256)])
        return torch.nn.functional.avg_pool3d(v[:, :, ::t], (1, pool, pool)).to(device)

    train, test = push_episodes(args.episodes, cfg, args.seed), held_out(args)
    x, xt = latents(train), latents(test)
    scale = 0.5 / float(x.std())
    x, xt = x * scale, xt * scale
    acts = torch.from_numpy(np.stack([e.actions for e in train])).float().to(device)
    acts_t = torch.from_numpy(np.stack([e.actions for e in test])).float().to(device)
    prompts, prompts_t = [e.prompt for e in train], [e.prompt for e in test]

    def cond(model, z, texts, a) -> Conditioning:
        context, mask = model.encode_text(texts)
        use = a if model.cfg.dit.action_dim else None
        return Conditioning(context=context, context_mask=mask, cond_latents=z, cond_frames=1, actions=use)

    def test_loss(model, a) -> float:
        g = torch.Generator(device).manual_seed(123)
        with torch.no_grad():
            return float(
                np.mean([float(model.training_loss(xt, cond(model, xt, prompts_t, a), g)) for _ in range(8)])
            )

    def pixels(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([tok.decode(c / scale).clamp(-1, 1) for c in z.split(64)])

    truth = torch.from_numpy(np.stack([e.video for e in test])).float().div(127.5).sub(1)
    truth = truth.permute(0, 4, 1, 2, 3).to(device)

    def psnr_pooled(a: torch.Tensor, b: torch.Tensor) -> float:
        """PSNR of frames 1.. of latents ``a`` against ``b``: pooled space, or pixels (tokenizer latents)."""
        if tok is not None:  # b: the held-out latents, scored against the true frames
            return float(10 * torch.log10(4 / (pixels(a)[:, :, 1:] - truth[:, :, 1:]).square().mean()))
        return float(10 * torch.log10(4 / (a[:, :, 1:] / scale - b[:, :, 1:] / scale).square().mean()))

    latent = "tokenizer" if tok is not None else f"every {t}th frame, {pool}x{pool}-pooled"
    out: dict = {"latent": latent, "steps": args.wfm_steps}
    for name, dit in WORLD_MODELS.items():
        if args.model and name != args.model:
            continue
        torch.manual_seed(args.seed)
        model = DiffusionWFM(
            WFMConfig(
                dit=dit_config("tiny", latent_channels=x.shape[1], **dit), cond_frames=1, cond_dropout=0.0
            )
        )
        model.init_weights()
        model.latent_scale.fill_(scale)
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        g = torch.Generator(device).manual_seed(args.seed)
        curve = []
        for step in range(1, args.wfm_steps + 1):
            i = torch.randint(0, len(x), (args.batch,), generator=g, device=device)
            loss = model.training_loss(x[i], cond(model, x[i], [prompts[j] for j in i.tolist()], acts[i]), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % max(1, args.wfm_steps // 10) == 0:
                row = {"step": step, "test_loss": test_loss(model, acts_t)}
                if dit.get("action_dim"):
                    row["test_loss_shuffled_actions"] = test_loss(model, acts_t.roll(1, 0))
                curve.append(row)
                print(f"[probe] {name} {row}", file=sys.stderr, flush=True)
        rollout = {}
        for label, a in (("true", acts_t), ("shuffled", acts_t.roll(1, 0))):
            g = torch.Generator(device).manual_seed(5)
            z = model.generate(
                tuple(xt.shape), cond(model, xt, prompts_t, a), steps=args.sample_steps, generator=g
            )
            rollout[label] = psnr_pooled(z, xt)
            if not dit.get("action_dim"):
                break
        out[name] = {"curve": curve, "rollout_psnr_db": rollout}
    if tok is None:
        out["copy_last_frame_psnr_db"] = psnr_pooled(xt[:, :, :1].expand_as(xt), xt)
    else:
        copy = truth[:, :, :1].expand_as(truth)[:, :, 1:]
        out["copy_last_frame_psnr_db"] = float(10 * torch.log10(4 / (copy - truth[:, :, 1:]).square().mean()))
        out["tokenizer_ceiling_psnr_db"] = psnr_pooled(xt, xt)
    return out


def plot_probe(record: dict, path: Path) -> None:
    """Held-out denoising loss over training: the action model with its true and with shuffled
    actions, and the no-action model (the gap between the first two is what the actions buy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, key, label in (
        ("actions", "test_loss", "action model, true actions"),
        ("actions", "test_loss_shuffled_actions", "action model, shuffled actions"),
        ("no_actions", "test_loss", "no-action model"),
    ):
        if name not in record:
            continue
        curve = record[name]["curve"]
        ax.plot([r["step"] for r in curve], [r[key] for r in curve], marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out EDM denoising loss")
    ax.set_title(f"push environment, {record['latent']} latents")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, v in curves.items():
        ax.plot(range(1, len(v) + 1), v, marker="o", markersize=3, label=k)
    ax.set_xlabel("frame (0 is given)")
    ax.set_ylabel("PSNR vs. the true frame (dB)")
    ax.set_title("held-out push episodes: predicted frames")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_media(shown: dict[str, list[np.ndarray]], path: Path, fps: float) -> None:
    from PIL import Image

    from cupola.toolkit.data.video import write_video

    rows = ("truth", "actions", "no_actions", "copy_last_frame")
    # PNG: per episode a block of 4 rows (truth, action model, no-action model, copy), frames left to right
    blocks = [
        np.concatenate([np.concatenate(list(shown[r][e]), axis=1) for r in rows], axis=0)
        for e in range(len(shown["truth"]))
    ]
    Image.fromarray(np.concatenate(blocks, axis=0)).save(path.with_suffix(".png"))
    # MP4: the four rows side by side, for the first episodes stacked
    video = np.concatenate(
        [np.concatenate([shown[r][e] for r in rows], axis=2) for e in range(len(shown["truth"]))], axis=1
    )
    write_video(path.with_suffix(".mp4"), video, fps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a CPU smoke run: few steps and episodes")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--episodes", type=int, default=4096)
    p.add_argument("--eval-episodes", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="the world models' batch")
    p.add_argument("--tokenizer-batch", type=int, default=16)
    p.add_argument("--tokenizer-steps", type=int, default=8000)
    p.add_argument("--tokenizer", help="a trained tokenizer run to use instead of training one")
    p.add_argument(
        "--stage",
        choices=("all", "tokenizer", "world_model", "evaluate", "probe"),
        default="all",
        help="all: train everything, then evaluate; tokenizer: train and score the tokenizer only; "
        "world_model: train --model only (runs can train side by side); evaluate: score trained runs; "
        "probe: both DiTs on pooled frames instead of a tokenizer's latents (does the model use actions?)",
    )
    p.add_argument(
        "--model",
        choices=tuple(WORLD_MODELS),
        help="the world model --stage world_model trains (--stage probe: only this one)",
    )
    p.add_argument("--tokenizer-spatial", type=int, default=4, help="spatial compression (tiny: 8)")
    p.add_argument("--tokenizer-latent-channels", type=int, default=16)
    p.add_argument("--tokenizer-width", type=int, default=32, help="first encoder/decoder width (tiny: 16)")
    p.add_argument(
        "--env",
        nargs="*",
        default=list(EXPERIMENT_ENV),
        metavar="FIELD=VALUE",
        help="PushEnvConfig fields to change (values are JSON; default: "
        + " ".join(EXPERIMENT_ENV)
        + ": bigger objects pushed harder than the defaults, so that 32 px frames show the pushes)",
    )
    p.add_argument("--wfm-steps", type=int, default=4500)
    p.add_argument(
        "--wfm-lr",
        choices=("cosine", "constant"),
        default="constant",
        help="the world models' LR after warm-up: held at 1e-3, or cosine to 1e-4 (short runs decayed early "
        "never learn to use the actions: benchmarks/README.md)",
    )
    p.add_argument(
        "--probe-latents",
        choices=("pooled", "tokenizer"),
        default="pooled",
        help="--stage probe: pooled frames, or the trained tokenizer's latents (--tokenizer or WORK/tokenizer)",
    )
    p.add_argument("--sample-steps", type=int, default=35)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/action_world_model", help="where the three runs go")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    args.env = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.env)}
    args.env = {k: tuple(v) if isinstance(v, list) else v for k, v in args.env.items()}
    if args.quick:
        args.size, args.frames, args.episodes, args.eval_episodes, args.batch = 32, 9, 32, 4, 4
        args.tokenizer_batch = 4
        args.tokenizer_steps, args.wfm_steps, args.sample_steps, args.workers = 10, 10, 4, 0
        args.tokenizer_width = 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(args.work)
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    slug = name.replace("NVIDIA ", "").replace(" ", "_").lower() + ("_quick" if args.quick else "")
    out = Path(args.results) / f"action_world_model_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.stage == "probe":
        record = {"device": name, "torch": torch.__version__, "args": vars(args), **probe(args, device)}
        tag = ("_tokenizer" if args.probe_latents == "tokenizer" else "") + (
            f"_{args.model}" if args.model else ""
        )
        out = out.with_name(out.stem + f"_probe{tag}.json")
        out.write_text(json.dumps(record, indent=2))
        plot_probe(record, out.with_suffix(".png"))
        print("| model | test loss (true actions) | (shuffled) | rollout PSNR true / shuffled (dB) |")
        print("|---|---|---|---|")
        for m in (m for m in WORLD_MODELS if m in record):
            last = record[m]["curve"][-1]
            shuffled = last.get("test_loss_shuffled_actions")
            r = record[m]["rollout_psnr_db"]
            print(
                f"| {m} | {last['test_loss']:.4f} | {'—' if shuffled is None else f'{shuffled:.4f}'} "
                f"| {r['true']:.2f} / {r.get('shuffled', float('nan')):.2f} |"
            )
        print(f"copy-last-frame: {record['copy_last_frame_psnr_db']:.2f} dB; wrote {out}")
        return
    tokenizer = Path(args.tokenizer) if args.tokenizer else root / "tokenizer"
    if args.stage in ("all", "tokenizer") and not args.tokenizer:
        train_tokenizer(args, root)
    if args.stage == "tokenizer":
        scores = score_tokenizer(args, tokenizer, device)
        out = out.with_name(out.stem + "_tokenizer.json")
        out.write_text(
            json.dumps(
                {"device": name, "torch": torch.__version__, "args": vars(args), "psnr_db": scores}, indent=2
            )
        )
        print(f"tokenizer {tokenizer}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()))
        return
    if args.stage == "world_model":
        if args.model is None:
            p.error("--stage world_model needs --model")
        train_world_model(args, root, tokenizer, args.model)
        return
    if args.stage == "all":
        for model in WORLD_MODELS:
            train_world_model(args, root, tokenizer, model)
    t0 = time.perf_counter()
    scores, curves, shown, per_episode = evaluate(args, root, device)
    times = {f"{run}_train_s": _train_seconds(root / run) for run in WORLD_MODELS}
    trained = {run: _trained_steps(root / run) for run in WORLD_MODELS} | {
        "tokenizer": _trained_steps(tokenizer)
    }
    times["eval_s"] = time.perf_counter() - t0
    print(f"\nPSNR (dB) of generated frames 1..{args.frames - 1} on {args.eval_episodes} held-out episodes")
    print(f"| {'predictor':<22} | PSNR (dB) |\n|{'-' * 24}|-----------|")
    for k, v in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"| {k:<22} | {v:9.2f} |")
    paired = gains(per_episode)
    for base, g in paired.items():
        low, high = g["ci95_db"]
        print(
            f"actions - {base}: {g['mean_db']:+.2f} dB (95% CI {low:+.2f} to {high:+.2f}), "
            f"wins {g['episodes_won']:.0%} of episodes"
        )
    record = {
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "tokenizer": dataclasses.asdict(load_tokenizer(tokenizer).cfg),
        "tokenizer_train_s": _train_seconds(tokenizer),
        "psnr_db": scores,
        "psnr_per_frame_db": curves,
        "gain_over_copy_db": scores["actions"] - scores["copy_last_frame"],
        "gain_over_no_actions_db": scores["actions"] - scores["no_actions"],
        "paired_gain": paired,  # per baseline: mean, 95% bootstrap CI over episodes, share won
        "psnr_db_per_episode": per_episode,
        "seconds": times,
        "steps_trained": trained,  # of the checkpoints scored (a run cut off by a time limit: fewer)
    }
    out.write_text(json.dumps(record, indent=2))
    write_media(shown, out, fps=8.0)
    plot_curves(curves, out.with_name(out.stem + "_psnr.png"))
    print(f"wrote {out} (+ .png, .mp4, _psnr.png)")


if __name__ == "__main__":
    main()
