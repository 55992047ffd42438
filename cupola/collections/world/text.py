"""Text encoders that condition world models on prompts (cross-attention context).

Two kinds, chosen by :class:`TextEncoderConfig.kind`:

- ``"bytes"`` (the default): a small byte-level transformer, part of the model and trained with
  it — no tokenizer file and no download, enough for the prompts of the generated datasets.
- ``"t5"``: a frozen Hugging Face T5 encoder read from a local folder (``path``; Cosmos-1.0 uses
  T5-11B's encoder, 1024 wide), via transformers. It stays outside the trained model: its
  embeddings are computed under ``no_grad`` and never enter checkpoints.

Both return ``(context_B_L_D, mask_B_L)`` with at least one valid position per prompt (a BOS
byte, or T5's EOS), so the empty prompt ``""`` — the unconditional branch of classifier-free
guidance — has a well-defined (learned) embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cupola.toolkit.config import check_choice, config_error
from cupola.toolkit.modules.attention import Attention
from cupola.toolkit.modules.mlp import SwiGLU
from cupola.toolkit.modules.norms import RMSNorm

__all__ = [
    "TEXT_ENCODERS",
    "ByteTextEncoder",
    "T5TextEncoder",
    "TextEncoderConfig",
    "load_t5_encoder",
]

TEXT_ENCODERS = ("bytes", "t5")
_BOS, _PAD = 256, 257  # byte values are 0..255


@dataclass(kw_only=True, slots=True)
class TextEncoderConfig:
    """``kind="bytes"``: a ``n_layers``-deep, ``dim``-wide byte transformer over at most
    ``max_length`` bytes (longer prompts are an error, not silently cut). ``kind="t5"``: the T5
    encoder in the local folder ``path``; ``dim`` must equal its ``d_model`` (1024 for T5-11B, 4096 for T5 v1.1 XXL),
    prompts are cut at ``max_length`` T5 tokens (Cosmos: 512)."""

    kind: str = "bytes"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_length: int = 128
    path: str | None = None

    def validate(self) -> None:
        check_choice(self, "kind", self.kind, TEXT_ENCODERS)
        if self.kind == "t5" and not self.path:
            raise config_error(
                self, "path", self.path, "kind='t5' needs a local T5 folder (config.json + weights)"
            )
        if self.kind == "bytes" and self.path:
            raise config_error(
                self, "path", self.path, "only kind='t5' reads a path; remove it or set kind='t5'"
            )
        if self.dim < 1 or self.max_length < 2:
            raise config_error(self, "max_length", self.max_length, "must be >= 2 (and dim >= 1)")
        if self.kind == "bytes" and self.dim % self.n_heads:
            raise config_error(self, "n_heads", self.n_heads, f"must divide dim={self.dim}")


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, n_heads, causal=False)
        self.mlp = SwiGLU(dim, 4 * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class ByteTextEncoder(nn.Module):
    """UTF-8 bytes (after a BOS byte) → embeddings + learned positions → bidirectional blocks → RMSNorm."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.embed = nn.Embedding(258, cfg.dim)
        self.pos = nn.Parameter(torch.empty(cfg.max_length, cfg.dim))
        self.blocks = nn.ModuleList(_Block(cfg.dim, cfg.n_heads) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)

    def init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        out_std = 0.02 / (2 * self.cfg.n_layers) ** 0.5
        for block in self.blocks:
            block.attn.init_weights(0.02, out_std)
            block.mlp.init_weights(0.02, out_std)
            block.norm1.reset_parameters()
            block.norm2.reset_parameters()
        self.norm.reset_parameters()

    def tokenize(self, prompts: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids_B_L, mask_B_L)``: BOS + the prompt's UTF-8 bytes, padded to the longest prompt."""
        rows = []
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
            data = p.encode("utf-8")
            if len(data) + 1 > self.cfg.max_length:
                raise ValueError(
                    f"prompt of {len(data)} bytes is longer than the text encoder's max_length - 1 = "
                    f"{self.cfg.max_length - 1}: shorten it or raise text.max_length (a new model)"
                )
            rows.append([_BOS, *data])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), _PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        ids = ids.to(device)
        return ids, ids != _PAD

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts, self.pos.device)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        attn_mask = mask[:, None, None, :]  # padding keys are never attended
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x), mask


class T5TextEncoder:
    """A frozen T5 encoder from a local folder (not an ``nn.Module`` of the trained model: its weights
    never enter checkpoints or the optimizer). Padding positions' embeddings are zeroed."""

    def __init__(
        self, cfg: TextEncoderConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.cfg = cfg
        self.model, self.tokenizer = load_t5_encoder(cfg.path, device, dtype)
        self.dim = self.model.config.d_model
        if self.dim != cfg.dim:
            raise config_error(
                cfg,
                "dim",
                cfg.dim,
                f"the T5 encoder in {cfg.path} is {self.dim} wide; set text.dim={self.dim}",
            )

    def to(self, device: torch.device | str) -> T5TextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(prompts),
            max_length=self.cfg.max_length,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        ).to(device)
        mask = batch["attention_mask"].bool()
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        return out * mask[..., None], mask


def load_t5_encoder(path: str | None, device: torch.device | str, dtype: torch.dtype):
    """``(T5EncoderModel, tokenizer)`` from a local folder, frozen and in eval mode; never downloads."""
    from transformers import AutoTokenizer, T5EncoderModel

    folder = Path(str(path)).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder: {folder} is not a local T5 folder (no config.json); save one with "
            "T5EncoderModel.save_pretrained + its tokenizer's save_pretrained, or use kind='bytes'"
        )
    model = T5EncoderModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer
