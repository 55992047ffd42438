"""World-model recipes. Tokenizers: ``cosmos_tokenizer_<flavor>_train`` (from scratch) and
``cosmos_tokenizer_<flavor>_finetune`` (from a run or a diffusers ``AutoencoderKLCosmos`` folder,
``init_from=``) for every Cosmos flavor, on your videos (``data.train=`` a folder of mp4, a .txt
list or webdataset .tar shards); ``cosmos_tokenizer_tiny*`` run on a CPU in minutes on generated
videos (moving digits, bouncing shapes). Executors are chosen at launch time, never here.
"""

from __future__ import annotations

import nemo_run as run

from cupola.collections.world.data.datamodule import VideoClipDataModule
from cupola.collections.world.tokenizers import api
from cupola.collections.world.tokenizers.losses import ReconstructionLossConfig
from cupola.collections.world.tokenizers.model import TOKENIZER_FLAVORS, tokenizer_config
from cupola.recipes.llm import as_config
from cupola.recipes.registry import recipe
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
