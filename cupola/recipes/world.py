"""World-model recipes. Tokenizers: ``cosmos_tokenizer_<flavor>_train`` (from scratch) and
``cosmos_tokenizer_<flavor>_finetune`` (from a run or a diffusers ``AutoencoderKLCosmos`` folder,
``init_from=``) for every Cosmos flavor, on your videos (``data.train=`` a folder of mp4, a .txt
list or webdataset .tar shards); ``cosmos_tokenizer_tiny*`` run on a CPU in minutes on generated
videos (moving digits, bouncing shapes). Executors are chosen at launch time, never here.
"""

from __future__ import annotations

import nemo_run as run

from cupola.collections.world.autoregressive import api as ar_api
from cupola.collections.world.autoregressive.model import ar_config
from cupola.collections.world.data.datamodule import VideoClipDataModule
from cupola.collections.world.data.environments import EnvironmentDataModule
from cupola.collections.world.diffusion import api as wfm_api
from cupola.collections.world.diffusion.dit import dit_config
from cupola.collections.world.diffusion.model import WFMConfig
from cupola.collections.world.text import TextEncoderConfig
from cupola.collections.world.tokenizers import api
from cupola.collections.world.tokenizers.losses import ReconstructionLossConfig
from cupola.collections.world.tokenizers.model import TOKENIZER_FLAVORS, tokenizer_config
from cupola.recipes.llm import as_config
from cupola.recipes.registry import recipe
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig

COSMOS_FLAVORS = tuple(f for f in TOKENIZER_FLAVORS if not f.startswith("tiny"))


