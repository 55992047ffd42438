"""ViT vision tower with Hugging Face ``SiglipVisionModel`` weights (SigLIP, SigLIP-so400m).

    pixels_N_C_S_S  (SigLIP-normalised: mean = std = 0.5, values in [-1, 1])
    --patch_embed-->  Conv2d(C, dim, kernel = stride = patch_size, bias)     [N, dim, g, g], g = S // patch
    --flatten + pos_embed-->  x_N_P_C, P = g * g (raster order: row-major)
    --layers[0 .. k-1]-->  pre-norm blocks, k = the number of layers ``select_layer`` keeps:
          h = x + attention(LayerNorm(x))           bidirectional, biases on q, k, v, o (SDPA)
          x = h + fc2(gelu_tanh(fc1(LayerNorm(h))))
    --post_layernorm (only when every layer ran)-->  features [N, P, dim]

``select_layer`` indexes HF's ``hidden_states``: 0 is the patch + position embeddings, i the output
of layer i, negatives count from the end. VILA / LongVILA take -2, the second-to-last layer's output
without any final norm. The last hidden state (-1, or n_layers) is HF's ``last_hidden_state``,
i.e. after ``post_layernorm``. Every layer is built, so checkpoints load whole; the forward stops at
the selected one (the layers after it get no gradient).

``image_size`` need not be a multiple of ``patch_size``: like HF's "valid" convolution, the last
``image_size % patch_size`` pixel rows and columns are not seen (SigLIP-so400m at 384 px: 27 x 14 = 378).
There is no position-embedding interpolation: inputs must be ``image_size`` square.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cupola.toolkit.config import ConfigError, config_error, suggest
from cupola.toolkit.modules import Attention, LayerNorm

__all__ = [
    "VISION_FLAVORS",
    "VisionBlock",
    "VisionConfig",
    "VisionMLP",
    "VisionTower",
    "vision_config",
]


@dataclass(kw_only=True, slots=True)
class VisionConfig:
    image_size: int
    patch_size: int
    num_channels: int = 3
    dim: int
    n_layers: int
    n_heads: int
    mlp_hidden_size: int
    layer_norm_eps: float = 1e-6
    # Which HF hidden state the VLM reads: 0 = embeddings, i = output of layer i, -1 = last_hidden_state
    # (after post_layernorm). VILA / LongVILA: -2.
    select_layer: int = -2

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def layers_run(self) -> int:
        """Encoder layers the forward runs (``select_layer`` as a non-negative hidden-state index)."""
        return self.select_layer % (self.n_layers + 1)

    def validate(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "dim",
            "n_layers",
            "n_heads",
            "mlp_hidden_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise config_error(self, name, value, "must be an integer >= 1")
        if self.patch_size > self.image_size:
            raise config_error(
                self, "patch_size", self.patch_size, f"must be <= image_size ({self.image_size})"
            )
        if self.dim % self.n_heads:
            raise config_error(self, "dim", self.dim, f"must be divisible by n_heads ({self.n_heads})")
        if not self.layer_norm_eps > 0:
            raise config_error(self, "layer_norm_eps", self.layer_norm_eps, "must be > 0")
        lo, hi = -(self.n_layers + 1), self.n_layers
        s = self.select_layer
        if not isinstance(s, int) or isinstance(s, bool) or not lo <= s <= hi:
            raise config_error(
                self,
                "select_layer",
                s,
                f"must be an integer in [{lo}, {hi}] (an index into the n_layers + 1 hidden states; "
                "VILA uses -2)",
            )


# Sizes, with the source of each number. "tiny" is for CPU tests and demos.
VISION_FLAVORS: dict[str, VisionConfig] = {
    # 32 px, 8 px patches: a 4 x 4 grid (16 patches -> 4 tokens after the 2 x 2 projector merge).
    "tiny": VisionConfig(image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4, mlp_hidden_size=128),
    # https://huggingface.co/google/siglip-so400m-patch14-384/blob/main/config.json ("vision_config";
    # layer_norm_eps is SiglipVisionConfig's default, 1e-6). 27 x 27 = 729 patches; the vision tower
    # of VILA 1.5 / LongVILA, which read layer -2.
    "siglip_so400m_384": VisionConfig(
        image_size=384,
        patch_size=14,
        dim=1152,
        n_layers=27,
        n_heads=16,
        mlp_hidden_size=4304,
        layer_norm_eps=1e-6,
        select_layer=-2,
    ),
}


def vision_config(flavor: str, **overrides: object) -> VisionConfig:
    """A validated copy of ``VISION_FLAVORS[flavor]`` with ``overrides`` applied."""
    if flavor not in VISION_FLAVORS:
        raise ConfigError(
            f"unknown vision flavor {flavor!r}.{suggest(flavor, VISION_FLAVORS)} "
            f"Available flavors: {', '.join(VISION_FLAVORS)}"
        )
    cfg = copy.deepcopy(VISION_FLAVORS[flavor])
    names = [f.name for f in dataclasses.fields(VisionConfig)]
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(
                f"VisionConfig: unknown field {key!r}.{suggest(key, names)} Valid fields: {', '.join(names)}"
            )
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


class VisionMLP(nn.Module):
    """``fc2(gelu_tanh(fc1 x))`` with biases (HF ``hidden_act="gelu_pytorch_tanh"``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """``h = x + attention(norm(x)); out = h + feed_forward(norm(h))``, bidirectional."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = LayerNorm(cfg.dim, cfg.layer_norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, causal=False, bias=True)
        self.ffn_norm = LayerNorm(cfg.dim, cfg.layer_norm_eps)
        self.feed_forward = VisionMLP(cfg.dim, cfg.mlp_hidden_size)

    def forward(self, x_N_P_C: torch.Tensor) -> torch.Tensor:
        h = x_N_P_C + self.attention(self.attention_norm(x_N_P_C))
        return h + self.feed_forward(self.ffn_norm(h))


class VisionTower(nn.Module):
    """SigLIP-compatible ViT: pixels ``[N, C, S, S]`` -> features ``[N, num_patches, dim]`` (module docstring)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(
            cfg.num_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.pos_embed = nn.Embedding(cfg.num_patches, cfg.dim)
        # A ModuleList (names layers.{i}) so that parallelize_vila can wrap each block in place.
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers))
        self.post_layernorm = LayerNorm(cfg.dim, cfg.layer_norm_eps)
        if self.patch_embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter; deterministic given the RNG seed, valid after ``to_empty()``.

        SigLIP's own scheme (a tower trained from scratch; pretrained ones are loaded instead): LeCun
        normal patch embedding, N(0, 1/dim) position embeddings, Xavier-uniform attention and MLP
        weights, zero biases, unit LayerNorms.
        """
        fan_in = self.cfg.num_channels * self.cfg.patch_size**2
        nn.init.normal_(self.patch_embed.weight, std=1.0 / math.sqrt(fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.pos_embed.weight, std=1.0 / math.sqrt(self.cfg.dim))
        for layer in self.layers:
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
            a, m = layer.attention, layer.feed_forward
            for linear in (a.wq, a.wk, a.wv, a.wo, m.fc1, m.fc2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
        self.post_layernorm.reset_parameters()

    def forward(self, pixels_N_C_S_S: torch.Tensor) -> torch.Tensor:
        """Features ``[N, num_patches, dim]`` of hidden state ``cfg.select_layer``."""
        cfg = self.cfg
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixels_N_C_S_S.dim() != 4 or tuple(pixels_N_C_S_S.shape[1:]) != want:
            raise ValueError(
                f"VisionTower expects pixels [N, {want[0]}, {want[1]}, {want[2]}] (VisionConfig.image_size="
                f"{cfg.image_size}); got {list(pixels_N_C_S_S.shape)}. Resize frames before the tower"
            )
        x_N_C_G_G = self.patch_embed(pixels_N_C_S_S.to(self.patch_embed.weight.dtype))
        x_N_P_C = x_N_C_G_G.flatten(2).transpose(1, 2) + self.pos_embed.weight
        for layer in self.layers[: cfg.layers_run]:
            x_N_P_C = layer(x_N_P_C)
        if cfg.layers_run == cfg.n_layers:  # the last hidden state: HF's last_hidden_state
            x_N_P_C = self.post_layernorm(x_N_P_C)
        return x_N_P_C
