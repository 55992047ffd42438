"""Mixture-of-Experts feed-forward block: a token-choice top-k router and E experts.

    logits_N_E = x @ router.weight.T            (fp32)
    weights_N_K, experts_N_K = route(logits)     (score function, order, ties → lowest index)
    out_N = sum_k weights[n, k] * expert_{experts[n, k]}(x_n)

Tokens are sorted by expert (stably), the experts run on contiguous groups (``torch._grouped_mm``
or a loop of matmuls), and the results are put back in token order and summed with the routing
weights. The sum over the k choices is a plain reduction, not a scatter-add, so forward and
backward are deterministic on GPU too.

The experts module takes ``(x_M_C sorted by expert, counts_E)`` and returns ``y_M_C`` in the same
order. Expert parallelism (``cupola.toolkit.parallel.expert.apply_ep``) wraps exactly that call
with an all-to-all dispatch and combine, so this file stays single-device code.

Losses: the load-balancing loss (Switch / GShard) and the router z-loss (ST-MoE) are added to
the gradient by :class:`MoEAuxLossAutoScaler` (Megatron's trick) attached to the routing weights,
so the caller never sees them; :func:`moe_stats` reads their detached values for logging.

Capacity (``capacity_factor`` set): each expert keeps its ``ceil(tokens * top_k / E * cf)``
highest-weight assignments and the rest are dropped (they add nothing; the residual carries the
token). Dropless routing has static shapes; with capacity the number of kept rows is
data-dependent (torch.compile handles it with unbacked sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from cupola.toolkit.config import check_choice, config_error

__all__ = [
    "MOE_MLPS",
    "ROUTER_ORDERS",
    "SCORE_FUNCS",
    "Experts",
    "GroupedLinear",
    "MoE",
    "MoEAuxLossAutoScaler",
    "MoEConfig",
    "capacity_keep_mask",
    "expert_capacity",
    "moe_stats",
    "route",
    "set_moe_loss_scale",
    "stable_topk",
]

MOE_MLPS = ("swiglu", "squared_relu")
SCORE_FUNCS = ("softmax", "sigmoid")
ROUTER_ORDERS = ("topk_then_softmax", "softmax_then_topk")
EXPERT_IMPLS = ("auto", "grouped", "reference")


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    num_experts: int
    top_k: int
    expert_hidden_size: int  # FFN width of each expert
    mlp: str = "swiglu"  # "swiglu" | "squared_relu" (non-gated, Nemotron style)
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    # "topk_then_softmax": Mixtral-style, the k weights sum to 1 (renormalised);
    # "softmax_then_topk": the k largest probabilities of a softmax over all E, not renormalised.
    router_order: str = "topk_then_softmax"
    aux_loss_coeff: float = 1e-2  # load balancing (Switch/GShard): E * sum_e f_e * P_e
    z_loss_coeff: float = 0.0  # router z-loss (ST-MoE): mean(logsumexp(logits)^2)
    capacity_factor: float | None = None  # None: dropless; else ceil(tokens * top_k / E * cf) per expert

    def validate(self) -> None:
        for name in ("num_experts", "top_k", "expert_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise config_error(self, name, value, "must be an integer >= 1")
        if self.top_k > self.num_experts:
            raise config_error(
                self,
                "top_k",
                self.top_k,
                f"must be <= num_experts ({self.num_experts}): each token picks distinct experts",
            )
        check_choice(self, "mlp", self.mlp, MOE_MLPS)
        check_choice(self, "score_func", self.score_func, SCORE_FUNCS)
        check_choice(self, "router_order", self.router_order, ROUTER_ORDERS)
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise config_error(self, name, value, "must be a number >= 0 (0 turns the loss off)")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0):
            raise config_error(self, "capacity_factor", cf, "must be > 0, or None for dropless routing")


# ---------------------------------------------------------------------------------------------
# Routing


def stable_topk(values_N_E: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, ties broken towards the lowest index (``torch.topk`` promises no order)."""
    values, indices = torch.sort(values_N_E, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def route(
    logits_N_E: torch.Tensor, top_k: int, score_func: str, router_order: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weights_N_K, experts_N_K, probs_N_E)`` from fp32 router logits.

    ``experts_N_K`` is ordered by descending logit (ties: lowest expert index first); both score
    functions are monotonic, so the choice is made on the logits. ``probs_N_E`` is the
    distribution over all experts that the load-balancing loss uses: the softmax, or the
    sigmoid scores normalised to sum 1 (as Megatron and DeepSeek-V3 do for sigmoid routers).
    """
    _, experts_N_K = stable_topk(logits_N_E, top_k)
    if score_func == "softmax":
        probs_N_E = torch.softmax(logits_N_E, dim=-1)
        if router_order == "softmax_then_topk":
            weights_N_K = probs_N_E.gather(-1, experts_N_K)
        else:
            weights_N_K = torch.softmax(logits_N_E.gather(-1, experts_N_K), dim=-1)
    elif score_func == "sigmoid":
        scores_N_E = torch.sigmoid(logits_N_E)
        probs_N_E = scores_N_E / (scores_N_E.sum(-1, keepdim=True) + 1e-20)
        weights_N_K = scores_N_E.gather(-1, experts_N_K)
        if router_order == "topk_then_softmax":
            weights_N_K = weights_N_K / (weights_N_K.sum(-1, keepdim=True) + 1e-20)
    else:
        raise config_error("MoEConfig", "score_func", score_func, f"choose one of {list(SCORE_FUNCS)}")
    return weights_N_K, experts_N_K, probs_N_E


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(tokens * top_k / E * cf)`` (Megatron's ``get_capacity``)."""
    return math.ceil((num_tokens * top_k / num_experts) * capacity_factor)


def capacity_keep_mask(
    weights_N_K: torch.Tensor, experts_N_K: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which (token, choice) assignments fit: each expert keeps its ``capacity`` highest-weight
    assignments (Megatron's "probs" drop policy); equal weights keep the earlier token."""
    flat_w, flat_e = weights_N_K.reshape(-1), experts_N_K.reshape(-1)
    by_weight = torch.argsort(flat_w, descending=True, stable=True)
    order = by_weight[torch.argsort(flat_e[by_weight], stable=True)]  # by expert, then weight desc
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=flat_e.device)
    counts_E.scatter_add_(0, flat_e, torch.ones_like(flat_e))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E[flat_e[order]]
    keep = torch.empty_like(flat_e, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(experts_N_K)


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``output``; its backward hands ``loss`` a gradient of 1.

    So ``loss`` (already multiplied by its coefficients) reaches the router's gradient whenever
    anything computed from ``output`` (here: the routing weights) is back-propagated — inside
    activation checkpointing and torch.compile too — without the caller adding it to the objective.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        (loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(loss)


# ---------------------------------------------------------------------------------------------
# Experts


def _use_grouped_mm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``torch._grouped_mm`` for ``impl="auto"``: CUDA, bf16 activations (the one dtype torch.compile's
    meta kernel accepts; eager CPU also takes fp32), bf16 or fp32 weights, 16-byte aligned rows."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        return False
    return all(
        w.dtype in (x.dtype, torch.float32) and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights
    )


class GroupedLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e].T`` for tokens grouped by expert (``offsets_E``: group ends).

    The weights may be kept in higher precision than the activations (fp32 master weights under
    :func:`~cupola.toolkit.parallel.mixed_precision.apply_mixed_precision`): they are cast to the
    activation dtype for the GEMMs and the weight gradient is cast back, both inside the MoE block,
    where torch.compile turns the casts into vectorized kernels (eager's bf16 -> fp32 copy reaches
    only ~60% of an H100's memory bandwidth). ``torch._grouped_mm`` cannot yet write an fp32 result
    from bf16 inputs (torch 2.11), which would fuse the gradient cast into the GEMM as Megatron does.
    """

    @staticmethod
    def forward(ctx, x_M_C: torch.Tensor, w_E_H_C: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = w_E_H_C.to(x_M_C.dtype)
        ctx.save_for_backward(x_M_C, w, offsets_E)
        ctx.w_dtype = w_E_H_C.dtype
        return torch._grouped_mm(x_M_C, w.transpose(-2, -1), offs=offsets_E)

    @staticmethod
    def backward(ctx, dy_M_H: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        x_M_C, w, offsets_E = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy_M_H, w, offs=offsets_E)
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(dy_M_H.transpose(0, 1), x_M_C, offs=offsets_E).to(ctx.w_dtype)
        return dx, dw, None


def _normal_(w: torch.Tensor, std: float) -> None:
    """``nn.init.normal_`` that, for a sharded (EP/FSDP) DTensor on CPU, gives the single-process values.

    DTensor's RNG draws distinct shards only on CUDA-like devices; on CPU every rank would draw
    the same local experts. There, draw the whole tensor (identically on every rank) and keep our part.
    """
    if isinstance(w, DTensor) and w.device_mesh.device_type == "cpu":
        full = torch.empty(w.shape, dtype=w.dtype).normal_(mean=0.0, std=std)
        w.copy_(distribute_tensor(full, w.device_mesh, w.placements, src_data_rank=None))
    else:
        nn.init.normal_(w, mean=0.0, std=std)


def _local(w: torch.Tensor) -> torch.Tensor:
    """The local shard of an expert-parallel DTensor parameter (a plain tensor passes through)."""
    return w.to_local() if isinstance(w, DTensor) else w


class Experts(nn.Module):
    """E feed-forward networks stored as stacked weights ``w1/w3 [E, H, C]``, ``w2 [E, C, H]``
    (each ``w[e]`` is an ``nn.Linear`` weight: ``y = x @ w[e].T``).

    ``impl``: ``"grouped"`` (``torch._grouped_mm``; eager: fp32/bf16, under torch.compile: bf16,
    ``dim`` and the hidden size multiples of 16 bytes), ``"reference"`` (a loop of matmuls over
    experts, any dtype), or ``"auto"``: grouped for bf16 on CUDA, reference otherwise.

    Weights in higher precision than the tokens (fp32 master weights) are cast for compute inside
    the expert GEMMs (:class:`GroupedLinear`), so mixed precision leaves them to this module
    (``casts_own_weights``) and their fp32 gradients come straight out of the GEMMs.
    """

    casts_own_weights = True

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, mlp: str = "swiglu") -> None:
        super().__init__()
        check_choice("Experts", "mlp", mlp, MOE_MLPS)
        self.mlp = mlp
        self.impl = "auto"
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim)) if mlp == "swiglu" else None
        self.init_weights(0.02, 0.02)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        _normal_(self.w1, std)
        if self.w3 is not None:
            _normal_(self.w3, std)
        _normal_(self.w2, out_std)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        w3 = _local(self.w3) if self.w3 is not None else None
        return _local(self.w1), _local(self.w2), w3

    def _act(self, h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
        return F.silu(h1) * h3 if h3 is not None else F.relu(h1).square()

    def forward(self, x_M_C: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``x_M_C``: tokens sorted by expert, ``counts_E[e]`` of them for expert ``e`` (sum = M)."""
        w1, w2, w3 = self._weights()
        impl = self.impl
        if impl == "auto":
            impl = "grouped" if _use_grouped_mm(x_M_C, w1, w2) else "reference"
        if impl == "grouped":
            return self._forward_grouped(x_M_C, counts_E, w1, w2, w3)
        if impl == "reference":
            return self._forward_reference(x_M_C, counts_E, w1, w2, w3)
        raise config_error(self, "impl", impl, f"choose one of {list(EXPERT_IMPLS)}")

    def _forward_grouped(self, x_M_C, counts_E, w1, w2, w3) -> torch.Tensor:
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h1 = GroupedLinear.apply(x_M_C, w1, offsets_E)
        h3 = GroupedLinear.apply(x_M_C, w3, offsets_E) if w3 is not None else None
        return GroupedLinear.apply(self._act(h1, h3), w2, offsets_E)

    def _forward_reference(self, x_M_C, counts_E, w1, w2, w3) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            x = x_M_C[start : start + n]
            start += n
            h = self._act(x @ w1[e].T.to(x.dtype), x @ w3[e].T.to(x.dtype) if w3 is not None else None)
            outs.append(h @ w2[e].T.to(x.dtype))
        return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# The block


class MoE(nn.Module):
    """Token-choice top-k Mixture-of-Experts feed-forward block (see the module docstring)."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, dim, cfg.expert_hidden_size, cfg.mlp)
        # Multiplies the injected aux/z-loss gradient: set it to the factor the trainer applies to
        # the main loss (e.g. 1/grad-accumulation steps) with set_moe_loss_scale().
        self.loss_scale = 1.0
        self.last_stats: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        _normal_(self.router.weight, std)
        self.experts.init_weights(std, out_std)

    def forward(self, x_B_T_C: torch.Tensor) -> torch.Tensor:
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.top_k
        x_N_C = x_B_T_C.reshape(-1, x_B_T_C.shape[-1])
        N, C = x_N_C.shape

        logits_N_E = F.linear(x_N_C.float(), self.router.weight.float())
        weights_N_K, experts_N_K, probs_N_E = route(logits_N_E, K, cfg.score_func, cfg.router_order)

        # Losses: f_e counts routed assignments before any dropping (as Megatron does). They ride on
        # the routing weights, which every output depends on, so the output stays a fresh tensor.
        flat_e = experts_N_K.reshape(-1)  # assignment a = n * K + k
        routed_E = torch.zeros(E, dtype=torch.long, device=flat_e.device).scatter_add_(
            0, flat_e, torch.ones_like(flat_e)
        )
        aux_loss = E * torch.sum(routed_E.float() / (N * K) * probs_N_E.mean(0))
        z_loss = torch.logsumexp(logits_N_E, dim=-1).square().mean()
        if torch.is_grad_enabled() and (cfg.aux_loss_coeff > 0 or cfg.z_loss_coeff > 0):
            loss = (cfg.aux_loss_coeff * aux_loss + cfg.z_loss_coeff * z_loss) * self.loss_scale
            weights_N_K = MoEAuxLossAutoScaler.apply(weights_N_K, loss)

        if cfg.capacity_factor is None:
            keep_N_K = None
            order = torch.argsort(flat_e, stable=True)  # by expert, then token
            counts_E = routed_E
        else:
            capacity = expert_capacity(N, K, E, cfg.capacity_factor)
            keep_N_K = capacity_keep_mask(weights_N_K, experts_N_K, E, capacity)
            kept = torch.nonzero(keep_N_K.reshape(-1)).squeeze(1)
            order = kept[torch.argsort(flat_e[kept], stable=True)]
            counts_E = torch.clamp(routed_E, max=capacity)

        # Gather through an expanded copy rather than x[order // K]: the backward of a gather with
        # unique indices plus a sum over k is deterministic; a scatter-add of duplicates is not.
        x_NK_C = x_N_C.unsqueeze(1).expand(N, K, C).reshape(N * K, C)
        y_M_C = self.experts(x_NK_C[order], counts_E)
        if keep_N_K is None:  # every assignment ran: gather the rows back through the inverse permutation
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=order.device))
            y_NK_C = y_M_C[inverse]
        else:
            y_NK_C = y_M_C.new_zeros(N * K, C).index_put((order,), y_M_C)  # dropped rows stay zero
        lead = x_B_T_C.shape[:-1]
        out = (y_NK_C.view(*lead, K, C).float() * weights_N_K.view(*lead, K, 1)).sum(-2).to(x_B_T_C.dtype)

        dropped = torch.zeros((), device=out.device) if keep_N_K is None else 1.0 - keep_N_K.float().mean()
        self.last_stats = {
            "aux_loss": aux_loss.detach(),
            "z_loss": z_loss.detach(),
            "dropped_fraction": dropped.detach(),
            "tokens_per_expert": routed_E.detach(),
        }
        return out


def set_moe_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale the aux/z-loss gradients of every MoE block like the main loss (e.g. ``1 / accumulation``)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.loss_scale = float(scale)


def moe_stats(model: nn.Module) -> dict[str, float]:
    """Router statistics of the last forward, averaged over the model's MoE blocks (one host sync).

    ``aux_loss`` and ``z_loss`` (without coefficients), ``dropped_fraction`` of (token, expert)
    assignments, and ``load_imbalance``: the busiest expert's routed assignments over the mean
    (1 is perfectly balanced). Empty when the model has no MoE block or has not run forward.
    """
    rows = []
    for m in model.modules():
        if isinstance(m, MoE) and m.last_stats:
            s = m.last_stats
            tokens = s["tokens_per_expert"].float()
            imbalance = tokens.max() / tokens.mean().clamp_min(1e-9)
            rows.append(torch.stack([s["aux_loss"], s["z_loss"], s["dropped_fraction"].float(), imbalance]))
    if not rows:
        return {}
    mean = torch.stack(rows).mean(0).tolist()
    return dict(zip(("aux_loss", "z_loss", "dropped_fraction", "load_imbalance"), mean))