def _tokenizer_run(
    flavor: str,
    output_dir: str,
    data: run.Config,
    *,
    steps: int,
    lr: float,
    devices: int,
    precision: str,
    init_from: str | None = None,
    loss: run.Config | None = None,
    checkpoint_every: int = 1000,
    val_every: int | None = 1000,
) -> run.Partial:
    return run.Partial(
        api.train,
        model=as_config(tokenizer_config(flavor)),
        data=data,
        trainer=run.Config(
            TrainerConfig,
            max_steps=steps,
            devices=devices,
            precision=precision,
            output_dir=output_dir,
            log_every_n_steps=10 if steps > 100 else 5,
            val_check_interval=val_every,
            limit_val_batches=4,
            checkpoint_every_n_steps=checkpoint_every,
        ),
        optim=run.Config(
            OptimConfig,
            lr=lr,
            min_lr=lr / 10,
            warmup_steps=max(1, steps // 50),
            weight_decay=0.0,
            betas=(0.5, 0.9),
        ),
        loss=loss or run.Config(ReconstructionLossConfig),
        parallel=run.Config(ParallelConfig),
        init_from=init_from,
    )


def _clips(
    flavor: str, train: str, val: str | None, size: int, micro_batch_size: int, **kw: object
) -> run.Config:
    cfg = TOKENIZER_FLAVORS[flavor]
    frames = 1 if cfg.image_only else 1 + 2 * cfg.temporal_compression
    return run.Config(
        VideoClipDataModule,
        train=train,
        val=val,
        num_frames=frames,
        size=size,
        micro_batch_size=micro_batch_size,
        **kw,
    )


def _cosmos(flavor: str, finetune: bool):
    kind = "fine-tune" if finetune else "train"
    compression = TOKENIZER_FLAVORS[flavor]

    def factory(
        output_dir: str = f"runs/cosmos_tokenizer_{flavor}_{'finetune' if finetune else 'train'}",
    ) -> run.Partial:
        return _tokenizer_run(
            flavor,
            output_dir,
            _clips(flavor, "data/videos", None, 256, 1, num_workers=8),
            steps=20000 if finetune else 200000,
            lr=5e-5 if finetune else 1e-4,
            devices=8,
            precision="bf16-mixed",
            init_from=f"runs/cosmos_tokenizer_{flavor}_train" if finetune else None,
            loss=run.Config(
                ReconstructionLossConfig,
                perceptual=0.1,
                gram=0.0 if finetune else 0.1,
                gram_start_step=100000,
            ),
        )

    name = f"cosmos_tokenizer_{flavor}_{'finetune' if finetune else 'train'}"
    factory.__name__ = factory.__qualname__ = name
    discrete = "discrete (FSQ, 64,000 codes)" if compression.discrete else "continuous (16 channels)"
    shape = (
        f"{compression.spatial_compression}x{compression.spatial_compression} images"
        if compression.image_only
        else f"{compression.temporal_compression}x{compression.spatial_compression}x{compression.spatial_compression} video"
    )
    factory.__doc__ = (
        f"{kind.capitalize()} the Cosmos {flavor.upper()} tokenizer ({discrete}, {shape}) on 8 GPUs (bf16) on "
        "your videos: set data.train= (a folder of mp4, a .txt list, or webdataset .tar shards)"
        + (
            "; init_from= a cupola tokenizer run or a diffusers AutoencoderKLCosmos folder (continuous flavors)."
            if finetune
            else ". Perceptual and Gram losses need loss.vgg_weights= (a local torchvision vgg16 file)."
        )
    )
    return recipe(factory)


for _flavor in COSMOS_FLAVORS:
    _cosmos(_flavor, finetune=False)
    _cosmos(_flavor, finetune=True)


def _tiny(
    flavor: str, videos: str, output_dir: str, *, steps: int, lr: float, init_from: str | None = None
) -> run.Partial:
    """A CPU run on generated videos (``videos``: ``digits`` or ``shapes``), 9 frames of 32 px, batch 4."""
    data = _clips(flavor, f"synthetic:{videos}", f"synthetic:{videos}:val", 32, 4)
    every = steps // 2
    return _tokenizer_run(
        flavor,
        output_dir,
        data,
        steps=steps,
        lr=lr,
        devices=1,
        precision="32",
        init_from=init_from,
        checkpoint_every=every,
        val_every=every,
    )


@recipe
def cosmos_tokenizer_tiny_train(output_dir: str = "runs/cosmos_tokenizer_tiny_train") -> run.Partial:
    """CPU: the tiny continuous 4x8x8 tokenizer on generated moving digits (9 frames, 32 px), L1 loss;
    PSNR logged as it learns."""
    return _tiny("tiny", "digits", output_dir, steps=200, lr=2e-3)


@recipe
def cosmos_tokenizer_tiny_dv_train(output_dir: str = "runs/cosmos_tokenizer_tiny_dv_train") -> run.Partial:
    """CPU: the tiny discrete tokenizer (FSQ 5x5x5) on generated bouncing shapes."""
    return _tiny("tiny_dv", "shapes", output_dir, steps=200, lr=2e-3)


@recipe
def cosmos_tokenizer_tiny_finetune(output_dir: str = "runs/cosmos_tokenizer_tiny_finetune") -> run.Partial:
    """CPU: fine-tune the tiny tokenizer run on bouncing shapes (init_from=runs/cosmos_tokenizer_tiny_train)."""
    return _tiny(
        "tiny", "shapes", output_dir, steps=100, lr=5e-4, init_from="runs/cosmos_tokenizer_tiny_train"
    )


@recipe
def cosmos_tokenizer_tiny_adversarial(
    output_dir: str = "runs/cosmos_tokenizer_tiny_adversarial",
) -> run.Partial:
    """CPU: the adversarial stage after reconstruction training — the tiny tokenizer from
    ``runs/cosmos_tokenizer_tiny_train`` with a 3D PatchGAN discriminator (hinge loss, weight 0.1)."""
    base = cosmos_tokenizer_tiny_finetune(output_dir)
    base.data = _clips("tiny", "synthetic:digits", "synthetic:digits:val", 32, 4)
    base.loss = run.Config(
        ReconstructionLossConfig, adversarial=0.1, adversarial_start_step=0, discriminator_channels=16
    )
    return base


# Diffusion world models -----------------------------------------------------------------------


def _wfm_run(
    model: run.Config,
    data: run.Config,
    output_dir: str,
    *,
    tokenizer: str,
    steps: int,
    lr: float,
    devices: int,
    precision: str,
    init_from: str | None = None,
    lora: run.Config | None = None,
    checkpoint_every: int = 1000,
    val_every: int | None = 1000,
    activation_checkpointing: bool = False,
) -> run.Partial:
    return run.Partial(
        wfm_api.train,
        model=model,
        data=data,
        trainer=run.Config(
            TrainerConfig,
            max_steps=steps,
            devices=devices,
            precision=precision,
            output_dir=output_dir,
            log_every_n_steps=10 if steps > 100 else 5,
            val_check_interval=val_every,
            limit_val_batches=4,
            checkpoint_every_n_steps=checkpoint_every,
        ),
        optim=run.Config(
            OptimConfig, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 50), weight_decay=0.1
        ),
        tokenizer=tokenizer,
        parallel=run.Config(ParallelConfig, activation_checkpointing=activation_checkpointing),
        init_from=init_from,
        lora=lora,
    )


def _wfm_model(flavor: str, *, cond_frames: int = 0, **dit: object) -> run.Config:
    cfg = WFMConfig(dit=dit_config(flavor, video2world=cond_frames > 0, **dit), cond_frames=cond_frames)
    return as_config(cfg)


def _env(kind: str, frames: int, size: int, batch: int, episodes: int, **kw: object) -> run.Config:
    return run.Config(
        EnvironmentDataModule,
        kind=kind,
        num_frames=frames,
        size=size,
        micro_batch_size=batch,
        train_episodes=episodes,
        val_episodes=8,
        **kw,
    )


_TINY_TOKENIZER = "runs/cosmos_tokenizer_tiny_train"


@recipe
def cosmos_dit_tiny_text2world(output_dir: str = "runs/cosmos_dit_tiny_text2world") -> run.Partial:
    """CPU: pretrain the tiny DiT (Text2World) on generated push-environment clips with their captions
    (9 frames, 32 px), latents from the tiny tokenizer run (``tokenizer=``)."""
    return _wfm_run(
        _wfm_model("tiny"),
        _env("push", 9, 32, 8, 256),
        output_dir,
        tokenizer=_TINY_TOKENIZER,
        steps=400,
        lr=1e-3,
        devices=1,
        precision="32",
        checkpoint_every=200,
        val_every=200,
    )


def _tiny_posttrain(model: run.Config, data: run.Config, output_dir: str) -> run.Partial:
    """300 CPU steps from the tiny Text2World run."""
    return _wfm_run(
        model,
        data,
        output_dir,
        tokenizer=_TINY_TOKENIZER,
        steps=300,
        lr=5e-4,
        devices=1,
        precision="32",
        init_from="runs/cosmos_dit_tiny_text2world",
        checkpoint_every=150,
        val_every=150,
    )


@recipe
def cosmos_dit_tiny_video2world_posttrain(
    output_dir: str = "runs/cosmos_dit_tiny_video2world_posttrain",
) -> run.Partial:
    """CPU: post-train the tiny Text2World run into Video2World (the first frame given)."""
    return _tiny_posttrain(
        _wfm_model("tiny", cond_frames=1),
        _env("push", 9, 32, 8, 256),
        output_dir,
    )


@recipe
def cosmos_dit_tiny_action_posttrain(
    output_dir: str = "runs/cosmos_dit_tiny_action_posttrain",
) -> run.Partial:
    """CPU: post-train the tiny Text2World run into an action-conditioned world model on the push
    environment: the first frame and 8 pushes (2-D) → the next 8 frames."""
    return _tiny_posttrain(
        _wfm_model("tiny", cond_frames=1, action_dim=2, actions_per_latent=4),
        _env("push", 9, 32, 8, 256),
        output_dir,
    )


@recipe
def cosmos_dit_tiny_camera_posttrain(
    output_dir: str = "runs/cosmos_dit_tiny_camera_posttrain",
) -> run.Partial:
    """CPU: post-train the tiny Text2World run into a camera-conditioned world model (Plücker rays) on
    the generated 3D scene seen from known camera paths."""
    return _tiny_posttrain(
        _wfm_model("tiny", cond_frames=1, camera=True),
        _env("camera", 9, 32, 8, 128, cache_dir="runs/cache/camera_env"),
        output_dir,
    )


@recipe
def cosmos_dit_tiny_action_lora(output_dir: str = "runs/cosmos_dit_tiny_action_lora") -> run.Partial:
    """CPU: the action post-training with LoRA (rank 8 on attention and MLP projections; the action
    embedding and patch embedding in full) instead of every weight."""
    base = cosmos_dit_tiny_action_posttrain(output_dir)
    base.lora = run.Config(
        LoRAConfig, rank=8, alpha=16.0, targets=("wq", "wk", "wv", "wo"), train_embeddings=False
    )
    base.optim.lr = 2e-3
    return base


def _clips_with(frames: int, size: int) -> run.Config:
    return run.Config(
        VideoClipDataModule,
        train="data/videos",
        val=None,
        num_frames=frames,
        size=size,
        micro_batch_size=1,
        num_workers=8,
    )


@recipe
def cosmos_dit_7b_text2world_pretrain(output_dir: str = "runs/cosmos_dit_7b_text2world") -> run.Partial:
    """Cosmos-1.0-Diffusion-7B-style Text2World (28 blocks, 4096 wide, 32 heads; T5-11B text from
    ``model.dit.text.path``) on 121-frame 704x1280 clips through the CV4x8x8 tokenizer, 8 GPUs bf16,
    FSDP2 with activation checkpointing."""
    return _wfm_run(
        _wfm_model("cosmos_dit_7b", latent_channels=16),
        _clips_with(121, 704),
        output_dir,
        tokenizer="checkpoints/Cosmos-1.0-Tokenizer-CV8x8x8",
        steps=100000,
        lr=1e-4,
        devices=8,
        precision="bf16-mixed",
        activation_checkpointing=True,
    )


