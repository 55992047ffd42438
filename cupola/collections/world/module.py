"""The Lightning shell the diffusion and autoregressive world models share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import nn

from cupola.toolkit.modules.lora import LoRAConfig, apply_lora, init_lora
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.training.configs import OptimConfig, ParallelConfig
from cupola.toolkit.training.module import ParallelModule
from cupola.toolkit.training.weights import SliceSource

__all__ = ["WorldModelModule"]


class WorldModelModule(ParallelModule):
    """A world model built from ``config`` (LoRA adapters on :meth:`lora_targets` with ``lora``),
    parallelized block-wise by ``parallelize_fn``, initialised fresh or from the run ``init_from``
    (``sources_fn``), trained beside a frozen tokenizer — and for T5 models a frozen text encoder —
    that stay out of the state dict, the optimizer and checkpoints (``self.__dict__``). Subclasses
    set the three class attributes and write the loss and the freezing."""

    model_cls: ClassVar[type[nn.Module]]
    parallelize_fn: ClassVar[Callable[..., nn.Module]]
    sources_fn: ClassVar[Callable[[str, Any], Mapping[str, SliceSource]]]

    def __init__(
        self,
        config: Any,
        *,
        tokenizer: str,
        optim: OptimConfig,
        parallel: ParallelConfig,
        precision: str,
        max_steps: int,
        init_from: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__(optim=optim, parallel=parallel, precision=precision, max_steps=max_steps)
        self.config = config
        self.tokenizer_path = tokenizer
        self.init_from = init_from
        self.lora = lora
        self.__dict__["tokenizer"] = None
        self.__dict__["t5"] = None

    def lora_targets(self, model: nn.Module) -> nn.Module:
        """The modules whose linears get LoRA adapters (the model's blocks)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        model = type(self).model_cls(self.config)
        if self.lora is not None:
            apply_lora(self.lora_targets(model), self.lora)
        return model

    def parallelize(self, model: nn.Module, dims: ParallelDims) -> nn.Module:
        p = self.parallel_cfg
        return type(self).parallelize_fn(
            model,
            dims,
            param_dtype=self.param_dtype,
            activation_checkpointing=p.activation_checkpointing,
            compile=p.compile,
        )

    def init_weights(self, model: nn.Module) -> None:
        model.init_weights()
        init_lora(model)

    def initial_weights(self) -> Mapping[str, SliceSource] | None:
        return type(self).sources_fn(self.init_from, self.config) if self.init_from else None
