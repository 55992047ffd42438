"""Short recipe runs for tests: a catalog recipe with a few steps, on one of several processes."""

from __future__ import annotations

import os


def run_recipe_briefly(
    rank: int, world: int, collection: str, name: str, out: str, steps: int, overrides: tuple[str, ...] = ()
) -> None:
    """Build and run ``catalog(collection)[name]`` for ``steps`` steps into ``out`` with ``overrides``
    (``key=value`` strings) on ``world`` devices, logging, validating (one batch) and checkpointing at
    the end. Module-level, so that :func:`cupola.toolkit.testing.spawn` can run it on every rank."""
    import fiddle as fdl

    from cupola.recipes.registry import catalog
    from cupola.toolkit.cli import apply_overrides

    os.environ["WORLD_SIZE"] = str(world)  # a finished fit's teardown removes it; runs may share a process
    recipe = catalog(collection)[name]()
    recipe.trainer.output_dir = out
    recipe.trainer.max_steps = steps
    recipe.trainer.log_every_n_steps = 1
    recipe.trainer.checkpoint_every_n_steps = steps
    recipe.trainer.val_check_interval = steps
    recipe.trainer.limit_val_batches = 1
    fdl.build(apply_overrides(recipe, [*overrides, f"trainer.devices={world}"]))()
