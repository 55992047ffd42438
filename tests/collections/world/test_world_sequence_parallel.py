"""Sequence parallelism (parallel.sp) for the world models on gloo against one process, in float64:
the Video2World + action DiT (Ulysses and zigzag ring: output and every gradient, the text encoder's
included) and the autoregressive model with cross-attention (logits, loss, gradients); then both
tiny recipes trained from scratch with parallel.sp=2 on 2 processes follow the 1-process loss curves
(so the FSDP-sharded initialization on a CPU mesh is one process's too); indivisible
token counts and tp/ep are refused with errors naming the fix."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from cupola.collections.llm.lightning import next_token_loss
from cupola.collections.world.autoregressive import ARWorldModel, ar_config
from cupola.collections.world.autoregressive.lightning import parallelize_ar
from cupola.collections.world.diffusion import DiffusionWFM, WFMConfig, dit_config
from cupola.collections.world.diffusion.lightning import parallelize_wfm
from cupola.collections.world.text import TextEncoderConfig
from cupola.recipes.testing import run_recipe_briefly
from cupola.toolkit.parallel.dims import ParallelDims
from cupola.toolkit.parallel.sequence import SequenceParallel, SPLayout
from cupola.toolkit.testing import spawn

TOL = {"rtol": 1e-9, "atol": 1e-10}
TEXT = TextEncoderConfig(dim=32, n_layers=1, n_heads=2)
PROMPTS = ["a red disc pushed left", "two cubes"]


def _float64_norms_and_rope() -> None:
    """RMSNorm and RoPE compute in fp32 by design (for bf16 training), which would limit float64
    agreement to fp32's ~1e-7; in these comparison processes they compute in the input's dtype."""
    import cupola.collections.world.diffusion.dit as dit
    import cupola.toolkit.modules.attention as attention
    from cupola.toolkit.modules.norms import RMSNorm

    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = cos.shape[-1]
        cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

    RMSNorm.forward = rms_norm
    dit.apply_rope = attention.apply_rope = apply_rope


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere: adaLN-Zero starts gates and outputs at zero, which would hide most
    of the blocks from the comparison."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _sharded_copy(reference: torch.nn.Module, build, parallelize, dims: ParallelDims, ac: bool = False):
    with torch.device("meta"):
        model = build()
    parallelize(
        model, dims, param_dtype=torch.float64, reduce_dtype=torch.float64, activation_checkpointing=ac
    )
    model.to_empty(device="cpu")
    model.double()
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    return model


def _check_grads(model: torch.nn.Module, reference: torch.nn.Module, what: str) -> None:
    ref = dict(reference.named_parameters())
    names = [_clean(n) for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ref)
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            _full(p.grad), ref[_clean(name)].grad, **TOL, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


# the DiT ------------------------------------------------------------------------------------------


def _dit_inputs(model: DiffusionWFM):
    """Video2World + actions inputs for a 3 x 4 x 4 latent grid: 3 x 2 x 2 = 12 tokens, per-frame
    noise levels, per-sample fps (per-sample RoPE tables), and the text through the model's encoder."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)  # 4 latent channels + the mask
    c_noise = torch.randn(2, 3, generator=g, dtype=torch.float64)
    actions = torch.randn(2, 8, 2, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    context, mask = model.encode_text(PROMPTS)
    fps = torch.tensor([24.0, 12.0])
    return (x, c_noise, context, mask), {"fps": fps, "actions": actions}, weight


def _dit_wfm() -> DiffusionWFM:
    dit = dit_config("tiny", n_layers=2, video2world=True, action_dim=2, actions_per_latent=4, text=TEXT)
    return DiffusionWFM(WFMConfig(dit=dit, cond_frames=1))


def _compare_dit(ulysses: int) -> None:
    torch.manual_seed(0)
    reference = _dit_wfm().double()
    _randomize(reference)
    args, kwargs, weight = _dit_inputs(reference)
    out = reference.dit(*args, **kwargs)
    (out * weight).sum().backward()

    dims = ParallelDims(sp=2, sp_ulysses=ulysses)
    dims.build_mesh("cpu")
    model = _sharded_copy(reference, _dit_wfm, parallelize_wfm, dims, ac=ulysses == 1)
    args, kwargs, weight = _dit_inputs(model)
    sp_out = model.dit(*args, **kwargs)  # every rank returns the whole output
    (sp_out * weight).sum().backward()
    what = f"DiT sp=2 ulysses={ulysses}"
    torch.testing.assert_close(sp_out, out, **TOL, msg=lambda m: f"{what} output: {m}")
    _check_grads(model, reference, what)


# the autoregressive model -------------------------------------------------------------------------

GRID = (3, 4, 4)


def _ar_model() -> ARWorldModel:
    return ARWorldModel(ar_config("tiny", cross_attention=True, text=TEXT))


def _ar_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 125, (2, 48), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)  # as ARModule.loss
    return tokens, labels


def _compare_ar(ulysses: int) -> None:
    torch.manual_seed(0)
    reference = _ar_model().double()
    _randomize(reference)
    tokens, labels = _ar_batch()
    context, mask = reference.encode_text(PROMPTS)
    logits = reference(tokens, GRID, context=context, context_mask=mask)
    loss = next_token_loss(logits, labels)
    # the whole grid with the last label ignored is the usual next-token loss over tokens[:, :-1]
    shifted = reference(tokens[:, :-1], GRID, context=context, context_mask=mask)
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(shifted.flatten(0, 1), tokens[:, 1:].flatten()), **TOL
    )
    loss.backward()

    dims = ParallelDims(sp=2, sp_ulysses=ulysses)
    dims.build_mesh("cpu")
    model = _sharded_copy(reference, _ar_model, parallelize_ar, dims)
    sp = dims.sequence_parallel()
    context, mask = model.encode_text(PROMPTS)
    sp_logits = model(sp.shard(tokens), GRID, context=context, context_mask=mask)
    sp_loss = next_token_loss(sp_logits, sp.shard(labels), sp)
    sp_loss.backward()
    what = f"AR sp=2 ulysses={ulysses}"
    torch.testing.assert_close(sp.gather(sp_logits.detach()), logits.detach(), **TOL)
    mean = sp_loss.detach().clone()
    torch.distributed.all_reduce(mean)  # the mean of the ranks' losses is the whole rows' loss
    torch.testing.assert_close(mean / 2, loss.detach(), **TOL, msg=lambda m: f"{what} loss: {m}")
    _check_grads(model, reference, what)


def _both_models(rank: int, world: int) -> None:
    _float64_norms_and_rope()
    for ulysses in (2, 1):  # Ulysses, zigzag ring
        _compare_dit(ulysses)
        _compare_ar(ulysses)


def test_dit_and_ar_model_with_sequence_parallel_on_2_processes_match_one():
    spawn(_both_models, 2)


# errors -------------------------------------------------------------------------------------------


def test_indivisible_token_counts_and_tp_ep_are_refused_with_the_fix():
    from cupola.collections.world.common import check_token_split
    from cupola.toolkit.config import ConfigError

    ring = SequenceParallel(
        layout=SPLayout(ring=2, ulysses=1), sp_group=None, ring_group=None, ulysses_group=None
    )
    with pytest.raises(ValueError, match=r"parallel\.sp=2.*multiple of 4.*data\.num_frames.*sp_zigzag=false"):
        check_token_split(ring, 6, "a clip's 1x2x3 token grid")
    check_token_split(ring, 12, "a clip's 3x2x2 token grid")
    model = _dit_wfm()
    model.dit.sp = ring  # checked before any communication
    x = torch.zeros(1, 5, 3, 2, 4)  # 3 x 1 x 2 = 6 tokens
    with pytest.raises(ValueError, match=r"DiT's 3x1x2 patch grid has 6 tokens.*multiple of 4"):
        model.dit(x, torch.zeros(1, 3), *model.encode_text(["x"]), actions=torch.zeros(1, 8, 2))
    for field in ("tp", "ep"):
        dims = ParallelDims(sp=2, **{field: 2}, world_size=4)
        with pytest.raises(ConfigError, match=rf"parallel\.{field}=2 is not supported.*parallel\.{field}=1"):
            parallelize_wfm(model, dims)


# training end to end ------------------------------------------------------------------------------


def _train(rank: int, world: int, name: str, out: str, steps: int, overrides: tuple[str, ...] = ()) -> None:
    run_recipe_briefly(rank, world, "world", name, out, steps, overrides)


STEPS = 3
SMALL = ("data.train_episodes=8", "data.val_episodes=2", "data.micro_batch_size=2")
# recipe, its tokenizer run, the sequence parallelism of its 2-process run
RUNS = (
    ("cosmos_dit_tiny_text2world", "tok", ("parallel.sp=2", "parallel.sp_ulysses=1")),  # zigzag ring
    ("cosmos_ar_tiny_train", "tok_dv", ("parallel.sp=2",)),  # Ulysses
)


def _world_runs(rank: int, world: int, root: str) -> None:
    """Both recipes, ``STEPS`` steps from a fresh initialization; with parallel.sp=2 on 2 processes
    (whose FSDP-sharded initialization is one process's, CPU mesh included)."""
    for name, tok, sp in RUNS:
        overrides = (*SMALL, f"tokenizer={root}/{tok}", *(sp if world == 2 else ()))
        _train(rank, world, name, f"{root}/{name}_{world}", STEPS, overrides)


def _one_process_runs(rank: int, world: int, root: str) -> None:
    """The two tokenizers, then the 1-process runs."""
    for name, tok in (("cosmos_tokenizer_tiny_train", "tok"), ("cosmos_tokenizer_tiny_dv_train", "tok_dv")):
        _train(rank, world, name, f"{root}/{tok}", 1, ("data.micro_batch_size=2",))
    _world_runs(rank, world, root)


def test_both_world_models_train_with_sp_2_on_the_1_process_curve(tmp_path):
    from cupola.toolkit.training.logs import loss_curves

    spawn(_one_process_runs, 1, str(tmp_path))
    spawn(_world_runs, 2, str(tmp_path))
    for name, _, _ in RUNS:
        one, two = (loss_curves(tmp_path / f"{name}_{w}")["train"] for w in (1, 2))
        assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1)), name
        for (_, a), (_, b) in zip(one, two, strict=True):
            assert b == pytest.approx(a, rel=1e-4), name
