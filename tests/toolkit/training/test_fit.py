"""Training runs end to end: exact resume after a crash, atomic saves, the NaN guard, outputs.

Each run happens in a fresh process (``spawn(..., 1)``) so no process group or Lightning state
leaks between runs or into other tests. Crashes are real: the process dies with ``os._exit``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from cupola.toolkit.testing import spawn
from cupola.toolkit.training.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights
from cupola.toolkit.training.logs import loss_curves

STEPS = 8


def _tiny(out: Path, cache: Path, activation_checkpointing: bool = False):
    """The tiny GPT demo's call, built directly (no NeMo-Run needed), at test size."""
    from cupola.collections.llm import api
    from cupola.collections.llm.data.pretrain import PretrainDataModule
    from cupola.collections.llm.models.gpt import gpt_config
    from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

    return lambda: api.pretrain(
        model=gpt_config("tiny"),
        data=PretrainDataModule(seq_len=32, micro_batch_size=4, cache_dir=str(cache)),
        trainer=TrainerConfig(
            max_steps=STEPS,
            accelerator="cpu",  # bitwise-repeatable; tests/gpu covers CUDA
            precision="32",
            output_dir=str(out),
            log_every_n_steps=1,
            checkpoint_every_n_steps=4,
        ),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        parallel=ParallelConfig(activation_checkpointing=activation_checkpointing),
    )


def _train(
    rank: int, world: int, out: str, cache: str, crash_at_step: int, crash_in_save: int, ac: bool
) -> None:
    from cupola.collections.llm.lightning import GPTModule
    from cupola.toolkit.training import checkpoint

    if crash_at_step:
        step_fn = GPTModule.training_step

        def crashing_step(self, batch, batch_idx):
            if self.trainer.global_step == crash_at_step:
                os._exit(3)  # a kill: no cleanup, no final save
            return step_fn(self, batch, batch_idx)

        GPTModule.training_step = crashing_step
    if crash_in_save:
        save = checkpoint.ModelParallelStrategy.save_checkpoint

        def dies_before_rename(self, ckpt, path, storage_options=None):
            save(self, ckpt, path, storage_options)  # every shard of this save is written ...
            if Path(path).name.startswith(checkpoint.step_dir_name(crash_in_save)):
                os._exit(4)  # ... and the process dies before the rename makes it a checkpoint

        checkpoint.ModelParallelStrategy.save_checkpoint = dies_before_rename
    _tiny(Path(out), Path(cache), ac)()


def run(out: Path, cache: Path, crash_at_step: int = 0, crash_in_save: int = 0, ac: bool = False) -> None:
    spawn(_train, 1, str(out), str(cache), crash_at_step, crash_in_save, ac)


def losses(out: Path) -> dict[int, float]:
    """Step → train loss; a resumed run's rows replace the crashed run's."""
    return dict(loss_curves(out)["train"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, tmp_path_factory.getbasetemp() / "tokens")
    return out


def test_run_writes_its_outputs_and_loss_falls(uninterrupted: Path) -> None:
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["tokens_per_sec_overall"] > 0
    assert (uninterrupted / "loss_curve.png").stat().st_size > 10_000
    assert (uninterrupted / "config.yaml").is_file()
    assert [p.name for p in list_checkpoints(uninterrupted / "checkpoints")] == [
        "step_00000004",
        "step_00000008",
    ]
    assert len(losses(uninterrupted)) == STEPS
    # running a finished run again trains nothing and leaves its summary as it was
    run(uninterrupted, uninterrupted.parent / "tokens")
    assert json.loads((uninterrupted / "summary.json").read_text()) == summary


def test_resume_after_crash_reproduces_uninterrupted_losses(uninterrupted: Path, tmp_path: Path) -> None:
    # with activation checkpointing, whose wrappers rename the parameters (same maths, so same losses)
    with pytest.raises(ProcessExitedException):
        run(tmp_path, tmp_path.parent / "tokens", crash_at_step=6, ac=True)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"
    run(tmp_path, tmp_path.parent / "tokens", ac=True)  # trainer.resume=auto picks up step 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000004")
    assert summary["steps_this_run"] == STEPS - 4
    assert losses(tmp_path) == losses(uninterrupted)  # exactly, step by step
    final_a = load_model_weights(latest_checkpoint(uninterrupted / "checkpoints"))
    final_b = load_model_weights(latest_checkpoint(tmp_path / "checkpoints"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_crash_mid_save_keeps_last_good_checkpoint(uninterrupted: Path, tmp_path: Path) -> None:
    with pytest.raises(ProcessExitedException):
        run(tmp_path, tmp_path.parent / "tokens", crash_in_save=8)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_00000008.partial").is_dir()  # the interrupted save is there, unfinished
    assert latest_checkpoint(ckpts).name == "step_00000004"
    assert all(torch.isfinite(t).all() for t in load_model_weights(latest_checkpoint(ckpts)).values())
    run(tmp_path, tmp_path.parent / "tokens")
    assert not (ckpts / "step_00000008.partial").exists()
    assert latest_checkpoint(ckpts).name == "step_00000008"
    assert losses(tmp_path) == losses(uninterrupted)


def _nan_run(rank: int, world: int, out: str, cache: str) -> None:
    from cupola.collections.llm.lightning import GPTModule
    from cupola.toolkit.training.callbacks import NonFiniteLossError

    loss_fn = GPTModule.loss

    def poisoned(self, batch):
        loss = loss_fn(self, batch)
        return loss * float("nan") if self.trainer.global_step == 5 else loss

    GPTModule.loss = poisoned
    try:
        _tiny(Path(out), Path(cache))()
    except NonFiniteLossError as err:
        Path(out, "error.txt").write_text(str(err))
    else:
        raise AssertionError("training went on through a NaN loss")


def test_nan_guard_stops_before_the_weights_change(tmp_path: Path) -> None:
    spawn(_nan_run, 1, str(tmp_path), str(tmp_path / "tokens"))
    message = (tmp_path / "error.txt").read_text()
    assert "the training loss is nan at step 5" in message
    assert "optim.lr" in message and "clip_grad_norm" in message
    assert "the last finite loss was" in message
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step_00000004"
    assert all(torch.isfinite(t).all() for t in load_model_weights(ckpt).values())
