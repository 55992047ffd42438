"""VLM recipes: LongVILA's five stages as runs of :func:`cupola.collections.vlm.api.train`.

    align (projector) -> pretrain (projector + LLM) -> sft (all) -> context_extension (LLM, long text,
    RoPE base raised) -> long_sft (projector + LLM, long videos)

Context extension also comes as ``*_context_extension_lora`` (LongLoRA: adapters on the attention
projections, embeddings and norms trained, the rest of the LLM frozen); its checkpoints keep the
adapters and the next stage loads them merged (``init_from=runs/..._context_extension_lora``).

Each stage names what it trains (``trainable``) and starts from the previous stage's run
(``init_from``); the first takes pretrained parts (``init_vision`` = a SigLIP folder, ``init_llm`` =
a Llama folder or a cupola GPT run). ``vila_tiny_*`` run on a CPU in minutes on the generated
video dataset (``train_file="synthetic"``); ``vila_8b_*`` carry LongVILA-8B's shapes and need your
data paths (``data.train_file=...``) and GPUs. Executors are chosen at launch time, never here.
"""

from __future__ import annotations

import dataclasses

import nemo_run as run

from cupola.collections.llm.data.pretrain import PretrainDataModule
from cupola.collections.vlm import api
from cupola.collections.vlm.context_extension import extend_context
from cupola.collections.vlm.data.datamodule import VLMDataModule
from cupola.collections.vlm.models.vila import VILAConfig, vila_config
from cupola.recipes.llm import as_config
from cupola.recipes.registry import recipe
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

STAGES = ("align", "pretrain", "sft", "context_extension", "long_sft")
TRAINABLE = {
    "align": ["projector"],
    "pretrain": ["projector", "llm"],
    "sft": ["vision", "projector", "llm"],
    "context_extension": ["llm"],
    "long_sft": ["projector", "llm"],
}


def _extended(cfg: VILAConfig, target_len: int) -> VILAConfig:
    return dataclasses.replace(cfg, llm=extend_context(cfg.llm, target_len, method="rope_base"))


def _video_data(cfg: VILAConfig, train_file: str, val_file: str | None, **kwargs: object) -> run.Config:
    return run.Config(
        VLMDataModule,
        train_file=train_file,
        val_file=val_file,
        tokens_per_frame=cfg.tokens_per_frame,
        image_size=cfg.vision.image_size,
        media_token_id=cfg.media_token_id,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------
# tiny: the whole chain on a CPU, on the generated videos

TINY = vila_config("tiny")
TINY_LONG = _extended(TINY, 4096)


def _tiny(
    stage: str,
    output_dir: str,
    init_from: str | None,
    data: run.Config,
    model: VILAConfig,
    steps: int,
    lr: float,
    lora: run.Config | None = None,
) -> run.Partial:
    return run.Partial(
        api.train,
        model=as_config(model),
        data=data,
        trainer=run.Config(
            TrainerConfig,
            max_steps=steps,
            precision="32",
            output_dir=output_dir,
            log_every_n_steps=10,
            val_check_interval=steps,
            limit_val_batches=2,
            checkpoint_every_n_steps=steps,
        ),
        optim=run.Config(
            OptimConfig, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), weight_decay=0.0
        ),
        parallel=run.Config(ParallelConfig),
        trainable=TRAINABLE[stage],
        init_from=init_from,
        lora=lora,
    )


def _tiny_video(**kwargs: object) -> run.Config:
    return _video_data(
        TINY, "synthetic", "synthetic:val", seq_len=512, micro_batch_size=4, num_frames=8, **kwargs
    )


@recipe
def vila_tiny_align(output_dir: str = "runs/vila_tiny_align") -> run.Partial:
    """Stage 1 on CPU: train the projector only (vision tower and LLM frozen) on the generated videos.
    Start the LLM from a tiny GPT run with ``init_llm=runs/gpt_tiny_pretrain`` (else random)."""
    return _tiny("align", output_dir, None, _tiny_video(), TINY, steps=60, lr=1e-3)


