"""Entry point the VLM stage recipes call: :func:`train` (one function for every LongVILA stage; the
stage is its data, its ``trainable`` components and where its weights come from)."""

from __future__ import annotations

from typing import Any

from cupola.collections.llm.models.gpt import num_flops_per_token
from cupola.collections.vlm.lightning import VLMModule, check_trainable
from cupola.collections.vlm.models.vila import VILAConfig
from cupola.toolkit.config import ConfigError, config_error, to_dict, validate
from cupola.toolkit.modules.lora import LoRAConfig
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig, TrainerConfig
from cupola.toolkit.training.fit import RunInfo, fit

__all__ = ["train"]


def _data_config(data: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(getattr(data, "hparams", {})).items() if not k.startswith("_")}


def _check_data(model: VILAConfig, data: Any) -> None:
    if data.seq_len > model.llm.max_seq_len:
        raise config_error(
            "data", "seq_len", data.seq_len, f"must be <= model.llm.max_seq_len ({model.llm.max_seq_len})"
        )
    expected = {
        "tokens_per_frame": model.tokens_per_frame,
        "image_size": model.vision.image_size,
        "media_token_id": model.media_token_id,
    }
    for name, want in expected.items():
        if hasattr(data, name) and getattr(data, name) != want:
            raise config_error(
                "data",
                name,
                getattr(data, name),
                f"must be {want} for this model (model.{name.replace('image_size', 'vision.image_size')})",
            )


def train(
    model: VILAConfig,
    data: Any,
    trainer: TrainerConfig,
    optim: OptimConfig,
    parallel: ParallelConfig | None = None,
    trainable: list[str] | tuple[str, ...] = ("projector",),
    init_from: str | None = None,
    init_vision: str | None = None,
    init_llm: str | None = None,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """Train a VILA model on ``data`` (video/image conversations, or text for context extension);
    returns the run summary (also written to ``trainer.output_dir/summary.json``).

    ``trainable``: the components that learn (the others are frozen and provably unchanged).
    ``init_from``: the previous stage's run; ``init_vision`` / ``init_llm``: pretrained parts for the
    first stage (see :class:`~cupola.collections.vlm.lightning.VLMModule`).
    ``lora``: train the LLM through low-rank adapters (LongLoRA: on the attention projections, with
    embeddings and norms trained in full, every other LLM weight frozen); the run's checkpoints keep
    the adapters, and the next stage, ``cupola vlm chat`` and NIAH load them merged.
    """
    parallel = parallel or ParallelConfig()
    validate(model)
    validate(optim)
    trainable = check_trainable(trainable, lora)
    if init_from and (init_vision or init_llm):
        raise ConfigError(
            "give either init_from= (a previous VLM stage) or init_vision=/init_llm= (pretrained parts), not both"
        )
    if trainer.export_hf:
        raise ConfigError(
            "trainer.export_hf: there is no Hugging Face export for the VLM yet; set it to false"
        )
    _check_data(model, data)
    module = VLMModule(
        model,
        optim=optim,
        parallel=parallel,
        precision=trainer.precision,
        max_steps=trainer.max_steps,
        trainable=trainable,
        init_from=init_from,
        init_vision=init_vision,
        init_llm=init_llm,
        lora=lora,
    )
    run_config = {
        "model": to_dict(model),
        "data": _data_config(data),
        "trainer": to_dict(trainer),
        "optim": to_dict(optim),
        "parallel": to_dict(parallel),
        "trainable": list(trainable),
        "init_from": init_from,
        "init_vision": init_vision,
        "init_llm": init_llm,
        "lora": None if lora is None else to_dict(lora),
    }
    # MFU counts the LLM's FLOPs over the whole sequence (visual tokens included); the vision tower's
    # own FLOPs are left out, so VLM MFU is a lower bound.
    info = RunInfo(
        seq_len=data.seq_len,
        micro_batch_size=data.micro_batch_size,
        flops_per_token=num_flops_per_token(model.llm, data.seq_len),
    )
    return fit(module, data, trainer, info, run_config=run_config)
