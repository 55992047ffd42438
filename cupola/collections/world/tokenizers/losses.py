"""Reconstruction losses of tokenizer training (Cosmos Tokenizer §3.3): L1 on pixels always; a
perceptual loss and a Gram-matrix (texture) loss on VGG-16 features when the VGG weights are given
as a local file (nothing is downloaded: without them both are skipped, said once in the log).

    total = l1 * |x - y|  +  perceptual * sum_l mean |phi_l(x)/|phi_l(x)| - phi_l(y)/|phi_l(y)||^2 (x lpips w_l)
            + gram(step) * sum_l |G(phi_l(x)) - G(phi_l(y))|_1        G = phi phi^T / (C H W)

The Gram weight is 0 before ``gram_start_step`` (Cosmos adds it in its second stage, for sharpness).
VGG weights: a torchvision ``vgg16`` state dict (``features.N.weight``); LPIPS linear heads
(``lin{0..4}.model.1.weight``, the ``lpips`` package's ``vgg.pth``) optional on top. Frames are
scored as images (``B*T``), in [-1, 1] mapped to ImageNet normalisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cupola.toolkit.config import config_error

__all__ = ["ReconstructionLoss", "ReconstructionLossConfig", "VGGFeatures"]

log = logging.getLogger(__name__)

# torchvision's vgg16 ``features``: convolutions (output channels) and max-pools ("M")
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS' layers)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass(kw_only=True, slots=True)
class ReconstructionLossConfig:
    l1: float = 1.0
    perceptual: float = 0.1
    gram: float = 0.0
    gram_start_step: int = 0
    vgg_weights: str | None = None  # local torchvision vgg16 state dict (.pth / .safetensors)
    lpips_weights: str | None = None  # local LPIPS linear heads for the VGG layers (optional)
    # the adversarial stage (0: none): a 3D PatchGAN discriminator trains with the tokenizer
    adversarial: float = 0.0
    adversarial_start_step: int = 0
    discriminator_channels: int = 64

    def validate(self) -> None:
        for name in ("l1", "perceptual", "gram", "adversarial"):
            if getattr(self, name) < 0:
                raise config_error(self, name, getattr(self, name), "must be >= 0")
        for name in ("vgg_weights", "lpips_weights"):
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().is_file():
                raise config_error(
                    self, name, path, "is not a file; give a local weights file or None (skip)"
                )
        if self.lpips_weights and not self.vgg_weights:
            raise config_error(self, "lpips_weights", self.lpips_weights, "needs vgg_weights too")


def _load(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class VGGFeatures(nn.Module):
    """VGG-16's convolutional trunk, frozen, returning the five LPIPS taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU()]
                channels = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str) -> VGGFeatures:
        model = cls()
        state = {k: v for k, v in _load(str(Path(path).expanduser())).items() if k.startswith("features.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} is not a torchvision vgg16 state dict: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        return model.eval()

    def forward(self, x_N_3_H_W: torch.Tensor) -> list[torch.Tensor]:
        h = ((x_N_3_H_W + 1) / 2 - self.mean.to(x_N_3_H_W.dtype)) / self.std.to(x_N_3_H_W.dtype)
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                taps.append(h)
                if len(taps) == len(_TAPS):
                    break
        return taps


def _gram(f: torch.Tensor) -> torch.Tensor:
    N, C, H, W = f.shape
    flat = f.reshape(N, C, H * W).float()
    return flat @ flat.transpose(1, 2) / (C * H * W)


class ReconstructionLoss(nn.Module):
    """``forward(x, y, step) -> (total, {term: value})`` for videos ``[B, 3, T, H, W]`` in [-1, 1]."""

    def __init__(self, cfg: ReconstructionLossConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vgg = VGGFeatures.from_file(cfg.vgg_weights) if cfg.vgg_weights else None
        self.lpips: list[torch.Tensor] | None = None
        if cfg.lpips_weights:
            heads = _load(str(Path(cfg.lpips_weights).expanduser()))
            self.lpips = [heads[f"lin{i}.model.1.weight"].float() for i in range(len(_TAPS))]
        if self.vgg is None and (cfg.perceptual or cfg.gram):
            log.warning(
                "tokenizer loss: no vgg_weights given, so the perceptual and Gram losses are skipped "
                "(L1 only); pass a local torchvision vgg16 state dict to use them"
            )

    def forward(
        self, x_B_3_T_H_W: torch.Tensor, y_B_3_T_H_W: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        terms = {"l1": (y_B_3_T_H_W - x_B_3_T_H_W).abs().mean()}
        gram_weight = cfg.gram if step >= cfg.gram_start_step else 0.0
        if self.vgg is not None and (cfg.perceptual or gram_weight):
            frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731  [B*T, 3, H, W]
            fx = self.vgg(frames(x_B_3_T_H_W))
            fy = self.vgg(frames(y_B_3_T_H_W))
            if cfg.perceptual:
                perceptual = 0.0
                for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
                    a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                    b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                    d = (a - b) ** 2
                    d = (d * self.lpips[i].to(d).view(1, -1, 1, 1)).sum(1) if self.lpips else d.sum(1)
                    perceptual = perceptual + d.mean()
                terms["perceptual"] = perceptual
            if gram_weight:
                terms["gram"] = sum(F.l1_loss(_gram(a), _gram(b)) for a, b in zip(fx, fy, strict=True))
        weights = {"l1": cfg.l1, "perceptual": cfg.perceptual, "gram": gram_weight}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms
