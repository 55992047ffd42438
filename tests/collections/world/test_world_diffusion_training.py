"""The diffusion world-model recipes run end to end on CPU: tiny Text2World pretraining on generated
push-environment clips (loss falls, logged), post-training into an action-conditioned model (full and
LoRA) from that run, resume, and every diffusion recipe builds and validates."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cupola.recipes.registry import catalog
from cupola.recipes.testing import run_recipe_briefly
from cupola.toolkit.testing import spawn


def _train(rank: int, world: int, name: str, out: str, steps: int, overrides: tuple[str, ...] = ()) -> None:
    run_recipe_briefly(rank, world, "world", name, out, steps, overrides)


def _series(run: Path, key: str) -> list[float]:
    rows = csv.DictReader((run / "logs" / "metrics.csv").open())
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wfm_runs")
    out = {"tok": root / "tok", "t2w": root / "t2w"}
    spawn(_train, 1, "cosmos_tokenizer_tiny_train", str(out["tok"]), 4)
    data = ("data.train_episodes=32", "data.val_episodes=4", "data.micro_batch_size=4")
    spawn(_train, 1, "cosmos_dit_tiny_text2world", str(out["t2w"]), 40, (*data, f"tokenizer={out['tok']}"))
    return out


def test_tiny_text2world_trains_with_falling_loss(runs):
    loss = _series(runs["t2w"], "train/loss")
    assert len(loss) == 40
    assert np.mean(loss[-8:]) < 0.8 * np.mean(loss[:8])
    assert _series(runs["t2w"], "val/loss")


@pytest.mark.parametrize(
    "name",
    ["cosmos_dit_tiny_action_posttrain", "cosmos_dit_tiny_action_lora", "cosmos_dit_tiny_camera_posttrain"],
)
def test_posttraining_starts_from_the_text2world_run(runs, tmp_path, name):
    out = tmp_path / name
    overrides = (
        "data.train_episodes=16",
        "data.val_episodes=4",
        "data.micro_batch_size=4",
        f"tokenizer={runs['tok']}",
        f"init_from={runs['t2w']}",
        *([f"data.cache_dir={tmp_path / 'cache'}"] if "camera" in name else []),
    )
    spawn(_train, 1, name, str(out), 4, overrides)
    loss = _series(out, "train/loss")
    assert len(loss) == 4 and all(np.isfinite(loss))
    import torch

    from cupola.collections.llm.lightning import run_checkpoint
    from cupola.toolkit.training.checkpoint import load_model_weights

    weights = load_model_weights(run_checkpoint(str(out)))
    base = load_model_weights(run_checkpoint(str(runs["t2w"])))
    # the latent scale measured in pretraining carries over; the patch embedding gained the mask
    # channel (and 6 Plücker channels for cameras), x 1x2x2 patch
    assert torch.equal(weights["model.latent_scale"], base["model.latent_scale"])
    old, new = base["model.dit.patch_embed.weight"], weights["model.dit.patch_embed.weight"]
    assert new.shape[1] == old.shape[1] + 4 * (1 + (6 if "camera" in name else 0))
    assert any(k.endswith("lora_a") for k in weights) == name.endswith("lora")


def test_every_diffusion_recipe_builds_and_validates(tmp_path):
    import fiddle as fdl

    from cupola.toolkit.config import validate

    recipes = {k: v for k, v in catalog("world").items() if k.startswith(("cosmos_dit_", "cosmos_ar_"))}
    issue = {
        "cosmos_dit_7b_video2world_posttrain",
        "cosmos_dit_7b_action_posttrain",
        "cosmos_ar_4b_posttrain",
    }
    assert issue <= set(recipes)
    for name, factory in recipes.items():
        recipe = factory()
        recipe.trainer.output_dir = str(tmp_path / name)
        if hasattr(recipe.data, "train"):  # the big recipes read the user's videos
            recipe.data.train = "synthetic:digits"
        call = fdl.build(recipe)
        for key in ("model", "optim", "trainer"):
            validate(call.keywords[key])
        model = call.keywords["model"]
        if "_ar_4b" in name:
            assert (model.dim, model.n_layers, model.n_heads, model.n_kv_heads) == (4096, 16, 32, 8)
        if "7b" in name:
            assert (model.dit.dim, model.dit.n_layers, model.dit.n_heads) == (4096, 28, 32)
            assert model.dit.text.kind == "t5"


def test_generate_is_seeded_and_the_cli_writes_playable_mp4_and_gif(runs, tmp_path, capsys):
    from cupola.collections.world.diffusion.generate import load_wfm
    from cupola.toolkit.cli import main
    from cupola.toolkit.data.video import probe_video, read_frames_at

    world = load_wfm(runs["t2w"])
    a = world.generate("a red disc pushed on a wooden floor", frames=9, size=(32, 32), steps=3, seed=1)
    b = world.generate("a red disc pushed on a wooden floor", frames=9, size=(32, 32), steps=3, seed=1)
    c = world.generate("a red disc pushed on a wooden floor", frames=9, size=(32, 32), steps=3, seed=2)
    assert a.shape == (9, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    out = tmp_path / "gen" / "out.mp4"
    args = [
        "world",
        "generate",
        "--checkpoint",
        str(runs["t2w"]),
        "--prompt",
        "a blue square",
        "--steps",
        "3",
    ]
    assert main([*args, "--guidance", "2", "--out", str(out)]) == 0
    info = probe_video(out)
    assert info.frames == 9 and (info.height, info.width) == (32, 32)
    assert read_frames_at(out, range(9)).shape == (9, 32, 32, 3)
    assert out.with_suffix(".gif").stat().st_size > 0
    # the prompt guardrail refuses before anything is generated, and says why
    refused = tmp_path / "refused.mp4"
    assert main([*args[:4], "--prompt", "a man killing a dog", "--out", str(refused)]) == 3
    assert "kill" in capsys.readouterr().err and not refused.exists()


def test_generation_defaults_to_the_frame_rate_the_model_was_trained_at(runs, tmp_path):
    """The DiT's time positions are fps-aware: sampling at another rate than training moves them. The
    run records its clips' rate (the push environment's 8 fps); generate and the CLI default to it."""
    from cupola.collections.world.data.environments import FPS
    from cupola.collections.world.diffusion.generate import load_wfm
    from cupola.toolkit.cli import main
    from cupola.toolkit.data.video import probe_video

    world = load_wfm(runs["t2w"])
    assert world.fps == FPS
    common = {"prompt": "a red disc", "frames": 9, "size": (32, 32), "steps": 2, "seed": 3}
    default = world.generate(**common)
    assert np.array_equal(default, world.generate(**common, fps=FPS))
    assert not np.array_equal(default, world.generate(**common, fps=3 * FPS))
    out = tmp_path / "out.mp4"
    args = ["world", "generate", "--checkpoint", str(runs["t2w"]), "--steps", "2", "--out", str(out)]
    assert main([*args, "--prompt", "a red disc", "--seed", "3"]) == 0
    assert probe_video(out).fps == pytest.approx(FPS)


def test_action_model_generates_from_a_first_frame_and_actions(runs, tmp_path):
    from cupola.collections.world.data.environments import PushEnvConfig, push_episodes
    from cupola.toolkit.cli import main
    from cupola.toolkit.data.video import probe_video, read_frames_at, write_video

    out = tmp_path / "action"
    overrides = (
        "data.train_episodes=8",
        "data.val_episodes=4",
        "data.micro_batch_size=4",
        f"tokenizer={runs['tok']}",
        f"init_from={runs['t2w']}",
    )
    spawn(_train, 1, "cosmos_dit_tiny_action_posttrain", str(out), 2, overrides)
    episode = push_episodes(1, PushEnvConfig(size=32, frames=9), seed=7)[0]
    first, acts = tmp_path / "first.mp4", tmp_path / "acts.npy"
    write_video(first, episode.video[:2], 8.0)
    np.save(acts, episode.actions)
    video = tmp_path / "rollout.mp4"
    base = ["world", "generate", "--checkpoint", str(out), "--video", str(first), "--steps", "2"]
    assert main([*base, "--actions", str(acts), "--out", str(video)]) == 0
    assert probe_video(video).frames == 9
    # the rollout starts at the given frame: its first frame is the tokenizer's reconstruction of it
    import torch

    from cupola.collections.world.diffusion.generate import load_wfm

    world = load_wfm(out)
    frames = read_frames_at(first, [0])
    rollout = world.generate(frames=9, size=(32, 32), first_frames=frames, actions=episode.actions, steps=2)
    with torch.no_grad():
        x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        recon = world.tokenizer.decode(world.tokenizer.encode_latent(x))
    recon = ((recon[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    assert np.abs(rollout[0].astype(int) - recon[0].astype(int)).max() <= 1
    assert main([*base, "--out", str(tmp_path / "no_actions.mp4")]) == 2  # actions are required
