"""Rotary position embeddings (1D), with frequency scaling for longer contexts and partial rotary.

Layout: the "half-split" convention of HF transformers and Megatron-Core (``rotate_half``):
within the first ``rot_dim`` channels of a head, channel ``i`` pairs with ``i + rot_dim/2``.
HF Llama/Nemotron/Mixtral checkpoints therefore load without permuting q/k rows. (Meta's
original ``consolidated.pth`` files use the interleaved layout, ``i`` with ``i+1``; they need
the HF permutation before loading.) Channels past ``rot_dim`` (``rotary_percent < 1``, as in
Nemotron) pass through unrotated.

Frequency scaling (:class:`RopeScaling`) follows HF transformers' ``ROPE_INIT_FUNCTIONS``
(``modeling_rope_utils.py``) for ``llama3``, ``linear`` and ``yarn``; ``ntk`` is the static
NTK-aware base change (see :class:`RopeScaling`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cupola.toolkit.config import check_choice, config_error

# The fields each kind reads besides ``factor``; any other field must stay at its default.
_FIELDS_OF_KIND: dict[str, tuple[str, ...]] = {
    "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": (),
    "ntk": (),
    "yarn": ("original_max_position_embeddings", "beta_fast", "beta_slow"),
}
ROPE_SCALING_KINDS = tuple(_FIELDS_OF_KIND)


@dataclass(kw_only=True, slots=True)
class RopeScaling:
    """How RoPE frequencies are rescaled for a context ``factor`` times longer than the original.

    ``kind``:

    - ``"llama3"`` (Llama 3.1, HF ``rope_type: llama3``): wavelengths longer than
      ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``; shorter
      than ``original_max_position_embeddings / high_freq_factor`` are kept; in between they are
      interpolated smoothly.
    - ``"linear"`` (position interpolation, HF ``linear``): every frequency divided by ``factor``,
      i.e. positions squeezed by ``factor``.
    - ``"ntk"`` (NTK-aware, static): the base becomes ``theta * factor ** (d / (d - 2))`` with ``d``
      the rotary dim, so the lowest frequency is divided by exactly ``factor`` and the highest is
      kept. HF has only the *dynamic* variant (``rope_type: dynamic``, base recomputed from the
      current length); this equals it evaluated once at ``factor`` times its length with its
      ``factor`` set to 1.
    - ``"yarn"`` (YaRN, arXiv 2309.00071; HF ``yarn`` with ``truncate`` on): per frequency a ramp
      between interpolation (``/ factor``) and extrapolation (unchanged), by how many rotations it
      makes in ``original_max_position_embeddings``: more than ``beta_fast`` keeps it, fewer than
      ``beta_slow`` interpolates it. ``cos`` and ``sin`` are multiplied by
      :attr:`attention_scaling` ``= 0.1 * ln(factor) + 1`` (the paper's attention temperature).

    Fields a kind does not read must stay at their defaults (a value there would be silently
    ignored otherwise).
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn

    @property
    def attention_scaling(self) -> float:
        """Factor on ``cos`` and ``sin`` (so ``mscale**2`` on attention logits); 1 except for ``yarn``."""
        if self.kind != "yarn" or self.factor <= 1.0:
            return 1.0
        return 0.1 * math.log(self.factor) + 1.0

    def validate(self) -> None:
        check_choice(self, "kind", self.kind, ROPE_SCALING_KINDS)
        if not self.factor >= 1.0:
            raise config_error(self, "factor", self.factor, "must be >= 1")
        used = _FIELDS_OF_KIND[self.kind]
        for f in dataclasses.fields(self):
            if f.name in ("kind", "factor") or f.name in used or getattr(self, f.name) == f.default:
                continue
            users = [kind for kind, names in _FIELDS_OF_KIND.items() if f.name in names]
            raise config_error(
                self,
                f.name,
                getattr(self, f.name),
                f"only kind {' / '.join(map(repr, users))} reads it, this is kind={self.kind!r}; "
                f"leave it at its default ({f.default!r})",
            )
        if "original_max_position_embeddings" in used and not self.original_max_position_embeddings > 0:
            raise config_error(
                self, "original_max_position_embeddings", self.original_max_position_embeddings, "must be > 0"
            )
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise config_error(
                self,
                "low_freq_factor",
                self.low_freq_factor,
                f"must satisfy 0 < low_freq_factor < high_freq_factor (= {self.high_freq_factor})",
            )
        if self.kind == "yarn" and not 0 < self.beta_slow < self.beta_fast:
            raise config_error(
                self,
                "beta_slow",
                self.beta_slow,
                f"must satisfy 0 < beta_slow < beta_fast (= {self.beta_fast}); rotations counted in "
                "original_max_position_embeddings",
            )


def rotary_dim(head_dim: int, rotary_percent: float = 1.0) -> int:
    """Channels of a head that rotate: ``int(head_dim * rotary_percent)`` (must be even)."""
    return int(head_dim * rotary_percent)


def _plain_inv_freq(rot_dim: int, theta: float, device: torch.device | str | None) -> torch.Tensor:
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float() / rot_dim
    return 1.0 / (theta**exponent)


def _llama3_inv_freq(rot_dim: int, theta: float, s: RopeScaling, device) -> torch.Tensor:
    inv_freq = _plain_inv_freq(rot_dim, theta, device)
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _linear_inv_freq(rot_dim: int, theta: float, s: RopeScaling, device) -> torch.Tensor:
    return _plain_inv_freq(rot_dim, theta, device) / s.factor


def _ntk_inv_freq(rot_dim: int, theta: float, s: RopeScaling, device) -> torch.Tensor:
    if rot_dim <= 2:
        raise config_error(
            s, "kind", s.kind, f"needs a rotary dim > 2 (got {rot_dim}): d / (d - 2) is its exponent"
        )
    return _plain_inv_freq(rot_dim, theta * s.factor ** (rot_dim / (rot_dim - 2)), device)


def _yarn_inv_freq(rot_dim: int, theta: float, s: RopeScaling, device) -> torch.Tensor:
    def dim_of(rotations: float) -> float:
        # The (fractional) channel index whose frequency makes `rotations` turns in the original context.
        wavelen = s.original_max_position_embeddings / (rotations * 2 * math.pi)
        return rot_dim * math.log(wavelen) / (2 * math.log(theta))

    low = max(math.floor(dim_of(s.beta_fast)), 0)
    high = min(math.ceil(dim_of(s.beta_slow)), rot_dim - 1)  # HF's bound (pair indices end at rot_dim/2 - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    # Share of the original frequency kept: 1 below `low` (fast), 0 above `high` (slow), linear between.
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = (1 - ramp).to(device)
    pos_freqs = theta ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    return interpolated * (1 - keep) + extrapolated * keep


_INV_FREQ: dict[str, Callable[..., torch.Tensor]] = {
    "llama3": _llama3_inv_freq,
    "linear": _linear_inv_freq,
    "ntk": _ntk_inv_freq,
    "yarn": _yarn_inv_freq,
}


def rope_inv_freq(
    rot_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies ``[rot_dim // 2]`` in fp32 (the formulas of HF's ``ROPE_INIT_FUNCTIONS``)."""
    if scaling is None:
        return _plain_inv_freq(rot_dim, theta, device)
    scaling.validate()
    return _INV_FREQ[scaling.kind](rot_dim, theta, scaling, device)


def rope_cos_sin(
    inv_freq: torch.Tensor, max_seq_len: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` tables ``[max_seq_len, rot_dim // 2]`` (fp32) for positions ``0 .. max_seq_len-1``,
    both multiplied by ``attention_scaling`` (:attr:`RopeScaling.attention_scaling`)."""
    positions = torch.arange(max_seq_len, device=inv_freq.device, dtype=torch.int64).float()
    angles = torch.outer(positions, inv_freq)
    if attention_scaling == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``x_B_T_H_D``.

    ``cos``/``sin`` are ``[T, rot_dim/2]`` (shared positions) or ``[B, T, rot_dim/2]`` (per-sample
    positions). Computed in fp32, returned in ``x.dtype``.
    """
    half = cos.shape[-1]
    cos = cos.unsqueeze(-2)  # broadcast over heads
    sin = sin.unsqueeze(-2)
    x_f32 = x.float()
    x1, x2, x_pass = x_f32[..., :half], x_f32[..., half : 2 * half], x_f32[..., 2 * half :]
    rotated = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    return torch.cat((*rotated, x_pass), dim=-1).to(x.dtype)


class RotaryEmbedding(torch.nn.Module):
    """Holds the ``cos``/``sin`` tables as non-persistent buffers and looks positions up in them.

    Built on the meta device the tables are empty; :meth:`reset_buffers` fills them (call it
    after ``to_empty``).
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        *,
        theta: float = 10000.0,
        scaling: RopeScaling | None = None,
        rotary_percent: float = 1.0,
    ) -> None:
        super().__init__()
        self.rot_dim = rotary_dim(head_dim, rotary_percent)
        if self.rot_dim % 2 or self.rot_dim == 0:
            raise config_error(
                "RotaryEmbedding",
                "rotary_percent",
                rotary_percent,
                f"head_dim ({head_dim}) * rotary_percent must be a positive even number of channels",
            )
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos", torch.empty(max_seq_len, self.rot_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, self.rot_dim // 2), persistent=False)
        if self.cos.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        device = device if device is not None else self.cos.device
        inv_freq = rope_inv_freq(self.rot_dim, self.theta, self.scaling, device=device)
        scale = 1.0 if self.scaling is None else self.scaling.attention_scaling
        self.cos, self.sin = rope_cos_sin(inv_freq, self.max_seq_len, scale)

    def forward(
        self, seq_len: int, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``: ``[T, rot/2]`` for positions ``0..T-1``, or ``[B, T, rot/2]`` for ``positions_B_T``."""
        if positions is not None:
            return self.cos[positions], self.sin[positions]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}; "
                "raise max_seq_len in the model config"
            )
        return self.cos[:seq_len], self.sin[:seq_len]


# 3D RoPE for video tokens -------------------------------------------------------------------------


def rope3d_dims(head_dim: int) -> tuple[int, int, int]:
    """How a head's channels split between the (time, height, width) axes: height and width get
    ``head_dim // 6 * 2`` each, time the rest (Cosmos' split; 128 -> 44, 42, 42). Every part is even."""
    hw = head_dim // 6 * 2
    t = head_dim - 2 * hw
    if hw < 2 or t < 2 or t % 2:
        raise config_error(
            "rope3d",
            "head_dim",
            head_dim,
            "must be an even number >= 8 to split between time, height and width",
        )
    return t, hw, hw


def _axis_inv_freq(dim: int, theta: float, extrapolation: float, device) -> torch.Tensor:
    # NTK-aware stretch of one axis: the lowest frequency divided by `extrapolation`, the highest kept
    theta = theta * extrapolation ** (dim / (dim - 2)) if extrapolation != 1.0 and dim > 2 else theta
    return _plain_inv_freq(dim, theta, device)


def rope3d_cos_sin(
    frames: int,
    height: int,
    width: int,
    head_dim: int,
    *,
    theta: float = 10000.0,
    fps: torch.Tensor | float | None = None,
    base_fps: float = 24.0,
    extrapolation: tuple[float, float, float] = (1.0, 1.0, 1.0),
    frame_offset: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` for the tokens of a ``frames x height x width`` grid, flattened time-major
    (index ``(t * height + h) * width + w``), for :func:`apply_rope`.

    Each head's rotated pairs are split between the axes (:func:`rope3d_dims`): pair ``i`` of the
    half-split layout turns with the time position for ``i < d_t / 2``, then height, then width.
    ``fps`` makes time positions fps-aware, ``t * base_fps / fps`` (a clip at half the frame rate
    advances twice as far per frame, so models see physical time); a tensor ``[B]`` gives per-sample
    tables ``[B, N, head_dim/2]``, otherwise ``[N, head_dim/2]``. ``extrapolation`` stretches
    each axis NTK-style for grids larger than those trained on. ``frame_offset`` starts time at
    that frame (continuing a video).
    """
    d_t, d_h, d_w = rope3d_dims(head_dim)
    f_t, f_h, f_w = (
        _axis_inv_freq(d, theta, e, device) for d, e in zip((d_t, d_h, d_w), extrapolation, strict=True)
    )
    t = torch.arange(frame_offset, frame_offset + frames, device=device, dtype=torch.float64)
    if fps is not None:
        fps_t = torch.as_tensor(fps, dtype=torch.float64, device=device)
        t = t * (base_fps / fps_t)[..., None] if fps_t.ndim else t * (base_fps / fps_t)
    h = torch.arange(height, device=device, dtype=torch.float64)
    w = torch.arange(width, device=device, dtype=torch.float64)
    a_t = (t[..., :, None] * f_t.double())[..., :, None, None, :]  # [(B,) T, 1, 1, d_t/2]
    a_h = (h[:, None] * f_h.double())[:, None, :]  # [H, 1, d_h/2]
    a_w = w[:, None] * f_w.double()  # [W, d_w/2]
    lead = a_t.shape[:-4]
    shape = (*lead, frames, height, width)
    angles = torch.cat(
        (
            a_t.expand(*shape, d_t // 2),
            a_h.expand(*shape, d_h // 2),
            a_w.expand(*shape, d_w // 2),
        ),
        dim=-1,
    ).reshape(*lead, frames * height * width, head_dim // 2)
    return angles.cos().float(), angles.sin().float()
