"""Low-rank adapters (LoRA, arXiv 2106.09685) on chosen linear layers, LongLoRA-style training
(arXiv 2309.12307: adapters on the attention projections, embeddings and norms trained in full).

``y = x W^T + b + scale * (dropout(x) A^T) B^T`` with ``A [rank, in]`` (Kaiming-uniform) and
``B [out, rank]`` (zeros), so an adapted model computes exactly what the base model did until it
trains; ``scale = alpha / rank``. The base ``weight`` keeps its name, so base checkpoints load
unchanged and the adapters sit beside it as ``<linear>.lora_a`` / ``.lora_b`` / ``.lora_scale``
(the scale is a buffer, so a checkpoint says how to merge itself).

Checkpoints of a LoRA run keep the adapters (an interrupted run resumes with them and their
optimizer state); anything that *starts* from such a checkpoint — the next training stage,
generation, evaluation — reads merged weights (:func:`merge_lora_weights`), a plain model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cupola.toolkit.config import config_error

__all__ = [
    "LORA_SUFFIXES",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "init_lora",
    "is_lora_name",
    "merge_lora_weights",
    "set_lora_trainable",
]

LORA_SUFFIXES = (".lora_a", ".lora_b", ".lora_scale")


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    """Which linear layers get adapters and what else trains beside them.

    Defaults follow LongLoRA's context-extension setting: rank 8, alpha 16, adapters on the four
    attention projections (``targets`` are attribute names of ``nn.Linear`` modules, e.g. ``wq``),
    token embeddings and every norm trained in full, all other weights frozen.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    train_embeddings: bool = True
    train_norms: bool = True

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise config_error(self, "rank", self.rank, "must be an integer >= 1")
        if not self.alpha > 0:
            raise config_error(self, "alpha", self.alpha, "must be > 0 (the adapter's scale is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise config_error(self, "dropout", self.dropout, "must be in [0, 1)")
        if not self.targets:
            raise config_error(
                self, "targets", self.targets, "name at least one linear layer, e.g. ['wq', 'wv']"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a rank-``rank`` update; built from an existing linear layer, keeping its
    ``weight``/``bias`` parameters (so it works on the meta device and under any later sharding)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.register_buffer("lora_scale", torch.empty((), device=base.weight.device, dtype=torch.float32))
        self.alpha, self.rank = float(alpha), rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if base.weight.device.type != "meta":
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """Fresh adapters: ``A`` Kaiming-uniform, ``B`` zero (the output equals the base layer's)."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        self.lora_scale.fill_(self.alpha / self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + update * self.lora_scale.to(update.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def apply_lora(module: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every ``nn.Linear`` inside ``module`` whose attribute name is in ``cfg.targets`` by a
    :class:`LoRALinear` (in place); returns the replaced modules' names. Apply before parallelism."""
    cfg.validate()
    replaced = []
    for name, parent in list(module.named_modules()):
        for attr, child in list(parent.named_children()):
            if attr in cfg.targets and type(child) is nn.Linear:
                setattr(parent, attr, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                replaced.append(f"{name}.{attr}" if name else attr)
    if not replaced:
        linears = sorted(
            {a for _, p in module.named_modules() for a, c in p.named_children() if isinstance(c, nn.Linear)}
        )
        raise config_error(
            cfg, "targets", list(cfg.targets), f"match no linear layer; this model's are {linears}"
        )
    return replaced


@torch.no_grad()
def init_lora(module: nn.Module) -> None:
    """Reset every adapter in ``module`` (after ``to_empty()`` of a meta-built model)."""
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.reset_lora()


def set_lora_trainable(module: nn.Module, cfg: LoRAConfig) -> None:
    """Freeze ``module`` except its adapters and, per ``cfg``, its embeddings and norms."""
    from cupola.toolkit.modules.norms import LayerNorm, RMSNorm

    module.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.lora_a.requires_grad_(True)
            m.lora_b.requires_grad_(True)
        elif cfg.train_embeddings and isinstance(m, nn.Embedding):
            m.requires_grad_(True)
        elif cfg.train_norms and isinstance(m, (RMSNorm, LayerNorm, nn.LayerNorm)):
            m.requires_grad_(True)


def is_lora_name(name: str) -> bool:
    """Whether a parameter/buffer name belongs to an adapter."""
    return name.endswith(LORA_SUFFIXES)


def merge_lora_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every adapter folded into its base weight (``W + scale * B A``, computed in
    fp32, stored in ``W``'s dtype) and the adapter entries removed; other entries are passed through."""
    out = {k: v for k, v in weights.items() if not is_lora_name(k)}
    for key in weights:
        if not key.endswith(".lora_a"):
            continue
        prefix = key.removesuffix(".lora_a")
        parts = [f"{prefix}.weight", f"{prefix}.lora_b", f"{prefix}.lora_scale"]
        missing = [p for p in parts if p not in weights]
        if missing:
            raise KeyError(f"adapter {key} comes without {missing}; the checkpoint is incomplete")
        w, b, scale = (weights[p] for p in parts)
        delta = (b.float() @ weights[key].float()) * scale.float()
        out[f"{prefix}.weight"] = (w.float() + delta).to(w.dtype)
    return out
