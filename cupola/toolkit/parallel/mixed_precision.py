"""Mixed precision without sharding, for a model trained by a single process.

FSDP2's ``MixedPrecisionPolicy`` gives bf16 compute on fp32 master weights, but on a one-rank mesh
it still pays for sharding it does not need: every step it casts each parameter into an all-gather
buffer, "all-gathers" it (a device copy), copies it out, does all of that again in backward for
resharded blocks, and copies gradients through a one-rank reduce-scatter — about 48 bytes of memory
traffic per parameter per step. On a Mixture-of-Experts model, whose parameters are large next to
the tokens of one step, that was more than a quarter of the step (``benchmarks/README.md``).

:func:`apply_mixed_precision` keeps the same numerics — compute in ``param_dtype``, fp32 master
weights and fp32 gradients on them — at the cost of one cast per parameter in forward and one in
backward (12 bytes per parameter): a forward pre-hook on the root module swaps each parameter for
its differentiable cast, so gradients flow back to the fp32 ``nn.Parameter`` through the cast, and
the forward hook swaps the parameters back. A module with ``casts_own_weights = True`` (the MoE
experts) receives its fp32 parameters while training and casts them inside its own kernels. The optimizer, ``state_dict`` and checkpoints only ever
see the fp32 parameters. Tied parameters are cast once, so their gradients still add up.

Under ``torch.no_grad`` (evaluation, generation) the casts are cached and reused until a parameter
changes (its version counter moves), so decoding does not re-cast the model for every token.

The casts live between the root's forward pre-hook and forward hook, so call the model through
``__call__`` (as FSDP2 also requires), and do not combine this with activation checkpointing: a
recomputed block would see the fp32 parameters (``parallelize_gpt`` keeps FSDP2 in that case).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["MixedPrecisionHooks", "apply_mixed_precision"]


class MixedPrecisionHooks:
    """The hooks :func:`apply_mixed_precision` registers (kept on the module as ``_cupola_mp``)."""

    def __init__(self, param_dtype: torch.dtype) -> None:
        self.param_dtype = param_dtype
        self._cache: dict[int, tuple[int, torch.Tensor]] = {}  # id(param) -> (param._version, cast)
        self._slots: list[tuple[nn.Module, str, torch.Tensor]] | None = None  # set during a forward
        # Persistent working copies (see enable_working_copies): id(param) -> (param._version, leaf)
        self.working_copies = False
        self._work: dict[int, tuple[int, torch.Tensor]] = {}

    # Working copies ----------------------------------------------------------------------------
    def enable_working_copies(self) -> None:
        """Keep one persistent ``param_dtype`` copy of each parameter, a leaf that receives the
        gradient in ``param_dtype``; the optimizer that calls this updates the fp32 parameter from
        that gradient and rewrites the copy (:class:`~cupola.toolkit.training.optim.MixedPrecisionAdamW`),
        Megatron's bf16-parameters-with-fp32-main-parameters scheme. The forward then casts nothing
        and the backward makes no fp32 gradient. A copy whose parameter changed behind the optimizer's
        back (loading, initialisation: its version counter moved) is cast again at the next forward."""
        self.working_copies = True

    def working_copy(self, param: torch.Tensor) -> torch.Tensor:
        """The current working copy of ``param`` (made or refreshed if the parameter changed)."""
        if param.dtype == self.param_dtype or not param.is_floating_point():
            return param
        hit = self._work.get(id(param))
        if hit is None or hit[0] != param._version or hit[1].shape != param.shape:
            work = param.detach().to(self.param_dtype).requires_grad_(param.requires_grad)
            hit = (param._version, work)
            self._work[id(param)] = hit
        return hit[1]

    def mark_synced(self, param: torch.Tensor) -> None:
        """The optimizer rewrote ``param`` and its working copy together: the copy is current."""
        hit = self._work.get(id(param))
        if hit is not None:
            self._work[id(param)] = (param._version, hit[1])

    def grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """``param``'s gradient: on the fp32 parameter, or on its working copy (in ``param_dtype``)."""
        if param.grad is not None:
            return param.grad
        hit = self._work.get(id(param))
        return None if hit is None else hit[1].grad

    def zero_grad(self) -> None:
        for _, work in self._work.values():
            work.grad = None

    def _cast(self, param: torch.Tensor, cache: bool) -> torch.Tensor:
        if param.dtype == self.param_dtype or not param.is_floating_point():
            return param
        if not cache:
            return param.to(self.param_dtype)
        hit = self._cache.get(id(param))
        if hit is None or hit[0] != param._version:
            hit = (param._version, param.detach().to(self.param_dtype))
            self._cache[id(param)] = hit
        return hit[1]

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._slots is not None:
            raise RuntimeError(
                "apply_mixed_precision: the model was entered again while its parameters were cast; "
                "call it once per forward (not re-entrantly)"
            )
        cache = not torch.is_grad_enabled()
        if not cache or self.working_copies:
            self._cache.clear()  # training: casts must be part of this step's autograd graph
        # Every (owner, name) slot, tied parameters included (they get the same cast). Read at each
        # call: materialising or loading a model may have replaced the parameter objects.
        self._slots = [
            (owner, name, param)
            for owner in module.modules()
            for name, param in owner._parameters.items()
            if param is not None
        ]
        casts: dict[int, torch.Tensor] = {}
        for owner, name, param in self._slots:
            if self.working_copies:
                casts[id(param)] = self.working_copy(param)
            elif not cache and getattr(owner, "casts_own_weights", False):
                continue  # the module casts inside its own kernels (e.g. MoE experts' grouped GEMMs)
            if id(param) not in casts:
                casts[id(param)] = self._cast(param, cache)
            owner._parameters[name] = casts[id(param)]  # a plain tensor for the forward's duration
        if cache:
            self._cache = {k: v for k, v in self._cache.items() if k in casts}

        def cast_input(x: Any) -> Any:  # like FSDP2's root: floating inputs in the compute dtype
            return x.to(self.param_dtype) if torch.is_tensor(x) and x.is_floating_point() else x

        return tree_map(cast_input, args), tree_map(cast_input, kwargs)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        for owner, name, param in self._slots or ():
            owner._parameters[name] = param
        self._slots = None
        return output


def apply_mixed_precision(module: nn.Module, param_dtype: torch.dtype) -> nn.Module:
    """Compute ``module``'s forward in ``param_dtype`` on its (fp32) parameters; returns ``module``.

    A no-op for parameters already in ``param_dtype``. Apply it after the model's final parameters
    exist (after tensor/expert parallelism and compile wrappers, before or after materialisation).
    """
    if hasattr(module, "_cupola_mp"):
        raise RuntimeError("apply_mixed_precision: already applied to this module")
    hooks = MixedPrecisionHooks(param_dtype)
    module.register_forward_pre_hook(hooks.pre_forward, with_kwargs=True)
    module.register_forward_hook(hooks.post_forward, with_kwargs=True, always_call=True)
    module._cupola_mp = hooks
    return module