@recipe
def vila_tiny_pretrain(output_dir: str = "runs/vila_tiny_pretrain") -> run.Partial:
    """Stage 2 on CPU: projector + LLM, from the align run."""
    return _tiny("pretrain", output_dir, "runs/vila_tiny_align", _tiny_video(), TINY, steps=60, lr=5e-4)


@recipe
def vila_tiny_sft(output_dir: str = "runs/vila_tiny_sft") -> run.Partial:
    """Stage 3 on CPU: everything trains, from the pretrain run."""
    return _tiny("sft", output_dir, "runs/vila_tiny_pretrain", _tiny_video(), TINY, steps=60, lr=3e-4)


@recipe
def vila_tiny_context_extension(output_dir: str = "runs/vila_tiny_context_extension") -> run.Partial:
    """Stage 4 on CPU: the LLM only, on long text (the embedded corpus, 2048-token rows), its RoPE
    base raised by LongVILA's schedule for a 4096 context; from the SFT run."""
    data = run.Config(PretrainDataModule, seq_len=2048, micro_batch_size=2, val_fraction=0.02)
    return _tiny("context_extension", output_dir, "runs/vila_tiny_sft", data, TINY_LONG, steps=40, lr=3e-4)


@recipe
def vila_tiny_context_extension_lora(
    output_dir: str = "runs/vila_tiny_context_extension_lora",
) -> run.Partial:
    """Stage 4 on CPU, LongLoRA-style: LoRA (rank 8) on the LLM's attention projections, embeddings and
    norms trained, the other LLM weights frozen. Continue with ``vila_tiny_long_sft init_from=<this run>``."""
    base = vila_tiny_context_extension(output_dir)
    base.lora = run.Config(LoRAConfig, rank=8, alpha=16.0)
    base.optim.lr, base.optim.min_lr = 1e-3, 1e-4  # adapters start at zero: a larger step than full FT
    return base


@recipe
def vila_tiny_long_sft(output_dir: str = "runs/vila_tiny_long_sft") -> run.Partial:
    """Stage 5 on CPU: projector + LLM on longer videos (all 16 frames), from the context extension run."""
    data = _video_data(
        TINY_LONG, "synthetic", "synthetic:val", seq_len=2048, micro_batch_size=2, num_frames=16
    )
    return _tiny(
        "long_sft", output_dir, "runs/vila_tiny_context_extension", data, TINY_LONG, steps=40, lr=2e-4
    )


# ------------------------------------------------------------------------------------------------
# LongVILA-8B shapes (arXiv 2408.10188): SigLIP-so400m-384 + Llama-3-8B-sized LLM, 196 tokens/frame.
# Learning rates and batch sizes follow VILA's training scripts where published (align 1e-3,
# later stages 2e-5-ish, global batch 256 / 128); treat them as starting points.

VILA_8B = vila_config("vila_8b")
VILA_8B_LONG = _extended(VILA_8B, 262144)


