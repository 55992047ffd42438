"""The run-level configs every training recipe shares: trainer, optimizer, parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from cupola.toolkit.config import check_choice, check_positive, config_error

PRECISIONS = ("32", "bf16-mixed")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    max_steps: int = 100
    devices: int = 1  # processes per node (GPUs, or CPU processes on gloo)
    num_nodes: int = 1
    accelerator: str = "auto"  # "auto" | "cpu" | "gpu"
    # "bf16-mixed": FSDP2 keeps fp32 master weights and computes/communicates in bf16.
    precision: str = "bf16-mixed"
    global_batch_size: int | None = None  # None: data.micro_batch_size * data-parallel size (no accumulation)
    output_dir: str = "runs/default"
    seed: int = 1234
    log_every_n_steps: int = 10
    val_check_interval: int | None = None  # steps between validations; None: no validation
    limit_val_batches: int = 8
    checkpoint_every_n_steps: int = 0  # 0: only at the end of training
    keep_last_checkpoints: int = 2
    # "auto": continue from the newest complete checkpoint in output_dir if there is one;
    # "never": refuse to run into an output_dir that holds checkpoints; or a checkpoint path.
    resume: str = "auto"
    export_hf: bool = False  # write a Hugging Face safetensors export to output_dir/hf at the end

    def validate(self) -> None:
        for name in ("max_steps", "devices", "num_nodes", "log_every_n_steps"):
            check_positive(self, name, getattr(self, name))
        check_positive(self, "keep_last_checkpoints", self.keep_last_checkpoints)
        check_positive(self, "checkpoint_every_n_steps", self.checkpoint_every_n_steps, allow_zero=True)
        check_choice(self, "precision", self.precision, PRECISIONS)
        check_choice(self, "accelerator", self.accelerator, ("auto", "cpu", "gpu", "cuda"))
        if self.global_batch_size is not None:
            check_positive(self, "global_batch_size", self.global_batch_size)
        if self.val_check_interval is not None:
            check_positive(self, "val_check_interval", self.val_check_interval)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def accumulate_grad_batches(self, micro_batch_size: int, dp_size: int) -> int:
        """Micro-batches per optimizer step so that one step sees ``global_batch_size`` samples."""
        if self.global_batch_size is None:
            return 1
        per_step = micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise config_error(
                self,
                "global_batch_size",
                self.global_batch_size,
                f"must be a multiple of micro_batch_size * data-parallel size = "
                f"{micro_batch_size} * {dp_size} = {per_step}",
            )
        return self.global_batch_size // per_step


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with linear warmup then a decay to ``min_lr`` (no weight decay on norms and biases)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_steps: int | None = None  # None: the rest of trainer.max_steps after warmup
    clip_grad_norm: float | None = 1.0

    def validate(self) -> None:
        check_positive(self, "lr", self.lr)
        check_positive(self, "min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise config_error(self, "min_lr", self.min_lr, f"must be <= lr ({self.lr})")
        check_positive(self, "warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive(self, "weight_decay", self.weight_decay, allow_zero=True)
        check_choice(self, "schedule", self.schedule, SCHEDULES)
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise config_error(self, "betas", self.betas, "both must be in [0, 1)")
        if self.clip_grad_norm is not None:
            check_positive(self, "clip_grad_norm", self.clip_grad_norm)


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Parallel degrees (see :class:`cupola.toolkit.parallel.dims.ParallelDims`) and memory/speed switches."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    sp: int = 1
    sp_ulysses: int = -1  # Ulysses part of sp (-1: all of it; 1: pure ring); the rest is ring
    sp_zigzag: bool = True  # zigzag ring order (causal load balance)
    ep: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
