"""The optional adversarial stage of tokenizer training: a 3D PatchGAN discriminator and hinge
losses, trained with the tokenizer by the one optimizer and the one backward pass.

    L_D = mean relu(1 - D(x)) + mean relu(1 + D(y.detach()))            (the discriminator's loss)
    L_G = -mean D(y)                                                      (the tokenizer's adversarial loss)
    total = L_rec + w L_G + L_D + w mean D(y.detach())

The last term has the same value as ``-w L_G`` and, with respect to the discriminator's weights,
the opposite gradient (``y`` and ``y.detach()`` are the same numbers), so it cancels exactly what
``w L_G`` would teach the discriminator; it sends nothing to the tokenizer (detached). So the
tokenizer gets ``grad(L_rec + w L_G)`` and the discriminator ``grad(L_D)`` from one backward, and
FSDP, gradient clipping, checkpoints and resume work as for any single-optimizer model.
``w`` is 0 before ``adversarial_start_step``: the discriminator still gets (zero-weighted)
gradients, so its optimizer state exists in every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cupola.collections.world.tokenizers.model import VideoTokenizer

__all__ = ["PatchDiscriminator3D", "TokenizerWithDiscriminator", "adversarial_losses"]


class PatchDiscriminator3D(nn.Module):
    """Real/fake logits per space-time patch of a video ``[B, 3, T, H, W]`` in [-1, 1]."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Conv3d(3, channels, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = channels
        for i in range(1, layers):
            out = channels * min(2**i, 8)
            blocks += [
                nn.Conv3d(ch, out, (3, 4, 4), stride=(2 if i > 1 else 1, 2, 2), padding=1),
                nn.GroupNorm(1, out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        blocks.append(nn.Conv3d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x_B_3_T_H_W: torch.Tensor) -> torch.Tensor:
        return self.net(x_B_3_T_H_W)


class TokenizerWithDiscriminator(nn.Module):
    """What trains in the adversarial stage: ``tokenizer`` (saved under ``tokenizer.``) and
    ``discriminator``; ``forward`` is the tokenizer's reconstruction."""

    def __init__(self, tokenizer: VideoTokenizer, discriminator: PatchDiscriminator3D) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.discriminator = discriminator

    @property
    def cfg(self):
        return self.tokenizer.cfg

    def forward(self, x_B_3_T_H_W: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(x_B_3_T_H_W)


def adversarial_losses(
    discriminator: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The adversarial part of the total loss (see the module docstring) and its terms for logging."""
    fake_detached = discriminator(y.detach())
    real = discriminator(x)
    d_loss = F.relu(1 - real).mean() + F.relu(1 + fake_detached).mean()
    g_loss = -discriminator(y).mean()
    total = weight * g_loss + d_loss + weight * fake_detached.mean()
    return total, {"adversarial_g": g_loss.detach(), "adversarial_d": d_loss.detach()}
