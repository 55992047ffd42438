"""EDM (Karras et al. 2022, arXiv 2206.00364) preconditioning, noise levels and loss weighting, as
Cosmos' diffusion WFMs use them.

The network ``F`` never sees raw noisy latents: the denoiser is
``D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))`` with

- ``c_skip = σ_d² / (σ² + σ_d²)``, ``c_out = σ σ_d / sqrt(σ² + σ_d²)``, ``c_in = 1 / sqrt(σ² + σ_d²)``,
- ``c_noise = ¼ ln σ``,

so ``F``'s input and target both have unit variance at every noise level. Training draws
``ln σ ~ N(p_mean, p_std²)`` and weights the squared error by ``λ(σ) = (σ² + σ_d²) / (σ σ_d)²``,
which makes the effective loss on ``F`` unit-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cupola.toolkit.config import config_error

__all__ = ["EDMConfig", "edm_loss_weight", "edm_scalings", "karras_sigmas", "sample_sigmas"]


@dataclass(kw_only=True, slots=True)
class EDMConfig:
    """``sigma_data``: the latents' standard deviation (0.5, as Cosmos). ``p_mean``/``p_std``: the
    log-normal training noise. ``sigma_min``/``sigma_max``/``rho``: the sampling schedule.
    ``cond_sigma_mean``/``cond_sigma_std``: the log-normal noise that augments Video2World's
    conditioning latents in training (so the model tolerates imperfect context, e.g. its own earlier
    output); ``cond_sigma``: the augmentation used when generating."""

    sigma_data: float = 0.5
    p_mean: float = 0.0
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    cond_sigma_mean: float = -4.6  # ln 0.01
    cond_sigma_std: float = 1.0
    cond_sigma: float = 0.01

    def validate(self) -> None:
        for name in ("sigma_data", "p_std", "sigma_min", "rho", "cond_sigma_std", "cond_sigma"):
            if not getattr(self, name) > 0:
                raise config_error(self, name, getattr(self, name), "must be > 0")
        if not self.sigma_max > self.sigma_min:
            raise config_error(self, "sigma_max", self.sigma_max, f"must exceed sigma_min={self.sigma_min}")


def edm_scalings(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` (any shape)."""
    sd2 = sigma_data**2
    total = sigma**2 + sd2
    return sd2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), 0.25 * sigma.log()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """``λ(σ) = (σ² + σ_d²) / (σ σ_d)²``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigmas(
    n: int, mean: float, std: float, *, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` noise levels with ``ln σ ~ N(mean, std²)`` (fp32)."""
    z = torch.randn(n, generator=generator, device=device if generator is None else generator.device)
    return (mean + std * z).exp().to(device)


def karras_sigmas(
    steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """EDM's sampling schedule: ``steps`` levels from ``sigma_max`` down to ``sigma_min``, evenly spaced in
    ``σ^(1/ρ)``, then a final 0 (``[steps + 1]``, float64)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: sampling needs at least one step")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64, device=device)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])
