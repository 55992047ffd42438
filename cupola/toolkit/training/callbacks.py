"""Training callbacks: throughput and MFU, a NaN/Inf guard, a console log and a loss-curve PNG."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

# Dense (no sparsity) peak bf16 tensor FLOP/s per device, from the vendors' datasheets. Lightning's
# table lists the H200 at its 2:4-sparse figure; MFU as the MoE papers report it uses dense peaks.
_DENSE_BF16_PEAK = {
    "h100": 989.4e12,  # H100 SXM datasheet
    "h200": 989.4e12,  # H200 SXM datasheet: same tensor cores as H100 SXM
    "b200": 2.25e15,
    "a100": 312e12,
}


def peak_flops_per_device(device: torch.device, precision: str) -> float | None:
    """Theoretical peak FLOP/s of one device at the training precision; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if precision == "bf16-mixed":
        for chip, flops in _DENSE_BF16_PEAK.items():
            if chip in name:
                return flops
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    return get_available_flops(device, dtype)


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf; raised before the bad step reaches the weights."""


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks (a NaN on any rank makes the result NaN, so every rank sees it)."""
    value = value.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value[0]


def raise_non_finite(trainer: pl.Trainer, what: str, value: float) -> None:
    guard = next((cb for cb in trainer.callbacks if isinstance(cb, NaNGuard)), None)
    last = guard.last_finite if guard else None
    seen = (
        f"the last finite loss was {last[1]:.4f} at step {last[0]}" if last else "no finite loss was seen yet"
    )
    raise NonFiniteLossError(
        f"{what} is {value} at step {trainer.global_step} (batch {trainer.fit_loop.epoch_loop.batch_idx}); "
        f"{seen}. Training stopped before this step changed the weights, so the newest checkpoint is "
        "still good. Try a lower optim.lr or a longer optim.warmup_steps, set optim.clip_grad_norm, use "
        "trainer.precision=32 to rule out bf16 overflow, and check the data around this batch."
    )


class NaNGuard(pl.Callback):
    """Stops training the moment the loss is NaN/Inf, with a message saying what to do.

    The check runs before ``backward``, so neither the weights nor the last checkpoint see the bad
    step (the gradient norm is checked by the module before the optimizer step, likewise). Every
    rank sees the same verdict (the loss is all-reduced), so no rank is left waiting in a collective.
    """

    def __init__(self) -> None:
        self.last_finite: tuple[int, float] | None = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        value = getattr(pl_module, "last_micro_loss", None)
        if value is None:
            value = float(global_mean(loss))
        if not math.isfinite(value):
            raise_non_finite(trainer, "the training loss", value)
        self.last_finite = (trainer.global_step, value)


class Throughput(pl.Callback):
    """Tokens/s (global and per device) and MFU from the model's FLOPs per token.

    ``tokens_per_step`` is the global batch in tokens; ``flops_per_token`` counts forward+backward
    training FLOPs (6·N plus attention, the PaLM convention). MFU is logged only where the device's
    peak is known (CUDA); CPU runs log tokens/s.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, precision: str) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.precision = precision
        self._t0: float | None = None
        self._step0 = 0
        self.last: dict[str, float] = {}

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._t0 is None or step == self._step0 or step % trainer.log_every_n_steps:
            return
        self._sync(pl_module)
        now = time.perf_counter()
        tokens_per_sec = self.tokens_per_step * (step - self._step0) / (now - self._t0)
        self._t0, self._step0 = now, step
        self.last = {
            "throughput/tokens_per_sec": tokens_per_sec,
            "throughput/tokens_per_sec_per_device": tokens_per_sec / self.world_size,
        }
        peak = peak_flops_per_device(pl_module.device, self.precision)
        if peak and self.flops_per_token:
            self.last["throughput/mfu"] = self.flops_per_token * tokens_per_sec / (peak * self.world_size)
        for key, value in self.last.items():
            pl_module.log(
                key, value, prog_bar=key != "throughput/tokens_per_sec_per_device", rank_zero_only=True
            )


class ConsoleLog(pl.Callback):
    """One plain line per logging interval on rank 0, for logs read without a terminal (torchrun, Slurm)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self._printed = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._printed or step == 0:
            return
        if step % trainer.log_every_n_steps and step != self.max_steps:
            return
        self._printed = step
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        parts = [f"step {step}/{self.max_steps}"]
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if "val/loss" in m:
            parts.append(f"val {m['val/loss']:.4f}")
        if "train/lr" in m:
            parts.append(f"lr {m['train/lr']:.2e}")
        if "throughput/tokens_per_sec" in m:
            parts.append(f"{m['throughput/tokens_per_sec']:,.0f} tok/s")
        if "throughput/mfu" in m:
            parts.append(f"MFU {100 * m['throughput/mfu']:.1f}%")
        print("[cupola] " + " | ".join(parts), file=sys.stdout, flush=True)


class LossCurve(pl.Callback):
    """Keeps (step, loss) for the whole run — across resumes, through the checkpoint — and draws it."""

    def __init__(self, out_png: str | Path, loss_name: str = "cross-entropy loss (nats/token)") -> None:
        self.out_png = Path(out_png)
        self.loss_name = loss_name  # the y-axis label
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "val": list(self.val)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = [tuple(x) for x in state_dict.get("train", [])]
        self.val = [tuple(x) for x in state_dict.get("val", [])]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        loss = getattr(pl_module, "last_step_loss", None)
        step = trainer.global_step
        if loss is not None and (not self.train or self.train[-1][0] != step) and step > 0:
            self.train.append((step, float(loss)))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val/loss" in trainer.callback_metrics and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.draw()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero and self.train:
            self.draw()

    def draw(self) -> Path | None:
        if not self.train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        steps, losses = zip(*self.train, strict=True)
        ax.plot(steps, losses, label="train", lw=1.2)
        if self.val:
            vsteps, vlosses = zip(*self.val, strict=True)
            ax.plot(vsteps, vlosses, "o-", label="validation", lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(self.loss_name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        self.out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out_png)
        plt.close(fig)
        return self.out_png
