"""One function that turns (module, data, trainer config) into a resumable Lightning run.

Output folder layout (``trainer.output_dir``)::

    config.yaml           the resolved run config (model, data, trainer, optim, parallel)
    checkpoints/step_N/   sharded DCP checkpoints (atomic; newest K kept)
    logs/metrics.csv      every logged metric (TensorBoard events beside it when installed)
    loss_curve.png        train (and validation) loss over optimizer steps
    summary.json          wall time, steps, last loss, tokens/s, MFU, device and versions
    hf/                   safetensors export, when trainer.export_hf=true
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf

from cupola.toolkit.config import ConfigError, validate
from cupola.toolkit.training.callbacks import ConsoleLog, LossCurve, NaNGuard, Throughput
from cupola.toolkit.training.checkpoint import (
    AtomicModelParallelStrategy,
    PeriodicCheckpoint,
    checkpoint_step,
    is_complete,
    latest_checkpoint,
    remove_partial,
)
from cupola.toolkit.training.configs import TrainerConfig
from cupola.toolkit.training.logs import ContinuingCSVLogger
from cupola.toolkit.training.module import ParallelModule


@dataclass(kw_only=True, slots=True)
class RunInfo:
    """What a model/data pair tells the trainer glue about one optimizer step."""

    seq_len: int
    micro_batch_size: int
    flops_per_token: float
    # whether seq_len counts the tokens sequence parallelism splits (checked against its layout here);
    # False when it counts something else (world models: frames) and the model checks its own tokens
    sp_splits_seq_len: bool = True
    loss_name: str = "cross-entropy loss (nats/token)"  # what the loss curve's y axis says


class ProgressBar(TQDMProgressBar):
    """Lightning's bar without the logger version number (meaningless for cupola's fixed log folders)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    if resume == "never":
        found = latest_checkpoint(ckpt_dir)
        if found is not None:
            raise ConfigError(
                f"trainer.resume='never' but {ckpt_dir} already holds checkpoint {found.name}; choose another "
                "trainer.output_dir, or trainer.resume=auto to continue that run"
            )
        return None
    path = Path(resume).expanduser()
    if is_complete(path):
        return path
    found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"trainer.resume={resume!r}: looked for a checkpoint folder (step_N with meta.pt) at {path}, "
            f"in {path / 'checkpoints'} and in {path}, and found none. Pass a run's output_dir, one of its "
            "checkpoints/step_N folders, or trainer.resume=auto"
        )
    return found


def check_same_model(config_path: Path, run_config: dict[str, Any]) -> None:
    """Refuse to resume a run whose saved model config differs from the one asked for now."""
    if not config_path.is_file() or "model" not in run_config:
        return
    saved = OmegaConf.to_container(OmegaConf.load(config_path)).get("model")
    now = OmegaConf.to_container(OmegaConf.create(run_config))["model"]
    if saved is not None and saved != now:
        diff = {
            k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
        }
        raise ConfigError(
            f"{config_path.parent} holds a run of a different model; differing fields (saved, now): {diff}. "
            "Use another trainer.output_dir, or the saved model settings to resume"
        )


def _loggers(out: Path, resume_step: int | None) -> list[Any]:
    loggers: list[Any] = [ContinuingCSVLogger(save_dir=str(out), name="logs", resume_step=resume_step)]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="logs", version="tensorboard"))
    return loggers


def environment() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
    }
    return info


def check_interpreter() -> None:
    """A job must run in the Python cupola was launched from (``cupola run`` sets CUPOLA_PYTHON)."""
    expected = os.environ.get("CUPOLA_PYTHON")
    if expected and os.path.realpath(expected) != os.path.realpath(sys.executable):
        raise RuntimeError(
            f"this job runs in {sys.executable}, but it was launched from {expected}; the executor's PATH "
            "picked another Python. Put the launching interpreter's bin folder first on PATH (cupola's "
            "executors do) or install cupola into this interpreter"
        )


