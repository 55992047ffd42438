"""The diffusion world-model recipes run end to end on CPU: tiny Text2World pretraining on generated
push-environment clips (loss falls, logged), post-training into an action-conditioned model (full and
LoRA) from that run, resume, and every diffusion recipe builds and validates."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cupola.recipes.registry import catalog
from cupola.toolkit.testing import spawn


def _train(rank: int, world: int, name: str, out: str, steps: int, overrides: tuple[str, ...] = ()) -> None:
    import fiddle as fdl

    from cupola.toolkit.cli import apply_overrides

    recipe = catalog("world")[name]()
    recipe.trainer.output_dir = out
    recipe.trainer.max_steps = steps
    recipe.trainer.log_every_n_steps = 1
    recipe.trainer.checkpoint_every_n_steps = steps
    recipe.trainer.val_check_interval = steps
    recipe.trainer.limit_val_batches = 1
    fdl.build(apply_overrides(recipe, [*overrides, f"trainer.devices={world}"]))()


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


@pytest.mark.parametrize("name", ["cosmos_dit_tiny_action_posttrain", "cosmos_dit_tiny_action_lora"])
def test_action_posttraining_starts_from_the_text2world_run(runs, tmp_path, name):
    out = tmp_path / name
    overrides = (
        "data.train_episodes=16",
        "data.val_episodes=4",
        "data.micro_batch_size=4",
        f"tokenizer={runs['tok']}",
        f"init_from={runs['t2w']}",
    )
    spawn(_train, 1, name, str(out), 4, overrides)
    loss = _series(out, "train/loss")
    assert len(loss) == 4 and all(np.isfinite(loss))
    import torch

    from cupola.collections.llm.lightning import run_checkpoint
    from cupola.toolkit.training.checkpoint import load_model_weights

    weights = load_model_weights(run_checkpoint(str(out)))
    base = load_model_weights(run_checkpoint(str(runs["t2w"])))
    # the latent scale measured in pretraining carries over; the patch embedding gained the mask column
    assert torch.equal(weights["model.latent_scale"], base["model.latent_scale"])
    old, new = base["model.dit.patch_embed.weight"], weights["model.dit.patch_embed.weight"]
    assert new.shape[1] == old.shape[1] + 4  # 1 mask channel x 1x2x2 patch
    assert any(k.endswith("lora_a") for k in weights) == name.endswith("lora")


def test_every_diffusion_recipe_builds_and_validates(tmp_path):
    import fiddle as fdl

    from cupola.toolkit.config import validate

    recipes = {k: v for k, v in catalog("world").items() if k.startswith("cosmos_dit_")}
    assert {"cosmos_dit_7b_video2world_posttrain", "cosmos_dit_7b_action_posttrain"} <= set(recipes)
    for name, factory in recipes.items():
        recipe = factory()
        recipe.trainer.output_dir = str(tmp_path / name)
        if hasattr(recipe.data, "train"):  # the big recipes read the user's videos
            recipe.data.train = "synthetic:digits"
        call = fdl.build(recipe)
        for key in ("model", "optim", "trainer"):
            validate(call.keywords[key])
        model = call.keywords["model"]
        if "7b" in name:
            assert (model.dit.dim, model.dit.n_layers, model.dit.n_heads) == (4096, 28, 32)
            assert model.dit.text.kind == "t5"
