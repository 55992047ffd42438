"""Context extension of the LLM (LongVILA's stage before long-video SFT): a config with a longer
``max_seq_len`` and RoPE frequencies that reach it, to be fine-tuned on long text.

Two ways to make RoPE reach further:

- ``"rope_base"``, what LongVILA does: raise ``rope_theta`` (all wavelengths grow, the highest
  frequency stays), with the base per target length from :data:`LONGVILA_ROPE_SCHEDULE` or given.
- ``"linear"`` / ``"ntk"`` / ``"yarn"``: keep ``rope_theta`` and rescale the frequencies by
  ``factor`` (:class:`~cupola.toolkit.modules.RopeScaling`), the original length kept as reference.

Either way the model is fine-tuned at the new length afterwards; the config alone does not teach
the model the new positions.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

from cupola.collections.llm.models.gpt import GPTConfig, RopeScaling
from cupola.toolkit.config import ConfigError, config_error

__all__ = ["EXTENSION_METHODS", "LONGVILA_ROPE_SCHEDULE", "extend_context", "rope_base_for_length"]

# RoPE base by target context length in LongVILA's context-extension stage (arXiv 2408.10188), as
# set in its released training scripts: NVlabs/VILA longvila/train/4_extend_llm_{64k,256k,512k,1M}.sh
# (`model_max_length`, `rope_theta`; the script named "64k" trains at 131072). The stages are
# progressive: each continues from the previous one's checkpoint, starting from the VILA model's LLM.
LONGVILA_ROPE_SCHEDULE: dict[int, float] = {
    131072: 15_300_000.0,
    262144: 207_112_184.0,
    524288: 1_062_356_830.0,
    1048576: 3_580_165_449.0,
}

EXTENSION_METHODS = ("rope_base", "linear", "ntk", "yarn")


def _check_length(owner: str, target_len: object) -> int:
    if not isinstance(target_len, int) or isinstance(target_len, bool) or target_len < 1:
        raise config_error(owner, "target_len", target_len, "must be an integer >= 1")
    return target_len


def rope_base_for_length(target_len: int, *, schedule: Mapping[int, float] = LONGVILA_ROPE_SCHEDULE) -> float:
    """The RoPE base for a ``target_len`` context: that of the smallest tabulated length ``>= target_len``.

    Rounding up, a length between two entries (or below the first) gets a base at least as large as
    the schedule uses for any context that long. Above the largest entry there is no published value:
    that is an error (pass an explicit base, ``extend_context(..., rope_theta=...)``, or a longer
    ``schedule``).
    """
    _check_length("rope_base_for_length", target_len)
    if not schedule:
        raise config_error("rope_base_for_length", "schedule", dict(schedule), "needs at least one entry")
    longer = [length for length in schedule if length >= target_len]
    if not longer:
        raise config_error(
            "rope_base_for_length",
            "target_len",
            target_len,
            f"the schedule ends at {max(schedule)} ({sorted(schedule)}); give the RoPE base explicitly "
            "(extend_context(..., rope_theta=...)) or a schedule that reaches this length",
        )
    return float(schedule[min(longer)])


def extend_context(
    cfg: GPTConfig,
    target_len: int,
    *,
    method: str = "rope_base",
    factor: float | None = None,
    rope_theta: float | None = None,
) -> GPTConfig:
    """A copy of ``cfg`` for ``target_len`` tokens (``max_seq_len=target_len``) with RoPE extended by ``method``.

    - ``"rope_base"``: ``rope_theta`` becomes the given ``rope_theta``, or
      :func:`rope_base_for_length` ``(target_len)``; it must be larger than ``cfg.rope_theta``.
      ``cfg.rope_scaling`` (e.g. Llama 3.1's) is kept as it is.
    - ``"linear"`` / ``"ntk"`` / ``"yarn"``: ``rope_scaling = RopeScaling(kind=method, factor=...)``
      with ``factor`` defaulting to ``target_len / cfg.max_seq_len`` (YaRN's reference length is
      ``cfg.max_seq_len``). ``cfg`` must not already have a ``rope_scaling``: two rescalings do not
      compose into one.
    """
    owner = "extend_context"
    _check_length(owner, target_len)
    if method not in EXTENSION_METHODS:
        raise config_error(owner, "method", method, f"choose one of {list(EXTENSION_METHODS)}")
    if target_len <= cfg.max_seq_len:
        raise config_error(
            owner,
            "target_len",
            target_len,
            f"must be longer than the config's max_seq_len ({cfg.max_seq_len})",
        )
    out = copy.deepcopy(cfg)
    if method == "rope_base":
        if factor is not None:
            raise config_error(owner, "factor", factor, "only methods 'linear', 'ntk', 'yarn' take a factor")
        theta = float(rope_theta) if rope_theta is not None else rope_base_for_length(target_len)
        if not theta > cfg.rope_theta:
            raise config_error(
                owner,
                "rope_theta",
                theta,
                f"must be larger than the config's rope_theta ({cfg.rope_theta}) to reach further",
            )
        out = dataclasses.replace(out, max_seq_len=target_len, rope_theta=theta)
    else:
        if rope_theta is not None:
            raise config_error(owner, "rope_theta", rope_theta, "only method 'rope_base' sets the base")
        if cfg.rope_scaling is not None:
            raise ConfigError(
                f"extend_context: cfg.rope_scaling={cfg.rope_scaling!r} already rescales the frequencies and "
                f"method={method!r} would replace it; extend such a model with method='rope_base'"
            )
        factor = target_len / cfg.max_seq_len if factor is None else float(factor)
        reference = {"original_max_position_embeddings": cfg.max_seq_len} if method == "yarn" else {}
        scaling = RopeScaling(kind=method, factor=factor, **reference)
        out = dataclasses.replace(out, max_seq_len=target_len, rope_scaling=scaling)
    out.validate()
    return out