def fit(
    module: ParallelModule,
    data: pl.LightningDataModule,
    trainer_cfg: TrainerConfig,
    info: RunInfo,
    *,
    run_config: dict[str, Any],
    export: Callable[[Path, Path], None] | None = None,
) -> dict[str, Any]:
    """Train ``module`` on ``data``; resumes from ``trainer_cfg.output_dir`` when it holds a checkpoint."""
    check_interpreter()
    validate(trainer_cfg)
    rank = int(os.environ.get("RANK", "0"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != trainer_cfg.world_size:
        raise ConfigError(
            f"{launched} processes were launched but trainer.devices*trainer.num_nodes = "
            f"{trainer_cfg.devices}*{trainer_cfg.num_nodes} = {trainer_cfg.world_size}; launch with "
            f"`cupola run ... --devices {trainer_cfg.devices}` or set trainer.devices to match"
        )
    dims = module.make_dims()
    dims.world_size = trainer_cfg.world_size
    dims.validate()
    if dims.sp_enabled and info.sp_splits_seq_len and info.seq_len % dims.sp_layout.multiple:
        layout = dims.sp_layout
        raise ConfigError(
            f"data.seq_len={info.seq_len} does not split over parallel.sp={dims.sp} (sp_ring={layout.ring}, "
            f"sp_ulysses={layout.ulysses}{', zigzag' if layout.zigzag and layout.ring > 1 else ''}): it must be "
            f"a multiple of {layout.multiple}"
        )
    data.dp_rank, data.dp_size = dims.dp_coordinate(rank), dims.dp
    if hasattr(data, "sp_size"):  # SP-aware data: each rank of an SP group decodes its share of the media
        data.sp_rank, data.sp_size = dims.sp_coordinate(rank), dims.sp
    accumulate = trainer_cfg.accumulate_grad_batches(info.micro_batch_size, dims.dp)

    out = Path(trainer_cfg.output_dir).expanduser().resolve()
    ckpt_dir = out / "checkpoints"
    resume_from = resolve_resume(trainer_cfg.resume, ckpt_dir)
    module.resuming = resume_from is not None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            check_same_model(out / "config.yaml", run_config)
        for stale in remove_partial(ckpt_dir):
            print(f"[cupola] removed {stale}: a checkpoint save that never finished", flush=True)
        OmegaConf.save(OmegaConf.create(run_config), out / "config.yaml")

    pl.seed_everything(trainer_cfg.seed, workers=True, verbose=False)
    tokens_per_step = info.seq_len * info.micro_batch_size * dims.dp * accumulate
    loss_curve = LossCurve(out / "loss_curve.png", info.loss_name)
    throughput = Throughput(
        tokens_per_step, info.flops_per_token, trainer_cfg.world_size, trainer_cfg.precision
    )
    callbacks = [
        NaNGuard(),
        throughput,
        ConsoleLog(trainer_cfg.max_steps),
        loss_curve,
        PeriodicCheckpoint(
            ckpt_dir,
            trainer_cfg.checkpoint_every_n_steps,
            trainer_cfg.max_steps,
            trainer_cfg.keep_last_checkpoints,
        ),
    ]
    # A live bar where someone watches a terminal; torchrun/Slurm logs get ConsoleLog's lines instead.
    interactive = sys.stdout.isatty()
    if interactive:
        callbacks.append(ProgressBar(refresh_rate=max(1, trainer_cfg.log_every_n_steps // 2)))
    accelerator = "gpu" if trainer_cfg.accelerator == "cuda" else trainer_cfg.accelerator
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=AtomicModelParallelStrategy(),
        precision="32-true",  # mixed precision comes from the FSDP2 policy, not autocast
        max_steps=trainer_cfg.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        use_distributed_sampler=False,  # the data module brings its own data-parallel sampler
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        val_check_interval=(trainer_cfg.val_check_interval * accumulate)
        if trainer_cfg.val_check_interval
        else None,
        check_val_every_n_epoch=None,
        limit_val_batches=trainer_cfg.limit_val_batches if trainer_cfg.val_check_interval else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=interactive,
        callbacks=callbacks,
        logger=_loggers(out, checkpoint_step(resume_from) if resume_from else None),
        default_root_dir=str(out),
    )
    if resume_from is not None and trainer.is_global_zero:
        print(f"[cupola] resuming from {resume_from}", flush=True)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - start
    start_step = checkpoint_step(resume_from) if resume_from else 0

    steps_run = trainer.global_step - start_step
    counts = module.parameter_counts or (None, None)
    summary = {
        "output_dir": str(out),
        "steps": trainer.global_step,
        "steps_this_run": steps_run,
        "resumed_from": str(resume_from) if resume_from else None,
        "wall_seconds": round(wall, 2),
        "final_loss": module.last_step_loss,
        "first_loss": loss_curve.train[0][1] if loss_curve.train else None,
        "final_val_loss": loss_curve.val[-1][1] if loss_curve.val else None,
        "tokens_per_step": tokens_per_step,
        "tokens_per_sec_overall": round(tokens_per_step * steps_run / wall, 1) if wall else None,
        **{k.split("/")[-1]: v for k, v in throughput.last.items()},
        "checkpoint": str(latest_checkpoint(ckpt_dir)),
        "metrics_csv": str(out / "logs" / "metrics.csv"),
        "loss_curve_png": str(loss_curve.out_png),
        "world_size": trainer_cfg.world_size,
        "parameters": counts[0],
        "trainable_parameters": counts[1],
        "environment": environment(),
    }
    if steps_run == 0:
        if trainer.is_global_zero:
            print(
                f"[cupola] {out} is already at step {trainer.global_step} (trainer.max_steps="
                f"{trainer_cfg.max_steps}); nothing to train. Raise trainer.max_steps to continue.",
                flush=True,
            )
        previous = out / "summary.json"
        return json.loads(previous.read_text()) if previous.is_file() else summary
    if trainer.is_global_zero:
        if export is not None and trainer_cfg.export_hf:
            export(Path(summary["checkpoint"]), out / "hf")
            summary["hf_export"] = str(out / "hf")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"[cupola] done: {trainer.global_step} steps in {wall:.1f} s, loss {summary['first_loss']} -> "
            f"{summary['final_loss']}, {summary['tokens_per_sec_overall']} tokens/s overall\n"
            f"[cupola] outputs in {out}: checkpoints/, logs/metrics.csv, loss_curve.png, summary.json",
            flush=True,
        )
    return summary