def _big(
    stage: str,
    output_dir: str,
    init_from: str | None,
    data: run.Config,
    model: VILAConfig,
    lr: float,
    gbs: int,
    steps: int,
    sp: int = 1,
) -> run.Partial:
    return run.Partial(
        api.train,
        model=as_config(model),
        data=data,
        trainer=run.Config(
            TrainerConfig,
            max_steps=steps,
            devices=8,
            num_nodes=1,
            precision="bf16-mixed",
            global_batch_size=gbs,
            output_dir=output_dir,
            log_every_n_steps=10,
            val_check_interval=500,
            limit_val_batches=16,
            checkpoint_every_n_steps=500,
        ),
        optim=run.Config(
            OptimConfig,
            lr=lr,
            min_lr=0.0,
            warmup_steps=max(1, steps // 33),
            weight_decay=0.0,
            clip_grad_norm=1.0,
        ),
        # MM-SP over sp GPUs (all Ulysses within the node; for several nodes set parallel.sp_ulysses
        # to the GPUs per node and the rest becomes zigzag ring across nodes)
        parallel=run.Config(ParallelConfig, sp=sp, activation_checkpointing=sp == 1, compile=True),
        trainable=TRAINABLE[stage],
        init_from=init_from,
        lora=None,
    )


@recipe
def vila_8b_align(output_dir: str = "runs/vila_8b_align") -> run.Partial:
    """Stage 1: projector only on image/video captions. Set data.train_file, init_vision (SigLIP-so400m
    folder) and init_llm (Llama 3 8B folder)."""
    data = _video_data(VILA_8B, "", None, seq_len=4096, micro_batch_size=4, num_frames=8)
    return _big("align", output_dir, None, data, VILA_8B, lr=1e-3, gbs=256, steps=2000)


@recipe
def vila_8b_pretrain(output_dir: str = "runs/vila_8b_pretrain") -> run.Partial:
    """Stage 2: projector + LLM on interleaved image/video-text data, from the align run."""
    data = _video_data(VILA_8B, "", None, seq_len=4096, micro_batch_size=2, num_frames=8)
    return _big("pretrain", output_dir, "runs/vila_8b_align", data, VILA_8B, lr=5e-5, gbs=256, steps=10000)


@recipe
def vila_8b_sft(output_dir: str = "runs/vila_8b_sft") -> run.Partial:
    """Stage 3: everything on short video/image instruction data, from the pretrain run."""
    data = _video_data(VILA_8B, "", None, seq_len=8192, micro_batch_size=1, num_frames=8)
    return _big("sft", output_dir, "runs/vila_8b_pretrain", data, VILA_8B, lr=2e-5, gbs=128, steps=5000)


@recipe
def vila_8b_context_extension(output_dir: str = "runs/vila_8b_context_extension") -> run.Partial:
    """Stage 4: LLM only on long text (set data.path to a tokenized corpus), 262144-token context with
    LongVILA's RoPE base for it (207M), sequence-parallel over 8 GPUs (32K tokens each)."""
    data = run.Config(PretrainDataModule, seq_len=262144, micro_batch_size=1)
    return _big(
        "context_extension",
        output_dir,
        "runs/vila_8b_sft",
        data,
        VILA_8B_LONG,
        lr=2e-5,
        gbs=32,
        steps=1000,
        sp=8,
    )


@recipe
def vila_8b_context_extension_lora(output_dir: str = "runs/vila_8b_context_extension_lora") -> run.Partial:
    """Stage 4 as LongLoRA trains it: LoRA rank 8 / alpha 16 on q, k, v, o with embeddings and norms
    trainable (arXiv 2309.12307; its learning rate 2e-5), the rest of the LLM frozen — optimizer state
    for 6.6% of the LLM (mostly the embedding table) instead of all of it. Continue with ``vila_8b_1024f_long_sft init_from=<this run>``."""
    base = vila_8b_context_extension(output_dir)
    base.lora = run.Config(LoRAConfig, rank=8, alpha=16.0)
    return base


@recipe
def vila_8b_1024f_long_sft(output_dir: str = "runs/vila_8b_1024f_long_sft") -> run.Partial:
    """Stage 5: projector + LLM on long videos, 1024 frames (~200k visual tokens) per sample, from the
    context extension run; MM-SP over 8 GPUs (each encodes 128 frames and holds 32K tokens)."""
    data = _video_data(VILA_8B_LONG, "", None, seq_len=262144, micro_batch_size=1, num_frames=1024)
    return _big(
        "long_sft",
        output_dir,
        "runs/vila_8b_context_extension",
        data,
        VILA_8B_LONG,
        lr=2e-5,
        gbs=32,
        steps=1000,
        sp=8,
    )
