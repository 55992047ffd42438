"""Entry point of the tokenizer recipes: :func:`train` (from scratch, or fine-tuning with ``init_from``)."""

from __future__ import annotations

from typing import Any

from cupola.collections.world.tokenizers.lightning import TokenizerModule
from cupola.collections.world.tokenizers.losses import ReconstructionLossConfig
from cupola.collections.world.tokenizers.model import TokenizerConfig
from cupola.toolkit.config import ConfigError, config_error, to_dict, validate
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig
from cupola.toolkit.training.fit import RunInfo, fit

__all__ = ["train"]


def _check_data(model: TokenizerConfig, data: Any) -> None:
    t, s = model.temporal_compression, model.spatial_compression
    frames = getattr(data, "num_frames", None)
    if frames is not None and not model.image_only and (frames - 1) % t:
        raise config_error(
            "data", "num_frames", frames, f"must be 1 + {t}k for a {t}x temporal tokenizer (e.g. {1 + 2 * t})"
        )
    if frames is not None and model.image_only and frames != 1:
        raise config_error("data", "num_frames", frames, "must be 1 for an image tokenizer")
    size = getattr(data, "size", None)
    if size is not None and size % s:
        raise config_error("data", "size", size, f"must be a multiple of the {s}x spatial compression")


def train(
    model: TokenizerConfig,
    data: Any,
    trainer: TrainerConfig,
    optim: OptimConfig,
    loss: ReconstructionLossConfig | None = None,
    parallel: ParallelConfig | None = None,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Train a video tokenizer to reconstruct ``data``'s clips (``batch["video"]``, ``[B, 3, T, H, W]``
    in [-1, 1]); returns the run summary. ``init_from``: a cupola tokenizer run or a diffusers
    ``AutoencoderKLCosmos`` folder to fine-tune from."""
    parallel = parallel or ParallelConfig()
    loss = loss or ReconstructionLossConfig()
    validate(model)
    validate(optim)
    validate(loss)
    if trainer.export_hf:
        raise ConfigError(
            "trainer.export_hf: tokenizer runs have no Hugging Face export yet; set it to false"
        )
    _check_data(model, data)
    module = TokenizerModule(
        model,
        loss=loss,
        optim=optim,
        parallel=parallel,
        precision=trainer.precision,
        max_steps=trainer.max_steps,
        init_from=init_from,
    )
    run_config = {
        "model": to_dict(model),
        "data": {k: v for k, v in dict(getattr(data, "hparams", {})).items() if not k.startswith("_")},
        "trainer": to_dict(trainer),
        "optim": to_dict(optim),
        "parallel": to_dict(parallel),
        "loss": to_dict(loss),
        "init_from": init_from,
    }
    # throughput counts frames (a "token" is a frame here); no MFU figure for convolutional models
    info = RunInfo(
        seq_len=data.num_frames,
        micro_batch_size=data.micro_batch_size,
        flops_per_token=0.0,
        loss_name="reconstruction loss (L1, + perceptual / adversarial terms when on)",
    )
    return fit(module, data, trainer, info, run_config=run_config)
