"""Deterministic samplers for an EDM denoiser ``D(x, σ) -> x̂0``, and classifier-free guidance.

- :func:`sample_heun`: EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1
  without churn): an Euler step along ``dx/dσ = (x - D(x, σ)) / σ``, corrected by the slope at
  the next level (the last step, to σ = 0, is plain Euler). Two denoiser calls per step.
- :func:`sample_multistep`: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), the multistep
  solver in data prediction: one denoiser call per step, 2nd order by reusing the previous
  step's ``x̂0``. The better choice at a small number of steps.

Both take the levels from :func:`cupola.collections.world.diffusion.edm.karras_sigmas` and
report progress through ``callback(step, total)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SAMPLERS", "guided", "sample", "sample_heun", "sample_multistep"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided(cond: Denoiser, uncond: Denoiser | None, guidance: float) -> Denoiser:
    """Classifier-free guidance: ``D_u + w (D_c - D_u)``; ``w = 1`` is the conditional model alone
    (and skips the unconditional call), ``w > 1`` pushes samples towards the prompt."""
    if uncond is None or guidance == 1.0:
        return cond

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_u = uncond(x, sigma)
        return d_u + guidance * (cond(x, sigma) - d_u)

    return denoise


def _progress(callback: Callable[[int, int], None] | None, i: int, n: int) -> None:
    if callback is not None:
        callback(i + 1, n)


@torch.no_grad()
def sample_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``x`` (noise at ``sigmas[0]``) to ``sigmas[-1] = 0``; returns ``x̂0``."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s.to(x.dtype))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next, s_next.to(x.dtype))) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
        _progress(callback, i, n)
    return x


@torch.no_grad()
def sample_multistep(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) with ``λ = -ln σ``; the first step (and the last, to σ = 0) is 1st order."""
    n = len(sigmas) - 1
    prev = None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, s.to(x.dtype))
        if s_next == 0:
            x = x0
        else:
            h = s.log() - s_next.log()  # λ_next - λ > 0
            if prev is not None:
                h_prev = sigmas[i - 1].log() - s.log()
                r = h_prev / h
                x0_hat = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev
            else:
                x0_hat = x0
            x = (s_next / s) * x - torch.expm1(-h) * x0_hat
        prev = x0
        _progress(callback, i, n)
    return x


SAMPLERS = {"heun": sample_heun, "multistep": sample_multistep}


def sample(
    kind: str,
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[kind](denoise, x, sigmas, callback)