@recipe
def cosmos_dit_7b_video2world_posttrain(output_dir: str = "runs/cosmos_dit_7b_video2world") -> run.Partial:
    """Post-train the 7B Text2World run (``init_from=``) into Video2World on your videos (``data.train=``):
    the first latent frame given, 8 GPUs bf16."""
    return _wfm_run(
        _wfm_model("cosmos_dit_7b", cond_frames=1, latent_channels=16),
        _clips_with(121, 704),
        output_dir,
        tokenizer="checkpoints/Cosmos-1.0-Tokenizer-CV8x8x8",
        steps=5000,
        lr=2e-5,
        devices=8,
        precision="bf16-mixed",
        init_from="runs/cosmos_dit_7b_text2world",
        activation_checkpointing=True,
    )


@recipe
def cosmos_dit_7b_action_posttrain(output_dir: str = "runs/cosmos_dit_7b_action") -> run.Partial:
    """Post-train the 7B world model into an action-conditioned one: your robot episodes as a DataModule
    yielding ``video`` + ``actions`` ``[B, T-1, action_dim]`` (set ``data=`` and
    ``model.dit.action_dim=``; 7 for an end-effector delta + gripper), 8 GPUs bf16."""
    return _wfm_run(
        _wfm_model("cosmos_dit_7b", cond_frames=1, latent_channels=16, action_dim=7, actions_per_latent=8),
        _clips_with(33, 256),
        output_dir,
        tokenizer="checkpoints/Cosmos-1.0-Tokenizer-CV8x8x8",
        steps=5000,
        lr=2e-5,
        devices=8,
        precision="bf16-mixed",
        init_from="runs/cosmos_dit_7b_video2world",
        activation_checkpointing=True,
    )


# Autoregressive world models ------------------------------------------------------------------


def _ar_run(
    model: run.Config,
    data: run.Config,
    output_dir: str,
    *,
    tokenizer: str,
    steps: int,
    lr: float,
    devices: int,
    precision: str,
    init_from: str | None = None,
    lora: run.Config | None = None,
    every: int = 1000,
    activation_checkpointing: bool = False,
) -> run.Partial:
    base = _wfm_run(
        model,
        data,
        output_dir,
        tokenizer=tokenizer,
        steps=steps,
        lr=lr,
        devices=devices,
        precision=precision,
        init_from=init_from,
        lora=lora,
        checkpoint_every=every,
        val_every=every,
        activation_checkpointing=activation_checkpointing,
    )
    return run.Partial(ar_api.train, **{k: getattr(base, k) for k in base.__arguments__})


@recipe
def cosmos_ar_tiny_train(output_dir: str = "runs/cosmos_ar_tiny_train") -> run.Partial:
    """CPU: the tiny autoregressive WFM (with byte-text cross-attention) over the tiny discrete
    tokenizer's codes (``runs/cosmos_tokenizer_tiny_dv_train``) of generated push-environment clips."""
    return _ar_run(
        as_config(
            ar_config("tiny", cross_attention=True, text=TextEncoderConfig(dim=32, n_layers=1, n_heads=2))
        ),
        _env("push", 9, 32, 4, 64),
        output_dir,
        tokenizer="runs/cosmos_tokenizer_tiny_dv_train",
        steps=200,
        lr=3e-3,
        devices=1,
        precision="32",
        every=100,
    )


@recipe
def cosmos_ar_tiny_posttrain(output_dir: str = "runs/cosmos_ar_tiny_posttrain") -> run.Partial:
    """CPU: post-train the tiny AR run with LoRA adapters (``init_from=runs/cosmos_ar_tiny_train``)."""
    base = cosmos_ar_tiny_train(output_dir)
    base.init_from = "runs/cosmos_ar_tiny_train"
    base.lora = run.Config(LoRAConfig)
    base.trainer.max_steps = 100
    return base


@recipe
def cosmos_ar_4b_pretrain(output_dir: str = "runs/cosmos_ar_4b") -> run.Partial:
    """Cosmos-1.0-Autoregressive-4B-style decoder (16 layers, 4096 wide, 32/8 heads) over DV8x16x16 codes
    of 33-frame clips, 8 GPUs bf16, FSDP2 with activation checkpointing."""
    return _ar_run(
        as_config(ar_config("cosmos_ar_4b")),
        _clips_with(33, 640),
        output_dir,
        tokenizer="checkpoints/Cosmos-1.0-Tokenizer-DV8x16x16",
        steps=100000,
        lr=3e-4,
        devices=8,
        precision="bf16-mixed",
        activation_checkpointing=True,
    )


@recipe
def cosmos_ar_4b_posttrain(output_dir: str = "runs/cosmos_ar_4b_posttrain") -> run.Partial:
    """Post-train the 4B AR world model (``init_from=``) on your videos (``data.train=``), 8 GPUs bf16."""
    base = cosmos_ar_4b_pretrain(output_dir)
    base.init_from = "runs/cosmos_ar_4b"
    base.trainer.max_steps = 5000
    base.optim.lr, base.optim.min_lr = 2e-5, 2e-6
    return base
