"""AdamW and warmup + cosine/linear/constant learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from cupola.toolkit.training.configs import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup to ``lr``, then decay to ``min_lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave 1-D parameters (norm scales, biases) undecayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _adamw_update(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, h: torch.Tensor, work: torch.Tensor
) -> None:
    """One AdamW step on flat fp32 ``p``, ``m``, ``v`` from gradient ``g`` (any float dtype), writing
    ``work`` (the low-precision working copy) too. ``h``: ``[lr, beta1, beta2, eps, lr * weight_decay,
    lr / bias_correction1, sqrt(bias_correction2)]`` as a tensor, so that changing the learning rate
    does not recompile. The operations are torch.optim.AdamW's (decoupled decay, then the update)."""
    _lr, beta1, beta2, eps, lr_wd, step_size, bc2_sqrt = h.unbind()  # lr enters through lr_wd, step_size
    g = g.float()
    p_new = p * (1 - lr_wd)
    m_new = m.lerp(g, 1 - beta1)
    v_new = v * beta2 + (1 - beta2) * g * g
    p_new = p_new - step_size * (m_new / (v_new.sqrt() / bc2_sqrt + eps))
    p.copy_(p_new)
    m.copy_(m_new)
    v.copy_(v_new)
    work.copy_(p_new)


_COMPILED_UPDATE = None


def _fused_update():
    """``_adamw_update`` compiled once (dynamic shapes): one fused kernel per parameter on GPU."""
    global _COMPILED_UPDATE
    if _COMPILED_UPDATE is None:
        _COMPILED_UPDATE = torch.compile(_adamw_update, dynamic=True, fullgraph=True)
    return _COMPILED_UPDATE


class MixedPrecisionAdamW(torch.optim.AdamW):
    """AdamW on fp32 master weights whose gradients arrive on bf16 working copies.

    For a model under :func:`~cupola.toolkit.parallel.mixed_precision.apply_mixed_precision` (one
    process): the forward runs on persistent bf16 copies of the parameters and the backward leaves
    bf16 gradients on them. Each step reads those gradients, updates the fp32 parameter and the
    fp32 moments as :class:`torch.optim.AdamW` does, and writes the new bf16 copy in the same pass
    (on CUDA one compiled kernel per parameter: 28 bytes of memory traffic per parameter, against 40
    for casting in forward, casting gradients in backward and a separate AdamW). The state (``step``,
    ``exp_avg``, ``exp_avg_sq``) and ``param_groups`` are AdamW's, so checkpoints are interchangeable.

    Gradients accumulated over several micro-batches would add up in bf16: use this with one
    micro-batch per step (``build_optimizer`` does) and plain AdamW on fp32 gradients otherwise.
    """

    def __init__(self, params, mixed_precision, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.mixed_precision = mixed_precision
        mixed_precision.enable_working_copies()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.mixed_precision.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mp = self.mixed_precision
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper: dict[tuple, torch.Tensor] = {}
            for p in group["params"]:
                g = mp.grad(p)
                if g is None:
                    continue
                if torch.is_complex(p) or g.is_sparse:
                    raise RuntimeError("MixedPrecisionAdamW supports dense real parameters only")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                key = (p.device, step)
                if key not in hyper:
                    lr = float(group["lr"])
                    values = [lr, beta1, beta2, group["eps"], lr * group["weight_decay"]]
                    values += [lr / (1 - beta1**step), math.sqrt(1 - beta2**step)]
                    hyper[key] = torch.tensor(values, dtype=torch.float32, device=p.device)
                work = mp.working_copy(p)
                update = _fused_update() if p.is_cuda else _adamw_update
                update(
                    p.view(-1),
                    g.view(-1),
                    state["exp_avg"].view(-1),
                    state["exp_avg_sq"].view(-1),
                    hyper[key],
                    (work if work is not p else p).detach().view(-1),
                )
                mp.mark_synced(p)
        return loss


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, working_copies: bool = True
) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters. A single-process mixed-precision model
    (``apply_mixed_precision``) with ``working_copies`` (one micro-batch per step) gets
    :class:`MixedPrecisionAdamW`; everything else torch's AdamW (fused on GPU)."""
    on_cuda = any(p.is_cuda for p in model.parameters())
    mp = getattr(model, "_cupola_mp", None)
    if mp is not None and working_copies:
        return MixedPrecisionAdamW(
            param_groups(model, cfg.weight_decay), mp, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
        )
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        # fused kernels on GPU; the foreach path on CPU (fused AdamW with DTensor on CPU is not universal)
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)
